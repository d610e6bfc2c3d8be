"""ADC unit detection and conversion to the canonical unit of deepisles, 10^-3 mm^2/s.

Scanners and tools store ADC maps in different units: 10^-3 mm^2/s (tissue ~0.7-0.9, CSF ~3; ISLES'22),
10^-6 mm^2/s (tissue ~700-900; Siemens/GE DICOM, usually as integers) or plain mm^2/s (tissue ~0.0008).
Nothing in the file says which, so the unit is read off the values:

* statistic: the median of the positive, finite voxels (inside ``mask`` when one is given), after dropping
  near-zero background (values below 1% of the 99th percentile of those voxels). For a brain this lands
  between tissue (~0.8) and CSF (~3) in 10^-3 mm^2/s;
* the median must fall in one of three windows, each a factor 25 wide around the physiological range:

  ============================  =====================  ==============================
  unit                          median window          scale to 10^-3 mm^2/s
  ============================  =====================  ==============================
  ``1e-3 mm2/s``                0.2 .. 5               1
  ``1e-6 mm2/s``                200 .. 5000            0.001
  ``mm2/s``                     0.0002 .. 0.005        1000
  ============================  =====================  ==============================

* anything else (e.g. a median of 20 or 1e5, or no positive voxel) is an :class:`InputError`: better to
  stop than to segment with thresholds off by a factor of 10.
"""

from __future__ import annotations

import numpy as np

from deepisles.errors import InputError
from deepisles.io.image import Image

CANONICAL_UNIT = "1e-3 mm2/s"

#: (unit name, lowest median, highest median, factor that converts the unit to 10^-3 mm^2/s)
ADC_UNITS: tuple[tuple[str, float, float, float], ...] = (
    ("1e-3 mm2/s", 0.2, 5.0, 1.0),
    ("1e-6 mm2/s", 200.0, 5000.0, 1e-3),
    ("mm2/s", 0.0002, 0.005, 1e3),
)

MIN_VOXELS = 10


def _expected() -> str:
    return "; ".join(f"{name}: {lo:g}-{hi:g}" for name, lo, hi, _ in ADC_UNITS)


def adc_median(adc: Image, mask: np.ndarray | None = None) -> float:
    """Robust typical ADC value: median of positive finite voxels above 1% of their 99th percentile."""
    data = np.asarray(adc.data)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != data.shape[: mask.ndim]:
            raise ValueError(f"mask shape {mask.shape} does not match ADC shape {data.shape}")
        data = data[mask]
    v = data[np.isfinite(data) & (data > 0)] if np.issubdtype(data.dtype, np.floating) else data[data > 0]
    v = v.astype(np.float64, copy=False)
    if v.size < MIN_VOXELS:
        raise InputError(
            adc.source or None,
            f"ADC image has only {v.size} positive voxels{' inside the mask' if mask is not None else ''}; "
            "cannot determine its unit",
        )
    v = v[v >= 0.01 * np.percentile(v, 99)]
    return float(np.median(v))


def detect_adc_unit(adc: Image, mask: np.ndarray | None = None) -> tuple[str, float]:
    """Return ``(unit name, scale)``; ``adc.data * scale`` is in 10^-3 mm^2/s. See the module docstring."""
    return _unit_for_median(adc_median(adc, mask), adc.source)


def _unit_for_median(med: float, source: str) -> tuple[str, float]:
    for name, lo, hi, scale in ADC_UNITS:
        if lo <= med <= hi:
            return name, scale
    raise InputError(
        source or None,
        f"ADC values (median {med:.4g}) match no known ADC unit; expected a brain median in {_expected()}",
    )


def to_canonical_adc(adc: Image, mask: np.ndarray | None = None) -> tuple[Image, dict]:
    """Convert ``adc`` to 10^-3 mm^2/s.

    Returns the converted image (float32 unless it was float64; ``meta['adc_unit']`` set) and
    ``info = {unit_detected, scale, median_before, median_after, canonical_unit}``.
    """
    med = adc_median(adc, mask)
    name, scale = _unit_for_median(med, adc.source)
    data = np.asarray(adc.data)
    dtype = np.dtype(np.float64 if data.dtype == np.float64 else np.float32)
    out = data.astype(dtype, copy=True)
    if scale != 1.0:
        out *= dtype.type(scale)
    info = {
        "unit_detected": name,
        "scale": scale,
        "median_before": med,
        "median_after": med * scale,
        "canonical_unit": CANONICAL_UNIT,
    }
    return adc.with_data(out, adc_unit=CANONICAL_UNIT, adc_unit_detected=name, adc_scale=scale), info
