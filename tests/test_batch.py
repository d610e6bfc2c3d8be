"""`deepisles batch`: BIDS derivatives of a dataset, resume, shards, failures, kill safety (classical member)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from deepisles.batch import (
    FAILURES,
    WORK,
    case_names,
    finished_sidecar,
    parse_shard,
    read_failures,
    run_batch,
    shard_cases,
)
from deepisles.cli import app
from deepisles.errors import DeepIslesError
from deepisles.io.dataset import find_cases
from deepisles.io.hashing import sha256_file

runner = CliRunner()
NAME = re.compile(
    r"^(?P<stem>sub-[A-Za-z0-9]+(?:_ses-[A-Za-z0-9]+)?)_"
    r"(?:space-orig_desc-lesion_(?:mask|probseg)\.(?:nii\.gz|json)|space-orig_desc-agreement_probseg\.nii\.gz"
    r"|desc-deepisles_report\.json)$"
)
IDS = [f"sub-synth{i:04d}_ses-0001" for i in range(1, 7)]
BROKEN = "sub-synth0005_ses-0001"
WITH_FLAIR = "sub-synth0003_ses-0001"


def _copy_case(root: Path, src: str, dst: str, flair: bool) -> None:
    for part in ("rawdata", "derivatives"):
        for f in sorted((root / part / src).rglob("*.nii.gz")):
            if "_flair" in f.name and not flair:
                continue
            rel = f.relative_to(root / part / src)
            target = root / part / dst / rel.parent / f.name.replace(src, dst)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Six ISLES'22-layout cases: case 1 with a lesion, 2-6 copies of a lesion-free case (fast: no MNI
    registration); FLAIR only on case 3; case 5 has a truncated DWI."""
    from deepisles.synth import write_dataset

    root = tmp_path_factory.mktemp("batch") / "ds"
    write_dataset(root, 2, seed=13)
    for i in range(3, 7):
        _copy_case(root, "sub-synth0002", f"sub-synth{i:04d}", flair=i == 3)
    for sub in ("sub-synth0001", "sub-synth0002"):
        (root / "rawdata" / sub / "ses-0001" / f"{sub}_ses-0001_flair.nii.gz").unlink()
    dwi = root / "rawdata/sub-synth0005/ses-0001/sub-synth0005_ses-0001_dwi.nii.gz"
    dwi.write_bytes(dwi.read_bytes()[:5000])
    assert [c.case_id for c in find_cases(root)] == IDS
    return root


def _rows(out: Path) -> list[dict[str, str]]:
    lines = (out / "cohort.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]


def _check_complete(out: Path, dataset: Path, ok: list[str], failed: list[str]) -> None:
    """Every case exactly once, complete and verified; nothing else under sub-*; no work folders left."""
    rows = _rows(out)
    assert [r["participant_id"] + "_" + r["session_id"] for r in rows] == sorted(ok + failed)
    status = {r["participant_id"] + "_" + r["session_id"]: r for r in rows}
    assert {c for c, r in status.items() if r["status"] == "ok"} == set(ok)
    assert {c for c, r in status.items() if r["status"] == "failed"} == set(failed)
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.relative_to(out).parts[0].startswith("sub-"))
    stems = {}
    for f in files:
        m = NAME.match(f.name)
        assert m, f.name
        assert f.parent == out / m["stem"].replace("_", "/") / "dwi"
        stems.setdefault(m["stem"], []).append(f.name)
    assert sorted(stems) == sorted(ok) and all(len(v) == 6 for v in stems.values())
    for cid in ok:
        case = next(c for c in find_cases(dataset) if c.case_id == cid)
        names = case_names(case)
        sidecar = finished_sidecar(out, names, verify=True)
        assert sidecar is not None, cid
        for name, digest in sidecar["deepisles"]["sha256"].items():
            assert sha256_file(out / names.folder / name) == digest
        dwi = nib.load(case.dwi)
        mask = nib.load(out / names.folder / names.mask)
        prob = nib.load(out / names.folder / names.probseg)
        assert mask.shape == prob.shape == dwi.shape and np.allclose(mask.affine, dwi.affine)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
        assert float(np.asarray(prob.dataobj).max()) <= 1.0
        assert float(status[cid]["volume_ml"]) == pytest.approx(sidecar["deepisles"]["volume_ml"], rel=1e-5)
    assert not (out / WORK).exists()


@pytest.fixture(scope="module")
def first_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run1") / "deriv"
    res = runner.invoke(app, ["batch", "-i", str(dataset), "-o", str(out), "--members", "classical"])
    return out, res


