"""Checks on input images: dimensionality, usable affine, emptiness, NaN/inf, DWI/ADC physical overlap.

Every check that fails because of the user's file raises :class:`~deepisles.errors.InputError` naming that
file (``Image.source``) with a short one-line problem.
"""

from __future__ import annotations

import numpy as np

from deepisles.errors import InputError
from deepisles.io.image import Image

ROLE_LABELS = {"dwi": "DWI", "adc": "ADC", "flair": "FLAIR", "mask": "mask"}

#: two images "overlap" when their world bounding boxes share at least this fraction of the smaller box
MIN_OVERLAP_FRACTION = 0.5


def role_label(role: str) -> str:
    """'dwi' -> 'DWI' (used at the start of user-facing messages)."""
    return ROLE_LABELS.get(role, role)


def _path(img: Image) -> str | None:
    return img.source or None


def check_3d(img: Image, role: str) -> Image:
    """Return ``img`` as a 3D image or raise InputError.

    A 4D (or 5D...) image whose extra axes are all singletons is squeezed to 3D. 2D images (``ndim < 3``,
    or a 3D grid with a spatial axis of length 1, i.e. a single slice) and 4D images with several volumes
    are rejected (a 4D DWI must go through :func:`deepisles.io.read.select_dwi_volume` first).
    """
    label = role_label(role)
    data = np.asarray(img.data)
    if data.ndim > 3:
        extra = data.shape[3:]
        if all(s == 1 for s in extra):
            data = data.reshape(data.shape[:3])
            img = Image(data, img.affine.copy(), img.source, {**img.meta, "squeezed_from": list(extra)})
        else:
            hint = " (several volumes: choose the b~1000 one or give b-values)" if role == "dwi" else ""
            raise InputError(
                _path(img), f"{label} image is {data.ndim}D {tuple(data.shape)}; expected a 3D image{hint}"
            )
    if data.ndim < 3 or (min(data.shape) == 1 and data.size > 0):
        raise InputError(_path(img), f"{label} image is 2D {tuple(data.shape)}; expected a 3D volume")
    return img


def check_affine(img: Image, role: str) -> None:
    """Reject affines that cannot map voxels to the world: non-finite, zero/absurd voxel size, singular."""
    label = role_label(role)
    a = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise InputError(_path(img), f"{label} image has a non-finite affine (voxel-to-world matrix)")
    if not np.allclose(a[3], [0, 0, 0, 1]):
        raise InputError(_path(img), f"{label} image affine has an invalid last row {a[3].tolist()}")
    m = a[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    if np.any(spacing < 1e-4) or np.any(spacing > 1e3):
        raise InputError(
            _path(img),
            f"{label} image has a degenerate affine (voxel sizes {np.round(spacing, 6).tolist()} mm)",
        )
    direction = m / spacing
    if abs(np.linalg.det(direction)) < 1e-3:
        raise InputError(
            _path(img), f"{label} image has a degenerate (non-invertible) affine: its axes are collinear"
        )


def check_not_empty(img: Image, role: str) -> None:
    """Reject images with no voxels, only zeros, or one constant value."""
    label = role_label(role)
    data = np.asarray(img.data)
    if data.size == 0:
        raise InputError(_path(img), f"{label} image is empty (no voxels, shape {tuple(data.shape)})")
    finite = data[np.isfinite(data)] if np.issubdtype(data.dtype, np.floating) else data.ravel()
    if finite.size == 0:
        raise InputError(_path(img), f"{label} image is empty (no finite voxel values)")
    lo, hi = finite.min(), finite.max()
    if lo == hi:
        what = "all voxels are 0" if lo == 0 else f"every voxel has the value {float(lo):g}"
        raise InputError(_path(img), f"{label} image is empty ({what})")


def sanitize_nonfinite(img: Image, role: str) -> tuple[Image, list[str]]:
    """Set NaN/inf voxels to 0; return the image and a warning stating how many there were.

    ``meta['nonfinite']`` holds the count (0 when clean). Integer images are returned unchanged.
    """
    data = np.asarray(img.data)
    if not np.issubdtype(data.dtype, np.floating):
        return img.with_data(data, nonfinite=0), []
    bad = ~np.isfinite(data)
    n = int(bad.sum())
    if n == 0:
        return img.with_data(data, nonfinite=0), []
    clean = data.copy()
    clean[bad] = 0
    n_nan = int(np.isnan(data).sum())
    pct = 100.0 * n / data.size
    msg = (
        f"{role_label(role)} {img.source or 'image'}: {n} non-finite voxels "
        f"({n_nan} NaN, {n - n_nan} inf; {pct:.2g}% of the image) set to 0"
    )
    return img.with_data(clean, nonfinite=n), [msg]


def world_bounds(img: Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned world (RAS mm) bounding box of the grid's physical extent.

    All 8 corners of the voxel block (voxel edges, i.e. indices -0.5 and n-0.5) go through the affine.
    """
    shape = np.asarray(img.shape[:3], dtype=np.float64)
    corners = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], dtype=np.float64)
    ijk = corners * shape - 0.5
    xyz = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
    return xyz.min(axis=0), xyz.max(axis=0)


def overlap_fraction(a: Image, b: Image) -> float:
    """Intersection volume of the two world bounding boxes / volume of the smaller box (0..1)."""
    alo, ahi = world_bounds(a)
    blo, bhi = world_bounds(b)
    inter = np.clip(np.minimum(ahi, bhi) - np.maximum(alo, blo), 0, None).prod()
    smaller = min((ahi - alo).prod(), (bhi - blo).prod())
    return float(inter / smaller) if smaller > 0 else 0.0


def _fmt_box(img: Image) -> str:
    lo, hi = world_bounds(img)
    return "[" + ", ".join(f"{x:.0f}..{y:.0f}" for x, y in zip(lo, hi, strict=True)) + "] mm"


def check_overlap(
    dwi: Image, adc: Image, min_fraction: float = MIN_OVERLAP_FRACTION, other_role: str = "adc"
) -> float:
    """Require the two images' world bounding boxes to overlap by ``min_fraction`` of the smaller one.

    Returns the overlap fraction. The error names the second (ADC) file and shows both boxes (RAS mm).
    """
    check_affine(dwi, "dwi")
    check_affine(adc, other_role)
    frac = overlap_fraction(dwi, adc)
    if frac < min_fraction:
        other = role_label(other_role)
        raise InputError(
            _path(adc),
            f"DWI and {other} do not overlap in physical space (shared bounding box {100 * frac:.0f}% of the "
            f"smaller image, need {100 * min_fraction:.0f}%; DWI {_fmt_box(dwi)}, {other} {_fmt_box(adc)}; "
            f"DWI file {dwi.source or '?'})",
        )
    return frac
