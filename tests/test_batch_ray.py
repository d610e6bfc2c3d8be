"""`deepisles batch --engine ray`: same files as the serial engine, an actor that dies mid-case, resume, no Ray.

Runs on one local Ray instance (2 CPUs) for the module; the classical member on three tiny cases (two small
DWI/ADC pairs of tests/small_case.py, one with a truncated DWI). Skipped only when Ray is not installed (CI
installs it with the test extra).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from deepisles.batch import read_failures, run_batch
from deepisles.cli import app
from deepisles.engine_ray import TEST_HOOK, plan
from deepisles.errors import DeepIslesError
from small_case import case_arrays
from test_batch_engines import _assert_same_case

FIRST, SECOND, BROKEN = "sub-01", "sub-02", "sub-03"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Three cases of 40x44x30 voxels, each with a lesion; the DWI of the third is truncated (fails to read)."""
    root = tmp_path_factory.mktemp("ray") / "ds"
    for case_id, seed in ((FIRST, 0), (SECOND, 1), (BROKEN, 2)):
        folder = root / "rawdata" / case_id / "dwi"
        folder.mkdir(parents=True)
        for role, data in zip(("dwi", "adc"), case_arrays(seed), strict=True):
            nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), folder / f"{case_id}_{role}.nii.gz")
    dwi = root / "rawdata" / BROKEN / "dwi" / f"{BROKEN}_dwi.nii.gz"
    dwi.write_bytes(dwi.read_bytes()[:2000])
    return root


@pytest.fixture(scope="module")
def serial(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serial") / "out"
    summary = run_batch(dataset, out, members="classical", engine="serial")
    assert _statuses(summary) == {FIRST: "done", SECOND: "done", BROKEN: "failed"}
    return out


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray instance for the module (the engine uses it as it is); its address, for a second driver."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'deepisles[ray]')")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ctx.address_info["address"]
    ray.shutdown()


def _statuses(summary) -> dict[str, str]:
    return {o.case_id: o.status for o in summary.outcomes}


def test_ray_writes_what_serial_writes_and_resumes_across_engines(dataset, serial, ray_address, tmp_path):
    out = tmp_path / "out"
    summary = run_batch(dataset, out, members="classical", engine="ray")
    assert _statuses(summary) == {FIRST: "done", SECOND: "done", BROKEN: "failed"}
    for case_id in (FIRST, SECOND):
        _assert_same_case(serial, out, case_id)
    assert read_failures(out) == read_failures(serial)  # the same one-line error from the actor
    assert (out / "cohort.tsv").read_bytes() == (serial / "cohort.tsv").read_bytes()
    assert not (out / ".deepisles-work").exists()
    again = run_batch(dataset, serial, members="classical", engine="ray")  # what serial finished, ray skips
    assert sorted(o.status for o in again.outcomes) == ["failed-before", "skipped", "skipped"]


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("deepisles")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "deepisles"]


def test_actor_killed_mid_case_fails_that_case_and_the_rest_run(dataset, serial, ray_address, tmp_path):
    """A second driver process joins the module's Ray (--ray-address); its one actor (2 CPUs each) dies during
    the first case with the second one queued behind it: the first is logged as failed, a new actor runs the
    rest, exit code 1; a serial rerun with --retry-failed does only the missing case."""
    out = tmp_path / "out"
    env = {**os.environ, TEST_HOOK: f"exit:{FIRST}", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([*_cli(), "batch", "-i", str(dataset), "-o", str(out), "--members", "classical",
                           "--engine", "ray", "--ray-address", ray_address, "--ray-cpus-per-actor", "2"],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    failures = read_failures(out)
    assert failures[FIRST].startswith("the Ray actor running this case died")
    assert failures[BROKEN] == read_failures(serial)[BROKEN]
    assert f"failed {FIRST}: the Ray actor running this case died" in " ".join(proc.stderr.split())
    assert len(proc.stderr.strip().splitlines()) <= 6, proc.stderr  # two failures (wrapped), no Ray chatter
    _assert_same_case(serial, out, SECOND)
    assert not (out / FIRST).exists()
    assert not (out / ".deepisles-work").exists()

    again = run_batch(dataset, out, members="classical", engine="serial", retry_failed=True)
    assert _statuses(again) == {FIRST: "done", SECOND: "skipped", BROKEN: "failed"}
    _assert_same_case(serial, out, FIRST)


@pytest.mark.slow  # ~20-80 s of waiting on 2 cores; the killed-actor test keeps the engine's failure path in CI
def test_ctrl_c_ends_the_actors_and_publishes_nothing_partial(dataset, ray_address, tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) while the second case runs: exit code 130
    within seconds, the first case published, nothing of the second, no work folder left."""
    out = tmp_path / "out"
    env = {**os.environ, TEST_HOOK: f"hang:{SECOND}", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([*_cli(), "batch", "-i", str(dataset), "-o", str(out), "--members", "classical",
                             "--engine", "ray", "--ray-address", ray_address], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300  # generous: CI machines may be busy
        while not (out / FIRST).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (out / FIRST).exists() and proc.poll() is None
        time.sleep(1)
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == 130, stderr
    assert not (out / SECOND).exists() and not (out / ".deepisles-work").exists()
    assert not (out / "failures.jsonl").exists()


def test_missing_ray_is_a_one_line_usage_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    res = CliRunner().invoke(app, ["batch", "-i", str(tmp_path / "ds"), "-o", str(tmp_path / "o"), "--engine", "ray"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == ["error: --engine ray needs Ray, which is not installed: "
                                               "pip install 'deepisles[ray]'"]  # fmt: skip
    assert not (tmp_path / "o").exists()


class _FakeRay:
    def __init__(self, *nodes: dict):
        self._nodes = [{"Alive": True, "Resources": n} for n in nodes]

    def nodes(self):
        return self._nodes


def test_actors_per_gpu_or_per_cpus():
    cpu2 = _FakeRay({"CPU": 2.0})
    assert plan(cpu2, "auto", 0, 10) == plan(cpu2, "cpu", 0, 10)
    assert (plan(cpu2, "auto", 0, 10).actors, plan(cpu2, "auto", 0, 10).num_cpus) == (1, 2)
    assert plan(cpu2, "cpu", 1, 10).actors == 2 and plan(cpu2, "cpu", 1, 1).actors == 1  # not more than cases
    assert plan(_FakeRay({"CPU": 1.0}), "cpu", 0, 10).num_cpus == 1  # fewer CPUs than the default
    assert plan(_FakeRay({"CPU": 3.0}, {"CPU": 3.0}), "cpu", 2, 10).actors == 2  # an actor fits on one node
    gpus = _FakeRay({"CPU": 16.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 1.0})
    p = plan(gpus, "auto", 0, 10)
    assert (p.actors, p.num_gpus, p.num_cpus, p.device) == (3, 1, 8, "cuda")
    assert plan(gpus, "cuda", 0, 10).device == "cuda"
    assert plan(gpus, "cpu", 0, 100).device == "cpu" and plan(gpus, "cpu", 0, 100).actors == 12
    with pytest.raises(DeepIslesError, match="no GPU"):
        plan(cpu2, "cuda", 0, 10)