def test_batch_writes_bids_derivatives_and_logs_the_broken_case(first_run, dataset):
    out, res = first_run
    assert res.exit_code == 1, res.output
    assert "segmented now" in res.output and "failed" in res.output
    ok = [c for c in IDS if c != BROKEN]
    _check_complete(out, dataset, ok, [BROKEN])

    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["BIDSVersion"]
    (gen,) = desc["GeneratedBy"]
    assert gen["Name"] == "deepisles" and gen["Version"]
    assert desc["DatasetLinks"]["raw"] == os.path.relpath(dataset / "rawdata", out)

    folder = out / "sub-synth0003/ses-0001/dwi"
    side = json.loads((folder / "sub-synth0003_ses-0001_space-orig_desc-lesion_mask.json").read_text())
    assert side["Type"] == "Lesion" and side["SpatialReference"] == "orig" and side["Description"]
    assert side["Sources"] == [f"bids:raw:sub-synth0003/ses-0001/sub-synth0003_ses-0001_{m}.nii.gz"
                               for m in ("dwi", "adc", "flair")]  # fmt: skip
    d = side["deepisles"]
    assert d["members_run"] == ["classical"] and d["version"] and isinstance(d["count"], int)
    prob_side = json.loads((folder / "sub-synth0003_ses-0001_space-orig_desc-lesion_probseg.json").read_text())
    assert prob_side["SpatialReference"] == "orig" and prob_side["Sources"] == side["Sources"]
    report = json.loads((folder / "sub-synth0003_ses-0001_desc-deepisles_report.json").read_text())
    assert report["lesions"]["volume_ml"] == d["volume_ml"] and "flair" in report["inputs"]
    no_flair = json.loads((out / "sub-synth0001/ses-0001/dwi/sub-synth0001_ses-0001_space-orig_desc-lesion_mask.json")
                          .read_text())  # fmt: skip
    assert len(no_flair["Sources"]) == 2

    (fail,) = [json.loads(line) for line in (out / FAILURES).read_text().splitlines()]
    assert fail["case"] == BROKEN and "sub-synth0005_ses-0001_dwi.nii.gz" in fail["error"] and "\n" not in fail["error"]
    row = next(r for r in _rows(out) if r["participant_id"] == "sub-synth0005")
    assert row["error"] == fail["error"] and row["volume_ml"] == "n/a"
    good = next(r for r in _rows(out) if r["participant_id"] == "sub-synth0001")
    assert good["members"] == "classical" and int(good["count"]) >= 1 and float(good["volume_ml"]) > 0
    lz = json.loads((out / "sub-synth0001/ses-0001/dwi/sub-synth0001_ses-0001_desc-deepisles_report.json")
                    .read_text())["lesions"]  # fmt: skip
    assert good["hemisphere"] == (lz.get("hemisphere") or "n/a")  # present once the report has it
    assert {"hemisphere", "lobes", "rsi", "likely_within_4_5h"} <= set(good)


def test_resume_skips_finished_and_redoes_a_damaged_case(first_run, dataset, tmp_path):
    out = tmp_path / "deriv"
    shutil.copytree(first_run[0], out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    s = run_batch(dataset, out, members="classical")
    assert (s.count("skipped"), s.count("failed-before"), s.count("done"), s.count("failed")) == (5, 1, 0, 0)
    assert not s.ok and {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")} == mtimes

    victim = out / "sub-synth0002/ses-0001/dwi/sub-synth0002_ses-0001_space-orig_desc-lesion_mask.nii.gz"
    victim.unlink()
    s = run_batch(dataset, out, members="classical")
    assert [o.case_id for o in s.outcomes if o.status == "done"] == ["sub-synth0002_ses-0001"]
    assert victim.exists()
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items() if p.parent != victim.parent)

    with open(out / FAILURES, "a") as fh:
        fh.write('{"case": "sub-cut')  # a line cut by a crash
    s = run_batch(dataset, out, members="classical", retry_failed=True)
    assert [(o.case_id, o.status) for o in s.outcomes if o.status != "skipped"] == [(BROKEN, "failed")]
    lines = (out / FAILURES).read_text().splitlines()
    assert len(lines) == 3 and lines[1] == '{"case": "sub-cut' and list(read_failures(out)) == [BROKEN]
    _check_complete(out, dataset, [c for c in IDS if c != BROKEN], [BROKEN])


def test_shards_cover_every_case_once(dataset, tmp_path):
    cases = find_cases(dataset, require_mask=False)
    parts = [[c.case_id for c in shard_cases(cases, k, 3)] for k in (1, 2, 3)]
    assert sorted(sum(parts, [])) == IDS and parts == [[c.case_id for c in shard_cases(cases, k, 3)] for k in (1, 2, 3)]

    ds = tmp_path / "ds"  # five cases, without the FLAIR (registration is slow)
    shutil.copytree(dataset, ds, ignore=shutil.ignore_patterns("*_flair.nii.gz", "sub-synth0006"))
    out = tmp_path / "deriv"
    with ThreadPoolExecutor(2) as pool:  # both shards at once on one output root
        runs = list(pool.map(lambda k: run_batch(ds, out, members="classical", shard=(k, 2)), (1, 2)))
    handled = [o.case_id for s in runs for o in s.outcomes]
    assert sorted(handled) == IDS[:5] and [s.cases for s in runs] == [3, 2]
    assert not set(o.case_id for o in runs[0].outcomes) & set(o.case_id for o in runs[1].outcomes)
    _check_complete(out, ds, [c for c in IDS[:5] if c != BROKEN], [BROKEN])
    assert len((out / FAILURES).read_text().splitlines()) == 1


def test_pending_rows_and_dataset_without_sessions(dataset, tmp_path):
    ds = tmp_path / "ds"  # layout 2: no rawdata/, no session, dwi/ subfolder, no masks
    src = dataset / "rawdata/sub-synth0002/ses-0001"
    for sub in ("sub-a", "sub-b"):
        for role in ("dwi", "adc"):
            (ds / sub / "dwi").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / f"sub-synth0002_ses-0001_{role}.nii.gz", ds / sub / "dwi" / f"{sub}_{role}.nii.gz")
    s = run_batch(ds, members="classical", shard=(1, 2))
    assert s.ok and [o.case_id for o in s.outcomes] == ["sub-a"]
    out = ds / "derivatives" / "deepisles"
    side = json.loads((out / "sub-a/dwi/sub-a_space-orig_desc-lesion_mask.json").read_text())
    assert side["Sources"] == ["bids:raw:sub-a/dwi/sub-a_dwi.nii.gz", "bids:raw:sub-a/dwi/sub-a_adc.nii.gz"]
    assert json.loads((out / "dataset_description.json").read_text())["DatasetLinks"]["raw"] == "../.."
    assert [(r["participant_id"], r["session_id"], r["status"]) for r in _rows(out)] == [
        ("sub-a", "n/a", "ok"), ("sub-b", "n/a", "pending")]  # fmt: skip
    assert find_cases(ds, require_mask=False)[0].mask is None  # our outputs are not taken for masks


