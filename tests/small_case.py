"""A small valid DWI/ADC pair for CLI/API tests: a brain-like ellipsoid with a DWI-bright, ADC-dark blob
(shared by tests/test_cli.py, tests/test_output_safety.py, tests/test_pipeline.py)."""

from __future__ import annotations

import numpy as np


def case_arrays(seed: int = 0, shape: tuple[int, int, int] = (40, 44, 30)) -> tuple[np.ndarray, np.ndarray]:
    """``(dwi, adc)`` float32 arrays (ADC in 10^-3 mm^2/s): a 4-voxel-radius lesion at (26, 24, 15)."""
    rng = np.random.default_rng(seed)
    ii = np.indices(shape).astype(np.float32)
    c = np.array(shape, np.float32)[:, None, None, None] / 2
    brain = ((((ii - c) / np.array([17, 19, 13])[:, None, None, None]) ** 2).sum(0)) < 1
    lesion = (((ii - np.array([26, 24, 15])[:, None, None, None]) ** 2).sum(0)) < 16
    dwi = np.where(brain, 230 + 10 * rng.standard_normal(shape), 0).astype(np.float32)
    adc = np.where(brain, 0.8 + 0.03 * rng.standard_normal(shape), 0).astype(np.float32)
    dwi[lesion & brain] *= 2
    adc[lesion & brain] *= 0.55
    return dwi, adc
