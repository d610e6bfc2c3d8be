"""`deepisles batch --engine pipelined`: same files as the serial engine, failures logged, resume across engines.

The engines' files must be identical byte for byte, except the report's ``created``, ``timing_s`` and recorded
durations (and the report's checksum in the mask sidecar, which follows from them).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deepisles.batch import read_failures, run_batch
from deepisles.cli import app

LESION, CLEAN, BROKEN = "sub-synth0001_ses-0001", "sub-synth0002_ses-0001", "sub-synth0003_ses-0001"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Case 1 with a lesion (and FLAIR), case 2 without either, case 3 a copy of case 2 with a truncated DWI
    (fails to read)."""
    from deepisles.synth import write_dataset

    root = tmp_path_factory.mktemp("engines") / "ds"
    write_dataset(root, 2, seed=13)
    src, dst = root / "rawdata" / "sub-synth0002", root / "rawdata" / "sub-synth0003"
    for f in sorted(src.rglob("*.nii.gz")):
        target = dst / f.relative_to(src).parent / f.name.replace("sub-synth0002", "sub-synth0003")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
    dwi = next(dst.rglob("*_dwi.nii.gz"))
    dwi.write_bytes(dwi.read_bytes()[:5000])
    next((root / "rawdata" / "sub-synth0002").rglob("*_flair.nii.gz")).unlink()  # FLAIR (and its ~9 s of
    # registration per run) on the lesion case only
    return root


@pytest.fixture(scope="module")
def serial(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serial") / "out"
    summary = run_batch(dataset, out, members="classical", engine="serial")
    assert {o.case_id: o.status for o in summary.outcomes} == {LESION: "done", CLEAN: "done", BROKEN: "failed"}
    return out


def _case_files(out: Path, case_id: str) -> dict[str, bytes]:
    sub = case_id.split("_")[0]
    return {p.name: p.read_bytes() for p in sorted((out / sub).rglob("*")) if p.is_file()}


def _comparable(name: str, data: bytes) -> object:
    """The file's bytes, or for the report and mask sidecar their JSON without the run's time and timings."""
    if name.endswith("_report.json"):
        obj = json.loads(data)
        obj.pop("created"), obj.pop("timing_s")
        _drop_seconds(obj)
        return obj
    if name.endswith("_mask.json"):
        obj = json.loads(data)
        obj["deepisles"]["sha256"] = {k: v for k, v in obj["deepisles"]["sha256"].items() if "_report" not in k}
        return obj
    return data


def _drop_seconds(obj: object) -> None:
    """Wall-clock durations recorded inside the preprocessing records (``seconds``, ``seconds_per_step``)."""
    if isinstance(obj, dict):
        for key in [k for k in obj if k.startswith("seconds")]:
            del obj[key]
        for v in obj.values():
            _drop_seconds(v)
    elif isinstance(obj, list):
        for v in obj:
            _drop_seconds(v)


def _assert_same_case(a: Path, b: Path, case_id: str) -> None:
    fa, fb = _case_files(a, case_id), _case_files(b, case_id)
    assert sorted(fa) == sorted(fb) and len(fa) >= 5
    for name in fa:
        assert _comparable(name, fa[name]) == _comparable(name, fb[name]), name
    # images and the probseg sidecar byte for byte
    assert all(fa[n] == fb[n] for n in fa if n.endswith((".nii.gz", "_probseg.json")))


def test_pipelined_writes_what_serial_writes_and_resumes_across_engines(dataset, serial, tmp_path):
    out = tmp_path / "out"
    summary = run_batch(dataset, out, members="classical", engine="pipelined", workers=1)
    assert {o.case_id: o.status for o in summary.outcomes} == {LESION: "done", CLEAN: "done", BROKEN: "failed"}
    for case_id in (LESION, CLEAN):
        _assert_same_case(serial, out, case_id)
    assert read_failures(out) == read_failures(serial)  # same one-line error from the worker process
    assert (out / "cohort.tsv").read_bytes() == (serial / "cohort.tsv").read_bytes()
    assert not (out / ".deepisles-work").exists()
    # resume across engines: what serial finished, pipelined skips (and the other way round)
    again = run_batch(dataset, serial, members="classical", engine="pipelined")
    assert sorted(o.status for o in again.outcomes) == ["failed-before", "skipped", "skipped"]
    (next((out / "sub-synth0002").rglob("*_report.json"))).write_text("{}")  # damaged: done again
    again = run_batch(dataset, out, members="classical", engine="serial")
    assert {o.case_id: o.status for o in again.outcomes}[CLEAN] == "done"
    _assert_same_case(serial, out, CLEAN)


def test_unknown_engine_is_a_usage_error(dataset, tmp_path):
    res = CliRunner().invoke(app, ["batch", "-i", str(dataset), "-o", str(tmp_path / "o"), "--engine", "spark"])
    assert res.exit_code == 2 and "--engine spark" in res.output
