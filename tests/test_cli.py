"""The `deepisles` command: every bad input ends with exit code 2, one line, no traceback, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from deepisles.cli import app
from small_case import case_arrays

runner = CliRunner()


def _save(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) * [2, 2, 2, 1] if affine is None else affine), str(path))
    return path


@pytest.fixture()
def case(tmp_path):
    """A small valid DWI/ADC pair (bright, ADC-dark blob in a brain-like ellipsoid)."""
    dwi, adc = case_arrays()
    d = tmp_path / "in"
    d.mkdir()
    return {
        "dwi": _save(d / "dwi.nii.gz", dwi),
        "adc": _save(d / "adc.nii.gz", adc),
        "dir": d,
        "out": tmp_path / "out",
        "shape": dwi.shape,
    }


def _run(args):
    return runner.invoke(app, [str(a) for a in args])


def _assert_clean_failure(res, out, needle):
    assert res.exit_code == 2, (res.exit_code, res.output, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error:")
    assert needle.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in res.output + res.stderr
    assert not out.exists() or not any(out.iterdir())


def test_segment_writes_outputs_on_dwi_grid(case):
    res = _run(["segment", "--dwi", case["dwi"], "--adc", case["adc"], "-o", case["out"], "--device", "cpu"])
    assert res.exit_code == 0, res.output + res.stderr
    out = case["out"]
    for name in ("lesion_mask.nii.gz", "lesion_prob.nii.gz", "report.json", "preview.png", "lesions.csv",
                 "report.html"):
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text()
    assert "niivue" in html.lower() and "data-viewer" in html
    m = nib.load(out / "lesion_mask.nii.gz")
    dwi = nib.load(case["dwi"])
    assert m.shape == dwi.shape and np.allclose(m.affine, dwi.affine)
    assert m.get_data_dtype() == np.uint8
    p = nib.load(out / "lesion_prob.nii.gz")
    assert p.get_data_dtype() == np.float32
    rep = json.loads((out / "report.json").read_text())
    mask = np.asarray(m.dataobj)
    assert rep["lesions"]["volume_ml"] == pytest.approx(mask.sum() * 8 / 1000)
    assert rep["lesions"]["count"] >= 1
    assert rep["members"]["run"][0]["name"] == "classical"
    assert {s["member"] for s in rep["members"]["skipped"]} == {"seals", "nvauto", "factorizer"}
    assert len(rep["inputs"]["dwi"]["sha256"]) == 64
    assert not [f for f in out.iterdir() if f.name.startswith(".")]  # no temp files left


def test_segment_refuses_existing_results_without_overwrite(case):
    args = ["segment", "--dwi", case["dwi"], "--adc", case["adc"], "-o", case["out"], "--device", "cpu"]
    assert _run(args).exit_code == 0
    before = {f.name: f.stat().st_mtime_ns for f in case["out"].iterdir()}
    res = _run(args)
    assert res.exit_code == 2 and "--overwrite" in res.stderr
    assert {f.name: f.stat().st_mtime_ns for f in case["out"].iterdir()} == before
    assert _run([*args, "--overwrite"]).exit_code == 0


def test_missing_file(case):
    res = _run(["segment", "--dwi", case["dir"] / "nope.nii.gz", "--adc", case["adc"], "-o", case["out"]])
    _assert_clean_failure(res, case["out"], "nope.nii.gz")


def test_corrupt_file(case):
    bad = case["dir"] / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08garbage" * 10)
    res = _run(["segment", "--dwi", case["dwi"], "--adc", bad, "-o", case["out"]])
    _assert_clean_failure(res, case["out"], "bad.nii.gz")


def test_wrong_dimensionality(case):
    two_d = _save(case["dir"] / "flat.nii.gz", np.ones((20, 20), np.float32))
    res = _run(["segment", "--dwi", two_d, "--adc", case["adc"], "-o", case["out"]])
    _assert_clean_failure(res, case["out"], "flat.nii.gz")


def test_4d_dwi_with_many_volumes_and_no_bvalues(case):
    four = _save(case["dir"] / "dwi4d.nii.gz", np.ones((*case["shape"], 5), np.float32))
    res = _run(["segment", "--dwi", four, "--adc", case["adc"], "-o", case["out"]])
    _assert_clean_failure(res, case["out"], "dwi4d.nii.gz")


def test_empty_image(case):
    empty = _save(case["dir"] / "empty.nii.gz", np.zeros(case["shape"], np.float32))
    res = _run(["segment", "--dwi", case["dwi"], "--adc", empty, "-o", case["out"]])
    _assert_clean_failure(res, case["out"], "empty")


def test_dwi_adc_not_overlapping(case):
    aff = np.eye(4) * [2, 2, 2, 1]
    aff[:3, 3] = [500, 0, 0]
    far = _save(case["dir"] / "far_adc.nii.gz", np.asarray(nib.load(case["adc"]).dataobj), aff)
    res = _run(["segment", "--dwi", case["dwi"], "--adc", far, "-o", case["out"]])
    _assert_clean_failure(res, case["out"], "overlap")


def test_adc_in_unknown_units(case):
    weird = _save(case["dir"] / "weird_adc.nii.gz", np.asarray(nib.load(case["adc"]).dataobj) * 25)
    res = _run(["segment", "--dwi", case["dwi"], "--adc", weird, "-o", case["out"]])
    _assert_clean_failure(res, case["out"], "unit")


def test_nan_is_a_warning_not_an_error(case):
    data = np.asarray(nib.load(case["adc"]).dataobj).copy()
    data[0, 0, :5] = np.nan
    nan_adc = _save(case["dir"] / "nan_adc.nii.gz", data)
    res = _run(["segment", "--dwi", case["dwi"], "--adc", nan_adc, "-o", case["out"], "--device", "cpu"])
    assert res.exit_code == 0, res.stderr
    assert "warning" in res.stderr.lower() and "5" in res.stderr
    rep = json.loads((case["out"] / "report.json").read_text())
    assert any("5" in w for w in rep["warnings"])


@pytest.mark.parametrize(
    "extra, needle",
    [(["--skull-strip", "magic"], "--skull-strip"), (["--members", "bogus"], "unknown member"),
     (["--members", "seals"], "seals"), (["--device", "tpu"], "--device")],
)
def test_bad_options(case, extra, needle):
    res = _run(["segment", "--dwi", case["dwi"], "--adc", case["adc"], "-o", case["out"], *extra])
    _assert_clean_failure(res, case["out"], needle)


def test_real_process_exit_code_and_no_traceback(case):
    proc = subprocess.run(
        [sys.executable, "-m", "deepisles", "segment", "--dwi", str(case["dir"] / "missing.nii"),
         "--adc", str(case["adc"]), "-o", str(case["out"])],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "missing.nii" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not case["out"].exists()


def test_help_explains_itself():
    res = _run(["segment", "--help"])
    assert res.exit_code == 0
    for opt in ("--dwi", "--adc", "--flair", "--skull-strip", "--overwrite", "--members", "--device"):
        assert opt in res.output


def test_evaluate_writes_csv_and_refuses_grid_mismatch(case, tmp_path):
    gt = np.zeros(case["shape"], np.uint8)
    gt[10:14, 10:14, 10:14] = 1
    pred = gt.copy()
    pred[10:12, 10:14, 10:14] = 0
    pred[30, 30, 20] = 1  # a false-positive lesion
    g = _save(tmp_path / "gt.nii.gz", gt)
    p = _save(tmp_path / "pred.nii.gz", pred)
    csv = tmp_path / "m.csv"
    res = _run(["evaluate", "--pred", p, "--gt", g, "-o", csv])
    assert res.exit_code == 0, res.stderr
    lines = csv.read_text().splitlines()
    assert lines[0] == "case,dice,abs_volume_diff_ml,abs_lesion_count_diff,lesion_f1"
    case_name, dice, dv, dn, f1 = lines[1].split(",")
    assert float(dice) == pytest.approx(2 * 32 / (64 + 33))
    assert float(dv) == pytest.approx(31 * 8 / 1000)
    assert int(dn) == 1 and float(f1) == pytest.approx(1 / (1 + 0.5))
    assert _run(["evaluate", "--pred", p, "--gt", g, "-o", csv]).exit_code == 2  # no silent overwrite
    other = _save(tmp_path / "other.nii.gz", pred[:-1])
    res = _run(["evaluate", "--pred", other, "--gt", g])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1 and "other.nii.gz" in res.stderr
