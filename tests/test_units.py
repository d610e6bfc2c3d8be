"""ADC unit detection and conversion to 10^-3 mm^2/s."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from deepisles.errors import InputError
from deepisles.io.image import Image
from deepisles.io.read import read_image
from deepisles.preprocess.units import adc_median, detect_adc_unit, to_canonical_adc

SRC = "/data/adc.nii.gz"


def _synthetic_adc(scale: float, dtype=np.float32, seed=0) -> Image:
    """A 'brain' (tissue ~0.8, CSF ~3, lesion ~0.5 in 10^-3 mm^2/s) inside zero background, times scale."""
    rng = np.random.default_rng(seed)
    data = np.zeros((30, 30, 20))
    brain = np.zeros(data.shape, bool)
    brain[5:25, 5:25, 3:17] = True
    data[brain] = rng.normal(0.8, 0.1, brain.sum())
    data[12:18, 12:18, 8:12] = rng.normal(3.0, 0.3, (6, 6, 4))  # ventricles
    data[6:9, 6:9, 4:7] = 0.5  # lesion
    data = data * scale
    if np.issubdtype(dtype, np.integer):
        data = np.round(data)
    return Image(data.astype(dtype), np.eye(4), SRC)


@pytest.mark.parametrize(
    "scale,dtype,unit,factor",
    [
        (1.0, np.float32, "1e-3 mm2/s", 1.0),
        (1e3, np.float32, "1e-6 mm2/s", 1e-3),
        (1e3, np.int16, "1e-6 mm2/s", 1e-3),
        (1e3, np.uint16, "1e-6 mm2/s", 1e-3),
        (1e-3, np.float64, "mm2/s", 1e3),
    ],
)
def test_synthetic_units(scale, dtype, unit, factor):
    img = _synthetic_adc(scale, dtype)
    assert detect_adc_unit(img) == (unit, factor)
    out, info = to_canonical_adc(img)
    assert info["unit_detected"] == unit and info["scale"] == factor
    assert 0.7 < info["median_after"] < 1.0
    assert info["median_before"] == pytest.approx(info["median_after"] / factor)
    assert out.data.dtype in (np.float32, np.float64)
    ref = _synthetic_adc(1.0, np.float64).data
    np.testing.assert_allclose(out.data, ref, atol=2e-3 if np.issubdtype(dtype, np.integer) else 1e-5)
    assert out.meta["adc_unit"] == "1e-3 mm2/s"


@pytest.mark.parametrize("scale", [20.0, 100.0, 1e5 / 0.8, 0.02, 1e-5])
def test_values_fitting_no_unit_rejected(scale):
    img = _synthetic_adc(scale)
    with pytest.raises(InputError, match="match no known ADC unit; expected") as ei:
        detect_adc_unit(img)
    assert ei.value.path == SRC
    with pytest.raises(InputError):
        to_canonical_adc(img)


def test_median_20_in_message():
    data = np.zeros((10, 10, 10), np.float32)
    data[2:8, 2:8, 2:8] = 20.0
    with pytest.raises(InputError, match=r"ADC values \(median 20\)"):
        detect_adc_unit(Image(data, np.eye(4), SRC))


def test_no_positive_voxels_rejected():
    with pytest.raises(InputError, match="positive voxels"):
        detect_adc_unit(Image(-np.ones((5, 5, 5), np.float32), np.eye(4), SRC))


def test_background_noise_and_mask():
    img = _synthetic_adc(1e3)
    data = img.data.copy()
    rng = np.random.default_rng(1)
    bg = data == 0
    data[bg] = rng.uniform(0, 5, bg.sum())  # faint positive background noise (<1% of the 99th pct)
    noisy = Image(data, img.affine, SRC)
    assert detect_adc_unit(noisy)[0] == "1e-6 mm2/s"
    assert 700 < adc_median(noisy, mask=~bg) < 1000


def test_nan_voxels_are_ignored():
    img = _synthetic_adc(1.0)
    data = img.data.copy()
    data[0, 0, :] = np.nan
    assert detect_adc_unit(Image(data, np.eye(4), SRC))[0] == "1e-3 mm2/s"


@pytest.mark.parametrize(
    "scale,dtype,unit",
    [(1.0, np.float32, "1e-3 mm2/s"), (1e3, np.int16, "1e-6 mm2/s"), (1e-3, np.float64, "mm2/s")],
)
def test_real_adc_in_three_units(isles22_case, tmp_path, scale, dtype, unit):
    real = read_image(isles22_case["adc"], "adc")
    scaled = np.asarray(real.data, dtype=np.float64) * scale
    if np.issubdtype(dtype, np.integer):
        scaled = np.round(scaled)
    p = tmp_path / "adc.nii.gz"
    nib.save(nib.Nifti1Image(scaled.astype(dtype), real.affine), p)
    img = read_image(p, "adc")
    name, factor = detect_adc_unit(img)
    assert name == unit
    out, info = to_canonical_adc(img)
    assert 0.7 < info["median_after"] < 1.5
    brain = real.data > 0
    err = np.abs(out.data[brain] - real.data[brain])
    assert err.max() < (1e-3 if np.issubdtype(dtype, np.integer) else 1e-5)
