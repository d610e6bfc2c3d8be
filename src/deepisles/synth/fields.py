"""Smooth random fields (lesion boundaries, texture, territory jitter, bias fields) and Gaussian blobs."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float) -> np.ndarray:
    """Gaussian-smoothed white noise with unit standard deviation (float32).

    Wide kernels are drawn on a coarser grid and interpolated up, which is much cheaper and looks the same.
    """
    shape = tuple(int(s) for s in shape)
    f = max(1, int(round(sigma_vox / 1.5)))
    if f == 1:
        n = ndi.gaussian_filter(
            rng.standard_normal(shape, dtype=np.float32), sigma_vox, mode="reflect", truncate=3.0
        )
    else:
        coarse = tuple(int(np.ceil(s / f)) + 2 for s in shape)
        c = ndi.gaussian_filter(
            rng.standard_normal(coarse, dtype=np.float32), sigma_vox / f, mode="reflect", truncate=3.0
        )
        n = interp_separable(c, [(np.arange(s) + f) / f for s in shape])
    return n / max(float(n.std()), 1e-6)


def interp_separable(c: np.ndarray, positions: list[np.ndarray]) -> np.ndarray:
    """Trilinear interpolation of ``c`` on the tensor grid of fractional indices ``positions`` (one per axis).

    Axis by axis with ``np.take``: much faster than ``ndimage.zoom``/``map_coordinates`` for dense outputs.
    Positions outside ``c`` are clamped to its border.
    """
    out = np.asarray(c, dtype=np.float32)
    for a, pos in enumerate(positions):
        n = out.shape[a]
        pos = np.clip(np.asarray(pos, dtype=np.float64), 0, n - 1)
        i0 = np.minimum(np.floor(pos).astype(np.intp), max(n - 2, 0))
        i1 = np.minimum(i0 + 1, n - 1)
        w = (pos - i0).astype(np.float32)
        shape = [1] * out.ndim
        shape[a] = len(pos)
        w = w.reshape(shape)
        out = np.take(out, i0, axis=a) * (1 - w) + np.take(out, i1, axis=a) * w
    return out


def gaussian_blob(centre, radius_vox, shape, reach: float = 2.5) -> tuple[tuple[slice, ...], np.ndarray]:
    """An axis-aligned Gaussian blob ``exp(-sum(((x - centre) / radius)^2))`` (float32) on the box of ``reach``
    radii around ``centre`` (voxel indices), clipped to ``shape``; returns the box's slices and the weights."""
    centre, radius_vox = np.asarray(centre), np.asarray(radius_vox)
    lo = np.maximum(centre - np.ceil(reach * radius_vox).astype(int), 0)
    hi = np.minimum(centre + np.ceil(reach * radius_vox).astype(int) + 1, shape)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    grid = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij")
    d2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radius_vox, strict=True))
    return sl, np.exp(-d2).astype(np.float32)
