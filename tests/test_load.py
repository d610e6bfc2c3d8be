"""Inputs of a case: io.load.read_inputs (read + validate + 4D DWI choice), preprocess.inputs.harmonise_inputs
(ADC units + ADC onto the DWI grid) and preprocess.inputs.load_inputs (both)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from deepisles.errors import InputError
from deepisles.io.image import Image
from deepisles.io.load import LoadedInputs, read_inputs
from deepisles.io.read import read_image
from deepisles.preprocess.inputs import harmonise_inputs, load_inputs
from deepisles.preprocess.resample import resample_to


def _save(img: Image, path: Path, dtype=None) -> Path:
    nib.save(img.to_nifti(dtype), path)
    return path


@pytest.fixture(scope="module")
def real(isles22_case):
    return {k: read_image(isles22_case[k], k if k in ("dwi", "adc") else "mask") for k in ("dwi", "adc")}


# --- synthetic case (always runs) --------------------------------------------------------------------
def _synthetic(tmp_path: Path, adc_scale: float = 1.0, adc_affine=None) -> tuple[Path, Path, Image, Image]:
    rng = np.random.default_rng(0)
    shape = (24, 24, 16)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-24, -24, -16]
    brain = np.zeros(shape, bool)
    brain[4:20, 4:20, 3:13] = True
    dwi = np.where(brain, rng.normal(300, 30, shape), 0).astype(np.float32)
    adc = np.where(brain, rng.normal(0.8, 0.1, shape), 0).astype(np.float32)
    d, a = Image(dwi, aff), Image(adc * adc_scale, aff if adc_affine is None else adc_affine)
    return _save(d, tmp_path / "dwi.nii.gz"), _save(a, tmp_path / "adc.nii.gz"), d, a


def test_synthetic_same_grid(tmp_path):
    dwi_p, adc_p, d, a = _synthetic(tmp_path)
    before = sorted(tmp_path.iterdir())
    out = load_inputs(dwi_p, adc_p)
    assert isinstance(out, LoadedInputs)
    assert sorted(tmp_path.iterdir()) == before  # nothing written
    np.testing.assert_array_equal(out.dwi.data, d.data)
    np.testing.assert_allclose(out.adc.data, a.data, rtol=1e-6)
    assert out.flair is None and out.warnings == []
    s = out.steps
    assert s["read"]["dwi"]["format"] == "nifti" and s["read"]["adc"]["path"] == str(adc_p)
    assert s["dwi_volume"] is None
    assert s["adc_unit"]["unit_detected"] == "1e-3 mm2/s" and s["adc_unit"]["scale"] == 1.0
    assert s["adc_resampled"] is False
    assert s["nonfinite"] == {"dwi": 0, "adc": 0}
    assert s["overlap_dwi_adc"] == pytest.approx(1.0)


def test_synthetic_adc_in_1e6_integer_units(tmp_path):
    dwi_p, _, _, a = _synthetic(tmp_path)
    adc_p = _save(Image(np.round(a.data * 1000), a.affine), tmp_path / "adc_int.nii.gz", np.int16)
    out = load_inputs(dwi_p, adc_p)
    assert out.steps["adc_unit"]["unit_detected"] == "1e-6 mm2/s"
    assert out.steps["read"]["adc"]["original_dtype"] == "int16"
    np.testing.assert_allclose(out.adc.data, a.data, atol=6e-4)


def test_4d_dwi_with_bval_file(tmp_path):
    dwi_p, adc_p, d, _ = _synthetic(tmp_path)
    b0 = d.data * 3
    four = Image(np.stack([d.data, b0], axis=-1), d.affine)
    p = _save(four, tmp_path / "dwi4d.nii.gz")
    (tmp_path / "dwi4d.bval").write_text("1000 0\n")
    out = load_inputs(p, adc_p)
    np.testing.assert_array_equal(out.dwi.data, d.data)
    assert out.steps["dwi_volume"]["chosen"] == [0]
    assert out.steps["dwi_volume"]["bvals_source"] == "file next to the DWI"
    # explicit --bval wins
    explicit = tmp_path / "other.bval"
    explicit.write_text("0 1000")
    out = load_inputs(p, adc_p, bval_path=explicit)
    np.testing.assert_array_equal(out.dwi.data, b0)


def test_4d_dwi_without_bvals(tmp_path):
    dwi_p, adc_p, d, _ = _synthetic(tmp_path)
    p2 = _save(Image(np.stack([d.data * 3, d.data], axis=-1), d.affine), tmp_path / "two.nii.gz")
    out = load_inputs(p2, adc_p)
    np.testing.assert_array_equal(out.dwi.data, d.data)
    assert any("assumed the last volume" in w for w in out.warnings)
    p5 = _save(Image(np.stack([d.data] * 5, axis=-1), d.affine), tmp_path / "five.nii.gz")
    with pytest.raises(InputError, match="5 volumes and no b-values") as ei:
        load_inputs(p5, adc_p)
    assert ei.value.path == str(p5)


def test_nonfinite_counted_and_zeroed(tmp_path):
    dwi_p, _, _, a = _synthetic(tmp_path)
    data = a.data.copy()
    data[10, 10, 5:8] = np.nan
    adc_p = _save(Image(data, a.affine), tmp_path / "adc_nan.nii.gz")
    out = load_inputs(dwi_p, adc_p)
    assert out.steps["nonfinite"]["adc"] == 3
    assert np.isfinite(out.adc.data).all()
    assert any("3 non-finite voxels" in w for w in out.warnings)


def test_flair_stays_on_its_grid(tmp_path):
    dwi_p, adc_p, d, _ = _synthetic(tmp_path)
    faff = np.diag([0.9, 0.9, 5.0, 1.0])
    faff[:3, 3] = [-24, -24, -16]
    flair = Image(np.random.default_rng(2).random((50, 50, 6)).astype(np.float32) + 1, faff)
    fp = _save(flair, tmp_path / "flair.nii.gz")
    out = load_inputs(dwi_p, adc_p, flair_path=fp)
    assert out.flair is not None and out.flair.shape == (50, 50, 6)
    np.testing.assert_allclose(out.flair.affine, faff, atol=1e-5)
    assert out.steps["grids"]["flair"]["shape"] == [50, 50, 6]


@pytest.mark.parametrize(
    "case,match,who",
    [
        ("missing_dwi", "DWI file not found", "dwi"),
        ("missing_adc", "ADC file not found", "adc"),
        ("far_adc", "DWI and ADC do not overlap in physical space", "adc"),
        ("empty_adc", "ADC image is empty", "adc"),
        ("nan_dwi", "DWI image is empty", "dwi"),
        ("adc_unit", r"ADC values \(median", "adc"),
        ("adc_4d", "ADC image is 4D", "adc"),
        ("dwi_2d", "DWI image is 2D", "dwi"),
        ("same_file", "same file", "adc"),
        ("bad_flair", "FLAIR file", "flair"),
        ("degenerate_adc", "degenerate", "adc"),
    ],
)
def test_user_errors_name_the_file(tmp_path, case, match, who):
    dwi_p, adc_p, d, a = _synthetic(tmp_path)
    flair_p = None
    if case == "missing_dwi":
        dwi_p = tmp_path / "nope.nii.gz"
    elif case == "missing_adc":
        adc_p = tmp_path / "nope.nii.gz"
    elif case == "far_adc":
        far = a.affine.copy()
        far[:3, 3] += 500
        adc_p = _save(Image(a.data, far), tmp_path / "far.nii.gz")
    elif case == "empty_adc":
        adc_p = _save(Image(np.zeros_like(a.data), a.affine), tmp_path / "zero.nii.gz")
    elif case == "nan_dwi":
        dwi_p = _save(Image(np.full_like(d.data, np.nan), d.affine), tmp_path / "nan.nii.gz")
    elif case == "adc_unit":
        adc_p = _save(Image(a.data * 25, a.affine), tmp_path / "x25.nii.gz")
    elif case == "adc_4d":
        adc_p = _save(Image(np.stack([a.data, a.data], -1), a.affine), tmp_path / "adc4d.nii.gz")
    elif case == "dwi_2d":
        dwi_p = _save(Image(d.data[:, :, 5], d.affine), tmp_path / "dwi2d.nii.gz")
    elif case == "same_file":
        adc_p = dwi_p
    elif case == "bad_flair":
        flair_p = tmp_path / "flair.nii.gz"
        flair_p.write_bytes(b"garbage" * 50)
    elif case == "degenerate_adc":
        collinear = np.array([[2.0, 2.0, 0, -24], [0, 0, 0, -24], [0, 0, 2.0, -16], [0, 0, 0, 1]])
        adc_p = tmp_path / "degenerate.nii.gz"
        nib.save(nib.Nifti1Image(a.data, collinear), adc_p)  # nibabel keeps the singular sform
    before = sorted(tmp_path.iterdir())
    with pytest.raises(InputError, match=match) as ei:
        load_inputs(dwi_p, adc_p, flair_path=flair_p)
    expected = {"dwi": dwi_p, "adc": adc_p, "flair": flair_p}[who]
    assert ei.value.path == str(expected)
    assert str(expected) in str(ei.value) and "\n" not in str(ei.value)
    assert sorted(tmp_path.iterdir()) == before


def test_adc_on_other_grid_is_resampled(tmp_path):
    dwi_p, _, d, a = _synthetic(tmp_path)
    shifted = a.affine.copy()
    shifted[:3, 3] += [1.0, 0, 0]  # half a voxel: same shape, different grid
    adc_p = _save(Image(a.data, shifted), tmp_path / "adc_shift.nii.gz")
    out = load_inputs(dwi_p, adc_p)
    assert out.steps["adc_resampled"] is True and "affine differs" in out.steps["adc_resample_reason"]
    assert out.adc.same_grid(out.dwi)



def test_read_inputs_keeps_stored_values_and_grid_harmonise_converts(tmp_path):
    """io reads and validates only; the ADC unit and grid are preprocess.inputs' steps, recorded in the same
    steps/warnings, and harmonise_inputs leaves its argument unchanged."""
    dwi_p, _, d, a = _synthetic(tmp_path)
    shifted = a.affine.copy()
    shifted[:3, 3] += [1.0, 0, 0]  # half a voxel
    adc_p = _save(Image(np.round(a.data * 1000), shifted), tmp_path / "adc_int.nii.gz", np.int16)
    raw = read_inputs(dwi_p, adc_p)
    assert np.array_equal(raw.adc.data, np.round(a.data * 1000)) and np.array_equal(raw.adc.affine, shifted)
    assert {"adc_unit", "grids", "adc_resampled", "adc_to_dwi_grid"}.isdisjoint(raw.steps)
    assert raw.warnings == []
    raw_steps = dict(raw.steps)
    out = harmonise_inputs(raw)
    assert raw.steps == raw_steps and raw.warnings == []  # the argument is left as it was
    assert np.array_equal(raw.adc.data, np.round(a.data * 1000)) and np.array_equal(raw.adc.affine, shifted)
    assert list(out.steps)[: len(raw.steps)] == list(raw.steps)  # read's records first, in the same order
    assert out.steps["adc_unit"]["unit_detected"] == "1e-6 mm2/s" and out.steps["adc_resampled"] is True
    assert out.adc.same_grid(out.dwi) and out.dwi is raw.dwi
    assert len(out.warnings) == 1 and "resampled onto the DWI grid" in out.warnings[0]
    whole = load_inputs(dwi_p, adc_p)
    assert whole.steps == out.steps and whole.warnings == out.warnings
    np.testing.assert_array_equal(whole.adc.data, out.adc.data)


def test_io_does_not_import_preprocess():
    """Layering: nothing under deepisles/io imports deepisles.preprocess (or any later stage)."""
    import ast

    import deepisles.io

    later = ("deepisles.preprocess", "deepisles.members", "deepisles.training", "deepisles.api", "deepisles.batch")
    found = []
    for path in sorted(Path(deepisles.io.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}: {n}" for n in names if n.startswith(later)]
    assert found == []


# --- the real ISLES'22 case --------------------------------------------------------------------------
def test_real_case_same_grid_not_resampled(isles22_case, real):
    out = load_inputs(isles22_case["dwi"], isles22_case["adc"])
    assert out.steps["adc_resampled"] is False
    assert out.steps["adc_unit"]["unit_detected"] == "1e-3 mm2/s"
    assert out.dwi.same_grid(out.adc) and out.dwi.shape == (112, 112, 73)
    np.testing.assert_array_equal(out.adc.data, real["adc"].data)
    np.testing.assert_array_equal(out.dwi.data, real["dwi"].data)
    assert out.warnings == []


def test_real_case_adc_on_15mm_grid_is_resampled_back(isles22_case, real, tmp_path):
    adc = real["adc"]
    fine_aff = adc.affine.copy()
    fine_aff[:3, :3] *= 0.75  # 1.5 mm voxels, same orientation and origin
    shape = tuple(int(np.ceil(n / 0.75)) for n in adc.shape)
    fine = resample_to(adc, Image(np.zeros(shape), fine_aff))
    # and in 10^-6 mm^2/s integers, as a scanner would store it
    p = _save(Image(np.round(fine.data * 1000), fine_aff), tmp_path / "adc_1p5mm.nii.gz", np.int16)
    out = load_inputs(isles22_case["dwi"], p)
    s = out.steps
    assert s["adc_resampled"] is True and "1.5" in s["adc_resample_reason"]
    assert s["adc_unit"]["unit_detected"] == "1e-6 mm2/s"
    assert s["grids"]["adc"]["spacing_mm"] == pytest.approx([1.5, 1.5, 1.5], abs=1e-3)  # as read
    assert out.adc.same_grid(out.dwi)
    assert out.adc.spacing == pytest.approx((2.0, 2.0, 2.0), abs=1e-3)
    brain = adc.data > 0.2
    err = np.abs(out.adc.data - adc.data)[brain]
    assert np.median(err) < 0.15  # two linear interpolations of a rough map
    assert np.corrcoef(out.adc.data[brain], adc.data[brain])[0, 1] > 0.9
    assert any("resampled onto the DWI grid" in w for w in out.warnings)
