"""Acquisition geometry: random scanner grids (spacing, axis order, flips, obliquity, FOV) and sampling the
template maps onto them with box-profile partial volume (several sub-samples per voxel, averaged)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from deepisles.synth.deform import Pullback, rotation

_SUBSAMPLE_MM = 1.8  # sub-sample spacing through thick slices (the template is 1.5 mm, smooth)
_CHUNK_POINTS = 1_200_000


@dataclass
class Grid:
    shape: tuple[int, int, int]
    affine: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def world(self, ijk: np.ndarray) -> np.ndarray:
        """Voxel indices (N, 3) or (3, N) -> scanner mm (3, N)."""
        ijk = np.asarray(ijk, dtype=np.float64)
        if ijk.shape[0] != 3:
            ijk = ijk.T
        return self.affine[:3, :3] @ ijk + self.affine[:3, 3:4]


def make_grid(
    rng: np.random.Generator,
    points_mm: np.ndarray,
    spacing_ras: tuple[float, float, float],
    *,
    max_oblique_deg: float,
    fov_inplane_mm: float | None,
    margin_mm: float,
    standard_order_p: float = 0.5,
) -> Grid:
    """A grid covering ``points_mm`` (N, 3) with voxel size ``spacing_ras`` along the (oblique) R, A, S axes.

    The array axes are a random permutation/flip of those physical axes (``standard_order_p``: probability of
    the common "LAS" storage order i -> left, j -> anterior, k -> superior).
    """
    angles = rng.normal(0.0, max_oblique_deg / 2.5, 3).clip(-max_oblique_deg, max_oblique_deg)
    rot = rotation(angles)  # columns: oblique R, A, S directions
    sp = np.asarray(spacing_ras, dtype=np.float64)
    proj = points_mm @ rot  # coordinates along the physical axes
    lo, hi = proj.min(axis=0) - margin_mm, proj.max(axis=0) + margin_mm
    n = np.ceil((hi - lo) / sp).astype(int) + 1
    centre = (lo + hi) / 2
    if fov_inplane_mm is not None:
        m = int(max(n[0] * sp[0], n[1] * sp[1], fov_inplane_mm) / sp[0])
        m += m % 2
        slack = m * sp[0] - (hi[:2] - lo[:2])
        centre[:2] += rng.uniform(-0.3, 0.3, 2) * np.maximum(slack, 0)  # brain not exactly centred
        n[:2] = m
    start = centre - (n - 1) / 2 * sp

    if rng.random() < standard_order_p:
        perm, flips = np.array([0, 1, 2]), np.array([-1, 1, 1])
    else:
        perm, flips = rng.permutation(3), rng.choice([-1, 1], 3)
    affine = np.eye(4)
    origin = np.zeros(3)
    shape = []
    for a in range(3):
        p = perm[a]
        affine[:3, a] = flips[a] * sp[p] * rot[:, p]
        shape.append(int(n[p]))
        first = start[p] if flips[a] > 0 else start[p] + (n[p] - 1) * sp[p]
        origin += first * rot[:, p]
    affine[:3, 3] = origin
    meta = {"obliquity_deg": [round(float(a), 2) for a in angles], "axis_order": [int(p) for p in perm]}
    return Grid(tuple(shape), affine, meta)


def subsample_factors(grid: Grid) -> tuple[int, int, int]:
    """Sub-samples per axis: ~1.6 mm apart through thick slices; in-plane only above 2 mm voxels (the
    template is smooth at that scale)."""
    sp = grid.spacing
    thick = int(np.argmax(sp)) if sp.max() > 1.5 * sp.min() else -1
    return tuple(
        int(max(1, np.ceil(s / (_SUBSAMPLE_MM if a == thick else 2.0) - 1e-6))) for a, s in enumerate(sp)
    )


def active_voxels(grid: Grid, pullback: Pullback, reach: np.ndarray) -> np.ndarray:
    """Indices (N, 3) of voxels that may contain brain.

    ``reach`` is the template brain dilated by a few mm; it is looked up on a coarse (~3 mm) lattice of the grid
    and each voxel takes the answer of its nearest lattice node.
    """
    stride = np.maximum(1, np.round(3.0 / grid.spacing)).astype(int)
    axes = [np.arange(0, n, s) for n, s in zip(grid.shape, stride, strict=True)]
    ijk = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)
    idx, _ = pullback(grid.world(ijk))
    node = ndi.map_coordinates(reach, idx, order=0, mode="constant", cval=0).reshape([len(a) for a in axes])
    sel = [
        np.clip(np.round(np.arange(n) / s).astype(int), 0, len(a) - 1)
        for n, s, a in zip(grid.shape, stride, axes, strict=True)
    ]
    return np.argwhere(node[np.ix_(*sel)])


def supersample(
    grid: Grid,
    voxels: np.ndarray,
    pullback: Pullback,
    maps: dict[str, np.ndarray],
    *,
    intensity: tuple[str, ...] = (),
    threshold: tuple[str, ...] = (),
    labels: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Average each template map over sub-samples of each voxel in ``voxels`` (N, 3).

    ``intensity`` maps are multiplied by the acquisition's intensity factor (EPI pile-up) before averaging;
    ``threshold`` maps are binarised at 0.5 per sub-sample first (their mean is the voxel's coverage).
    With ``labels`` also returns, per label k, the voxels (rows of ``voxels``) that it covers and the fraction.
    """
    f = subsample_factors(grid)
    offs = np.stack(
        np.meshgrid(*[(np.arange(k) + 0.5) / k - 0.5 for k in f], indexing="ij"), axis=-1
    ).reshape(-1, 3)
    kk = len(offs)
    out = {name: np.zeros(len(voxels), np.float32) for name in maps}
    per_label: dict[int, list] = {}
    step = max(1, _CHUNK_POINTS // kk)
    centres, jac_c = pullback.voxel_positions(grid.affine, voxels)
    for s in range(0, len(voxels), step):
        v = voxels[s : s + step]
        idx = pullback.subsample_indices(grid.affine, centres[:, s : s + step], offs)
        jac = None if jac_c is None else np.repeat(jac_c[s : s + step], kk)
        for name, arr in maps.items():
            val = ndi.map_coordinates(arr, idx, order=1, mode="constant", cval=0.0)
            if name in intensity and jac is not None:
                val = val * jac
            if name in threshold:
                val = (val >= 0.5).astype(np.float32)
            out[name][s : s + len(v)] = val.reshape(len(v), kk).mean(axis=1)
        if labels is not None and "lesion" in out:
            rows = np.flatnonzero(out["lesion"][s : s + len(v)] > 0)
            if rows.size:
                sub = idx.reshape(3, len(v), kk)[:, rows, :].reshape(3, -1)
                lab = ndi.map_coordinates(labels, sub, order=0, mode="constant", cval=0).reshape(
                    rows.size, kk
                )
                for k in np.unique(lab[lab > 0]):
                    cov = (lab == k).mean(axis=1)
                    keep = cov > 0
                    per_label.setdefault(int(k), []).append((rows[keep] + s, cov[keep]))
    merged = {
        k: (np.concatenate([r for r, _ in parts]), np.concatenate([c for _, c in parts]))
        for k, parts in per_label.items()
    }
    return out, merged
