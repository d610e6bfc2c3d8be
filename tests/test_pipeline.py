"""segment as named steps (deepisles.pipeline), one writer with layouts, one progress interface (issue 10, item 5).

docs/architecture.md claims: the CLI/API and batch run the same steps and write through the same writer; the
report names exactly the files a layout writes; every long job reports through ``Progress``.
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from deepisles import pipeline
from deepisles.api import segment
from deepisles.batch import run_batch
from deepisles.progress import Messages, Prefixed, Progress, Recorder, Silent, as_progress
from small_case import case_arrays

_case_arrays = case_arrays


@pytest.fixture()
def dataset(tmp_path):
    """A one-subject BIDS dataset (no session) with a DWI and an ADC."""
    dwi, adc = _case_arrays()
    d = tmp_path / "ds" / "sub-a" / "dwi"
    d.mkdir(parents=True)
    paths = {}
    for role, arr in (("dwi", dwi), ("adc", adc)):
        paths[role] = d / f"sub-a_{role}.nii.gz"
        nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 2.0, 1.0])), str(paths[role]))
    return tmp_path / "ds", paths


def _untimed(obj):
    """A report section without its run times (``seconds``)."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


STEPS = ["reading and validating inputs", "loading members", "brain mask (auto)", "member classical",
         "lesion location and biomarkers"]  # fmt: skip


def test_run_case_runs_the_named_steps_in_order(dataset):
    _, p = dataset
    rec = Recorder()
    opts = pipeline.RunOptions(members="classical")
    result = pipeline.run_case(pipeline.InputFiles(p["dwi"], p["adc"]), opts, progress=rec)
    assert [s for s in rec.steps if s in STEPS] == STEPS
    assert result.report["outputs"] == {}  # nothing is written by run_case
    assert result.dwi is not None and result.adc is not None and result.measurements is not None
    assert result.measurements.summary["count"] == result.count >= 1
    assert set(result.report["timing_s"]) >= {"load", "brain_mask", "member_classical", "biomarkers", "total"}


def test_segment_reports_exactly_the_files_its_layout_writes(dataset, tmp_path):
    _, p = dataset
    out = tmp_path / "out"
    result = segment(p["dwi"], p["adc"], outdir=out, members="classical", device="cpu", save_members=True)
    written = {str(f.relative_to(out)) for f in out.rglob("*") if f.is_file()}
    assert set(result.report["outputs"].values()) == written
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["outputs"] == result.report["outputs"] and on_disk["lesions"] == result.report["lesions"]


def test_batch_and_segment_run_the_same_steps_and_write_the_same_result(dataset, tmp_path):
    ds, p = dataset
    seg = segment(p["dwi"], p["adc"], outdir=tmp_path / "seg", members="classical", device="cpu", html=False,
                  preview=False)
    rec = Recorder()
    summary = run_batch(ds, tmp_path / "deriv", members="classical", device="cpu", progress=rec)
    assert summary.ok and summary.count("done") == 1
    case = tmp_path / "deriv" / "sub-a" / "dwi"
    mask = nib.load(case / "sub-a_space-orig_desc-lesion_mask.nii.gz")
    prob = nib.load(case / "sub-a_space-orig_desc-lesion_probseg.nii.gz")
    assert np.array_equal(np.asarray(mask.dataobj), np.asarray(nib.load(tmp_path / "seg/lesion_mask.nii.gz").dataobj))
    assert np.array_equal(np.asarray(prob.dataobj), np.asarray(nib.load(tmp_path / "seg/lesion_prob.nii.gz").dataobj))
    report = json.loads((case / "sub-a_desc-deepisles_report.json").read_text())
    for key in ("inputs", "preprocessing", "members", "ensemble", "lesions", "mismatch", "warnings", "device"):
        assert _untimed(report[key]) == _untimed(seg.report[key]), key
    # the report names the BIDS files directly (no rewriting after the fact), and they are all there
    assert set(report["outputs"].values()) == {f.name for f in case.iterdir()}
    # progress: one count per case, the case's steps prefixed with its id
    assert rec.advances[0] == (0, 1, "1 to segment (0 already handled)") and rec.advances[-1] == (1, 1, "sub-a")
    assert [s for s in rec.steps if s.startswith("sub-a: ")][:3] == [
        "sub-a: starting", "sub-a: reading and validating inputs", "sub-a: brain mask (auto)"]  # fmt: skip


def test_batch_loads_the_members_once(dataset, tmp_path, monkeypatch):
    ds, p = dataset
    other = ds / "sub-b" / "dwi"
    other.mkdir(parents=True)
    for role in ("dwi", "adc"):
        os.link(p[role], other / f"sub-b_{role}.nii.gz")
    calls = []
    real = pipeline.load_members
    monkeypatch.setattr(pipeline, "load_members", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert run_batch(ds, tmp_path / "deriv", members="classical", device="cpu").count("done") == 2
    assert len(calls) == 1


def test_as_progress_accepts_none_a_progress_or_a_function():
    assert isinstance(as_progress(None), Silent)
    rec = Recorder()
    assert as_progress(rec) is rec and isinstance(rec, Progress)
    lines: list[str] = []
    p = as_progress(lines.append)
    p.step("member seals")
    p.advance(3, 10, "sub-x")
    p.advance(5)
    assert lines == ["member seals", "3/10 sub-x", "5"]
    Prefixed(Messages(lines.append), "sub-y").step("writing")
    assert lines[-1] == "sub-y: writing"
    with pytest.raises(TypeError):
        as_progress(42)


def test_evaluate_synth_and_segment_speak_the_same_progress(tmp_path):
    from deepisles.api import evaluate, synth

    rec = Recorder()
    (sub,) = synth(tmp_path / "ds", 1, seed=3, progress=rec)
    assert rec.advances == [(1, 1, "")]
    gt = tmp_path / "ds/derivatives" / sub / "ses-0001" / f"{sub}_ses-0001_msk.nii.gz"
    rec = Recorder()
    evaluate(gt, gt, progress=rec)
    assert rec.advances and rec.advances[-1][:2] == (1, 1)
