"""Resampling an :class:`Image` onto another image's grid, in physical space.

The value at each reference voxel is interpolated at the same *world* point in the source image: the
voxel-to-voxel map is ``inv(A_img) @ A_ref`` (reference voxel -> world -> source voxel). Copying the
reference affine onto the source array is never a substitute for this.

Voxels are treated as boxes: a reference voxel whose centre falls inside the source's physical extent
(source indices -0.5 .. n-0.5) gets an interpolated value (clamped to the edge voxels within the outer half
voxel); voxels outside get ``fill``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from deepisles.io.image import Image


def voxel_to_voxel(img: Image, reference: Image) -> np.ndarray:
    """4x4 matrix taking reference voxel indices to (fractional) ``img`` voxel indices."""
    return np.linalg.inv(img.affine) @ reference.affine


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
    meta = {**img.meta, "resampled_from": {"shape": list(img.shape[:3]), "affine": img.affine.tolist()}}
    if img.same_grid(reference, atol=1e-6):
        return Image(data.copy(), reference.affine.copy(), img.source, meta)

    m = voxel_to_voxel(img, reference)
    if order == 0:
        out_dtype = data.dtype
        work = data
    else:
        out_dtype = np.result_type(data.dtype, np.float32)
        work = data.astype(out_dtype, copy=False)

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
