"""resample_to: physical-space resampling checked against analytic functions on oblique/anisotropic grids."""

from __future__ import annotations

import numpy as np
import pytest

from deepisles.io.image import Image
from deepisles.preprocess.resample import resample_to, voxel_to_voxel


def _rot(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _affine(rot: np.ndarray, spacing, origin) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(spacing)
    a[:3, 3] = origin
    return a


def _world(shape, affine) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _sample(f, shape, affine) -> Image:
    return Image(f(_world(shape, affine)), affine)


def linear(xyz):
    return 3.0 + 0.5 * xyz[..., 0] - 0.25 * xyz[..., 1] + 0.125 * xyz[..., 2]


def smooth(xyz):
    return np.sin(xyz[..., 0] / 15.0) * np.cos(xyz[..., 1] / 20.0) + xyz[..., 2] / 40.0


# source: oblique, anisotropic (1 x 1.3 x 4 mm, like a thick-slice FLAIR); reference: another oblique,
# anisotropic grid (2 x 2 x 2.5 mm) inside the source's field of view
SRC_AFF = _affine(_rot(0.2, -0.15, 0.35), (1.0, 1.3, 4.0), (-40.0, -45.0, -30.0))
SRC_SHAPE = (90, 80, 24)
REF_AFF = _affine(_rot(-0.1, 0.25, -0.3), (2.0, 2.0, 2.5), (-10.0, -5.0, -5.0))
REF_SHAPE = (20, 18, 14)


def _inside(ref_shape, ref_aff, src_shape, src_aff, margin=1.0) -> np.ndarray:
    """Reference voxels whose centre lies at least ``margin`` source voxels inside the source grid."""
    ijk = (_world(ref_shape, ref_aff) - src_aff[:3, 3]) @ np.linalg.inv(src_aff[:3, :3]).T
    return np.all((ijk >= margin) & (ijk <= np.array(src_shape) - 1 - margin), axis=-1)


def test_linear_function_is_exact_with_linear_interpolation():
    src = _sample(linear, SRC_SHAPE, SRC_AFF)
    out = resample_to(src, Image(np.zeros(REF_SHAPE), REF_AFF))
    assert out.shape == REF_SHAPE
    np.testing.assert_allclose(out.affine, REF_AFF)
    inside = _inside(REF_SHAPE, REF_AFF, SRC_SHAPE, SRC_AFF, margin=0.0)
    assert inside.mean() > 0.8  # the test grid is meant to lie mostly inside the source
    expected = linear(_world(REF_SHAPE, REF_AFF))
    np.testing.assert_allclose(out.data[inside], expected[inside], atol=1e-4)


def test_smooth_function_close_with_linear_and_cubic():
    src = _sample(smooth, SRC_SHAPE, SRC_AFF)
    ref = Image(np.zeros(REF_SHAPE), REF_AFF)
    expected = smooth(_world(REF_SHAPE, REF_AFF))
    inside = _inside(REF_SHAPE, REF_AFF, SRC_SHAPE, SRC_AFF, margin=2.0)
    err1 = np.abs(resample_to(src, ref, order=1).data - expected)[inside].max()
    err3 = np.abs(resample_to(src, ref, order=3).data - expected)[inside].max()
    assert err1 < 0.01  # 4 mm slices: linear interpolation error ~ h^2 f''/8
    assert err3 < err1


def test_outside_field_of_view_is_fill():
    src = _sample(linear, (10, 10, 10), np.eye(4))
    ref_aff = np.eye(4)
    ref_aff[0, 3] = 5.0  # reference shifted +5 mm in x: voxels i >= 5 are outside (beyond index 9.5)
    out = resample_to(src, Image(np.zeros((10, 10, 10)), ref_aff), fill=-1.0)
    assert np.all(out.data[5:] == -1.0)
    np.testing.assert_allclose(out.data[:5], src.data[5:])


def test_not_an_affine_copy():
    """A grid shifted by whole voxels moves the content: resampling is not relabelling the affine."""
    data = np.zeros((12, 12, 12), np.float32)
    data[4, 5, 6] = 1.0
    src = Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    ref_aff = np.diag([2.0, 2.0, 2.0, 1.0])
    ref_aff[:3, 3] = [2.0, -4.0, 6.0]  # +1, -2, +3 voxels
    out = resample_to(src, Image(np.zeros((12, 12, 12)), ref_aff), order=0)
    assert out.data[3, 7, 3] == 1.0 and out.data.sum() == 1.0


def test_same_grid_is_identity():
    src = _sample(smooth, (8, 9, 10), SRC_AFF)
    out = resample_to(src, Image(np.zeros((8, 9, 10)), SRC_AFF.copy()))
    np.testing.assert_array_equal(out.data, src.data)
    assert out.data is not src.data


def test_nearest_keeps_labels_and_dtype():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=SRC_SHAPE).astype(np.uint8)
    src = Image(labels, SRC_AFF)
    out = resample_to(src, Image(np.zeros(REF_SHAPE), REF_AFF), order=0)
    assert out.data.dtype == np.uint8
    assert set(np.unique(out.data)) <= {0, 1, 2}
    # nearest neighbour: every value is the source value at the rounded source index
    m = voxel_to_voxel(src, out)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in REF_SHAPE], indexing="ij"), -1).reshape(-1, 3)
    s = np.rint(ijk @ m[:3, :3].T + m[:3, 3]).astype(int)
    ok = np.all((s >= 0) & (s < np.array(SRC_SHAPE)), axis=1)
    np.testing.assert_array_equal(out.data.reshape(-1)[ok], labels[tuple(s[ok].T)])


