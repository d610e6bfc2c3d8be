"""Resampling an :class:`Image` onto another image's grid, in physical space.

The value at each reference voxel is interpolated at the same *world* point in the source image: the
voxel-to-voxel map is ``inv(A_img) @ A_ref`` (reference voxel -> world -> source voxel). Copying the
reference affine onto the source array is never a substitute for this.

Voxels are treated as boxes: a reference voxel whose centre falls inside the source's physical extent
(source indices -0.5 .. n-0.5) gets an interpolated value (clamped to the edge voxels within the outer half
voxel); voxels outside get ``fill``.

**No interpolation when the voxel centres coincide.** When that map is a signed permutation plus whole-voxel
offsets (the same grid stored with its axes in another order and/or flipped, possibly shifted by whole voxels;
within :data:`EXACT_TOL` voxel at every corner of the reference grid), the array is transposed / flipped /
copied exactly instead (:func:`grid_permutation`); ``meta['resampled_from']['method']`` says which was done
(``"identical"``, ``"reordered"`` or ``"interpolated"``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from deepisles.io.image import Image

#: largest distance (in source voxels) between a reference voxel centre and the source voxel centre it is
#: taken from, for the exact (non-interpolating) path
EXACT_TOL = 1e-3


def voxel_to_voxel(img: Image, reference: Image) -> np.ndarray:
    """4x4 matrix taking reference voxel indices to (fractional) ``img`` voxel indices."""
    return np.linalg.inv(img.affine) @ reference.affine


def grid_permutation(
    img: Image, reference: Image, tol: float = EXACT_TOL
) -> tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]] | None:
    """``(axes, signs, offsets)`` when every reference voxel centre is a voxel centre of ``img``.

    That is: reference index ``r`` maps to ``img`` index ``s`` with ``s[axes[j]] = signs[j] * r[j] +
    offsets[axes[j]]`` for j = 0, 1, 2 (signs +-1, integer offsets), to within ``tol`` voxel over the whole
    reference grid. None when the grids really differ (rotation, other voxel size, sub-voxel shift).
    """
    m = voxel_to_voxel(img, reference)
    if not np.all(np.isfinite(m)):
        return None
    lin = m[:3, :3]
    p = np.rint(lin)
    if not (np.all(np.abs(p).sum(axis=0) == 1) and np.all(np.abs(p).sum(axis=1) == 1)):
        return None
    t = np.rint(m[:3, 3])
    shape = np.asarray(reference.shape[:3], dtype=np.float64)
    corners = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], np.float64) * (shape - 1)
    err = corners @ (lin - p).T + (m[:3, 3] - t)
    if np.abs(err).max() > tol:
        return None
    axes = tuple(int(np.flatnonzero(p[:, j])[0]) for j in range(3))
    signs = tuple(int(p[axes[j], j]) for j in range(3))
    return axes, signs, tuple(int(v) for v in t)


def _reorder(data: np.ndarray, perm, out_shape: tuple[int, int, int], fill: float, out_dtype) -> np.ndarray:
    """Exact copy of ``data`` onto the reference grid described by ``perm`` (see :func:`grid_permutation`)."""
    axes, signs, offsets = perm
    out = np.full(out_shape + data.shape[3:], fill, dtype=out_dtype)
    dst, src = [], []
    for j in range(3):
        i = axes[j]
        s_idx = signs[j] * np.arange(out_shape[j]) + offsets[i]
        ok = (s_idx >= 0) & (s_idx < data.shape[i])
        if not ok.any():
            return out
        dst.append(np.flatnonzero(ok))
        src.append(s_idx[ok])
    moved = np.transpose(data, (*axes, *range(3, data.ndim)))  # axis j of ``moved`` is img axis axes[j]
    out[np.ix_(*dst)] = moved[np.ix_(*src)]
    return out


def _inside_mask(m: np.ndarray, out_shape: tuple[int, int, int], in_shape: tuple[int, ...]) -> np.ndarray:
    """Reference voxels whose centre maps inside the source's physical extent (computed slice by slice)."""
    ni, nj, nk = out_shape
    ii = np.arange(ni, dtype=np.float64)[:, None]
    jj = np.arange(nj, dtype=np.float64)[None, :]
    inside = np.ones(out_shape, dtype=bool)
    tol = 1e-6
    for k in range(nk):
        sl = inside[:, :, k]
        for d in range(3):
            c = m[d, 0] * ii + m[d, 1] * jj + (m[d, 2] * k + m[d, 3])
            sl &= (c >= -0.5 - tol) & (c <= in_shape[d] - 0.5 + tol)
    return inside


def resample_to(img: Image, reference: Image, order: int = 1, fill: float = 0.0) -> Image:
    """Resample ``img`` onto ``reference``'s grid (shape[:3] and affine) through both affines.

    ``order``: spline order (0 nearest - use it for masks/labels -, 1 linear, 3 cubic). Order 0 keeps the
    input dtype; higher orders return float32 (float64 if the input was float64). A 4D image is resampled
    volume by volume. The result keeps ``img.source`` and ``img.meta`` (plus ``resampled_from``).
    """
    data = np.asarray(img.data)
    if data.ndim not in (3, 4):
        raise ValueError(f"resample_to needs a 3D or 4D image, got shape {data.shape}")
    out_shape = tuple(int(s) for s in reference.shape[:3])
    src = {"shape": list(img.shape[:3]), "affine": img.affine.tolist()}
    if img.same_grid(reference, atol=1e-6):
        meta = {**img.meta, "resampled_from": {**src, "method": "identical"}}
        return Image(data.copy(), reference.affine.copy(), img.source, meta)

    if order == 0:
        out_dtype = data.dtype
        work = data
    else:
        out_dtype = np.result_type(data.dtype, np.float32)
        work = data.astype(out_dtype, copy=False)
    perm = grid_permutation(img, reference)
    if perm is not None:
        axes, signs, offsets = perm
        info = {**src, "method": "reordered", "axes": list(axes), "flips": [s < 0 for s in signs],
                "offsets": list(offsets)}
        out = _reorder(work, perm, out_shape, fill, out_dtype)
        return Image(out, reference.affine.copy(), img.source, {**img.meta, "resampled_from": info})

    meta = {**img.meta, "resampled_from": {**src, "method": "interpolated"}}
    m = voxel_to_voxel(img, reference)

    def one(vol: np.ndarray) -> np.ndarray:
        return ndimage.affine_transform(
            vol,
            m[:3, :3],
            offset=m[:3, 3],
            output_shape=out_shape,
            order=order,
            mode="nearest",
            output=out_dtype,
        )

    if data.ndim == 3:
        out = one(work)
    else:
        out = np.stack([one(work[..., t]) for t in range(data.shape[3])], axis=-1)
    inside = _inside_mask(m, out_shape, data.shape[:3])
    out[~inside] = fill
    return Image(out, reference.affine.copy(), img.source, meta)
