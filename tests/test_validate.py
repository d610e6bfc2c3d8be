"""validate.py: dimensionality, affine, emptiness, NaN/inf, DWI/ADC overlap in physical space."""

from __future__ import annotations

import numpy as np
import pytest

from deepisles.errors import InputError
from deepisles.io.image import Image
from deepisles.io.validate import (
    check_3d,
    check_affine,
    check_not_empty,
    check_overlap,
    overlap_fraction,
    sanitize_nonfinite,
    world_bounds,
)

SRC = "/data/case/adc.nii.gz"


def _img(shape=(10, 10, 10), affine=None, fill=None, source=SRC) -> Image:
    data = np.random.default_rng(0).random(shape).astype(np.float32) if fill is None else np.full(shape, fill)
    return Image(data, np.eye(4) if affine is None else affine, source)


def _raises(fn, *args, match: str):
    with pytest.raises(InputError, match=match) as ei:
        fn(*args)
    assert ei.value.path == SRC and SRC in str(ei.value)
    return ei.value


# --- check_3d ----------------------------------------------------------------------------------------
def test_3d_passes():
    img = _img()
    assert check_3d(img, "dwi") is img


def test_trailing_singleton_is_squeezed():
    out = check_3d(_img((10, 10, 10, 1)), "adc")
    assert out.shape == (10, 10, 10)
    out = check_3d(_img((10, 10, 10, 1, 1)), "adc")
    assert out.shape == (10, 10, 10)


def test_2d_rejected():
    _raises(check_3d, _img((10, 10)), "dwi", match="DWI image is 2D")
    _raises(check_3d, _img((10, 10, 1)), "dwi", match="2D")


@pytest.mark.parametrize("role,label", [("adc", "ADC"), ("flair", "FLAIR"), ("dwi", "DWI")])
def test_4d_rejected(role, label):
    _raises(check_3d, _img((10, 10, 10, 3)), role, match=f"{label} image is 4D")


# --- affine ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "affine",
    [
        np.diag([2.0, 2.0, 0.0, 1.0]),  # zero voxel size
        np.array([[1.0, 1.0, 0, 0], [0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]]),  # collinear axes
        np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, np.nan], [0, 0, 0, 1]]),  # NaN
    ],
)
def test_degenerate_affine_rejected(affine):
    _raises(check_affine, _img(affine=affine), "adc", match="ADC image has a")


def test_good_affine_passes():
    a = np.array([[-1.9, 0.3, 0.2, 60], [0.25, 1.95, -0.3, -70], [0.15, 0.2, 3.4, -20], [0, 0, 0, 1.0]])
    check_affine(_img(affine=a), "dwi")


# --- emptiness ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "img,what",
    [
        (_img(fill=0.0), "all voxels are 0"),
        (_img(fill=3.5), "every voxel has the value 3.5"),
        (_img((0, 10, 10)), "no voxels"),
    ],
)
def test_empty_rejected(img, what):
    err = _raises(check_not_empty, img, "dwi", match="DWI image is empty")
    assert what in err.problem


def test_not_empty_passes():
    data = np.zeros((5, 5, 5))
    data[2, 2, 2] = 1
    check_not_empty(Image(data, np.eye(4), SRC), "adc")


# --- NaN / inf ---------------------------------------------------------------------------------------
def test_nonfinite_set_to_zero_with_count():
    img = _img()
    data = img.data.copy()
    data[0, 0, :3] = np.nan
    data[1, 1, 1] = np.inf
    data[2, 2, 2] = -np.inf
    out, warnings = sanitize_nonfinite(Image(data, np.eye(4), SRC), "adc")
    assert np.isfinite(out.data).all()
    assert out.data[0, 0, 0] == 0 and out.data[1, 1, 1] == 0
    assert out.meta["nonfinite"] == 5
    assert len(warnings) == 1 and "5 non-finite voxels" in warnings[0] and "3 NaN" in warnings[0]
    assert SRC in warnings[0]
    assert np.isnan(data[0, 0, 0])  # the input is not modified


def test_clean_image_no_warning():
    out, warnings = sanitize_nonfinite(_img(), "dwi")
    assert warnings == [] and out.meta["nonfinite"] == 0
    out, warnings = sanitize_nonfinite(Image(np.ones((3, 3, 3), np.int16), np.eye(4)), "dwi")
    assert warnings == []


def test_all_nan_image_becomes_empty():
    out, _ = sanitize_nonfinite(_img(fill=np.nan), "dwi")
    with pytest.raises(InputError, match="empty"):
        check_not_empty(out, "dwi")


# --- overlap -----------------------------------------------------------------------------------------
def _shifted(dx: float, spacing: float = 2.0, shape=(50, 50, 30), source=SRC) -> Image:
    a = np.diag([spacing, spacing, spacing, 1.0])
    a[:3, 3] = [-50.0 + dx, -50.0, -30.0]
    return Image(np.ones(shape, np.float32), a, source)


def test_world_bounds_use_voxel_edges_and_all_corners():
    lo, hi = world_bounds(_shifted(0))
    np.testing.assert_allclose(lo, [-51, -51, -31])
    np.testing.assert_allclose(hi, [-51 + 100, -51 + 100, -31 + 60])
    # a 90 degree rotation about z: x extent comes from the j axis
    a = np.array([[0, -1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    lo, hi = world_bounds(Image(np.ones((4, 10, 2)), a))
    np.testing.assert_allclose(lo, [-9.5, -0.5, -0.5])
    np.testing.assert_allclose(hi, [0.5, 3.5, 1.5])


def test_same_and_partly_shifted_grids_overlap():
    dwi = _shifted(0, source="/data/case/dwi.nii.gz")
    assert check_overlap(dwi, _shifted(0)) == pytest.approx(1.0)
    assert check_overlap(dwi, _shifted(30)) == pytest.approx(0.7)
    # a different grid (1.5 mm) covering the same field of view
    assert overlap_fraction(dwi, _shifted(0, spacing=1.5, shape=(66, 66, 40))) > 0.95


def test_far_apart_images_rejected():
    dwi = _shifted(0, source="/data/case/dwi.nii.gz")
    err = _raises(check_overlap, dwi, _shifted(1000), match="DWI and ADC do not overlap in physical space")
    assert "0%" in err.problem and "/data/case/dwi.nii.gz" in err.problem
    _raises(check_overlap, dwi, _shifted(60), match="do not overlap")  # 40% < 50%


def test_overlap_rejects_degenerate_affine():
    dwi = _shifted(0, source="/data/case/dwi.nii.gz")
    _raises(check_overlap, dwi, _img(affine=np.diag([0.0, 1, 1, 1])), match="degenerate")