def test_4d_resampled_per_volume():
    a = _sample(linear, SRC_SHAPE, SRC_AFF).data
    src = Image(np.stack([a, 2 * a], axis=-1).astype(np.float32), SRC_AFF)
    out = resample_to(src, Image(np.zeros(REF_SHAPE), REF_AFF))
    assert out.shape == (*REF_SHAPE, 2) and out.data.dtype == np.float32
    np.testing.assert_allclose(out.data[..., 1], 2 * out.data[..., 0], rtol=1e-5, atol=1e-4)


def test_round_trip_down_and_up_on_real_adc(isles22_case):
    from deepisles.io.read import read_image

    adc = read_image(isles22_case["adc"], "adc")
    fine_aff = adc.affine.copy()
    fine_aff[:3, :3] = adc.affine[:3, :3] * 0.75  # 1.5 mm, same orientation and origin
    shape = tuple(int(np.ceil(n / 0.75)) for n in adc.shape)
    fine = resample_to(adc, Image(np.zeros(shape), fine_aff))
    back = resample_to(fine, adc)
    brain = adc.data > 0.2
    err = np.abs(back.data - adc.data)[brain]
    # two linear interpolations blur a map whose neighbouring voxels differ by ~0.23 (median)
    assert np.median(err) < 0.15
    assert np.mean(back.data[brain]) == pytest.approx(np.mean(adc.data[brain]), rel=0.03)
    assert np.corrcoef(back.data[brain], adc.data[brain])[0, 1] > 0.9


def test_matches_simpleitk_resample():
    import SimpleITK as sitk

    src = _sample(smooth, SRC_SHAPE, SRC_AFF)
    src.data = src.data + np.random.default_rng(0).normal(0, 0.1, SRC_SHAPE)  # not smooth: a real check
    ref = Image(np.zeros(REF_SHAPE), REF_AFF)
    ours = resample_to(src, ref)
    theirs = Image.from_sitk(
        sitk.Resample(src.to_sitk(), ref.to_sitk(), sitk.Transform(), sitk.sitkLinear, 0.0)
    )
    inside = _inside(REF_SHAPE, REF_AFF, SRC_SHAPE, SRC_AFF, margin=0.0)
    np.testing.assert_allclose(ours.data[inside], theirs.data[inside], atol=1e-5)


@pytest.mark.parametrize("order", [0, 1, 3])
def test_orders_run(order):
    src = _sample(linear, (6, 6, 6), SRC_AFF)
    assert resample_to(src, Image(np.zeros((5, 5, 5)), SRC_AFF), order=order).shape == (5, 5, 5)