@pytest.mark.parametrize("args", [["--shard", "3/2"], ["--shard", "x"], ["--skull-strip", "magic"],
                                  ["--members", "nope"], ["--input", "/nonexistent/dataset"]])  # fmt: skip
def test_usage_errors_exit_2(dataset, tmp_path, args):
    res = runner.invoke(app, ["batch", "-i", str(dataset), "-o", str(tmp_path / "o"), *args])
    assert res.exit_code == 2 and "error" in res.output


def test_parse_shard():
    assert parse_shard(None) == (1, 1) and parse_shard("2/5") == (2, 5)
    for bad in ("0/2", "3/2", "1", "a/b", "1/2/3"):
        with pytest.raises(DeepIslesError, match="--shard"):
            parse_shard(bad)


def _kill_midway(dataset: Path, out: Path, after: int, log: Path) -> None:
    """Start `python -m deepisles batch` and SIGKILL it once ``after`` case folders exist."""
    cmd = [sys.executable, "-m", "deepisles", "batch", "-i", str(dataset), "-o", str(out), "--members", "classical"]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 300
        try:
            while len(list(out.glob("sub-*/ses-*/dwi"))) < after:
                assert proc.poll() is None, f"batch ended before the kill: {log.read_text()}"
                assert time.monotonic() < deadline, "batch too slow"
                time.sleep(0.01)
            assert proc.poll() is None, "batch ended before the kill"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _check_after_kill(out: Path, dataset: Path) -> None:
    """Right after the kill: every case folder under its final name is complete and verifies."""
    folders = list(out.glob("sub-*/ses-*/dwi"))
    assert folders
    for case in find_cases(dataset, require_mask=False):
        names = case_names(case)
        if (out / names.folder).exists():
            assert finished_sidecar(out, names, verify=True) is not None, case.case_id


def test_sigkill_midway_then_rerun(dataset, tmp_path):
    out = tmp_path / "deriv"
    _kill_midway(dataset, out, after=2, log=tmp_path / "stderr.txt")  # killed in case 3 (FLAIR registration)
    _check_after_kill(out, dataset)
    assert len(list(out.glob("sub-*/ses-*/dwi"))) < len(IDS) - 1
    res = runner.invoke(app, ["batch", "-i", str(dataset), "-o", str(out), "--members", "classical"])
    assert res.exit_code == 1, res.output
    _check_complete(out, dataset, [c for c in IDS if c != BROKEN], [BROKEN])


@pytest.mark.slow
def test_acceptance_20_cases_sigkill_rerun(tmp_path):
    from deepisles.synth import write_dataset

    ds = tmp_path / "ds"
    ids = [f"{s}_ses-0001" for s in write_dataset(ds, 20, seed=7)]
    out = tmp_path / "deriv"
    _kill_midway(ds, out, after=10, log=tmp_path / "stderr.txt")
    _check_after_kill(out, ds)
    proc = subprocess.run([sys.executable, "-m", "deepisles", "batch", "-i", str(ds), "-o", str(out),
                           "--members", "classical"], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _check_complete(out, ds, ids, [])
