"""Checks on input images: declared size and voxel sizes (from headers, before reading data), dimensionality,
usable affine, emptiness, NaN/inf, DWI/ADC physical overlap.

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

#: the most voxels (all volumes of a 4D image, all components of a vector image together) an input file may
#: declare; checked from the header before any voxel data is read. ``--max-voxels`` raises it.
DEFAULT_MAX_VOXELS = 1 << 30

#: voxel sizes (mm) outside this range make a grid unusable (0, denormal, or a header in the wrong unit)
MIN_VOXEL_MM = 1e-4
MAX_VOXEL_MM = 1e3


def role_label(role: str) -> str:
    """'dwi' -> 'DWI' (used at the start of user-facing messages)."""
    return ROLE_LABELS.get(role, role)


def _path(img: Image) -> str | None:
    return img.source or None


def _fmt_count(n: int) -> str:
    return f"{n:,}"


def _fmt_bytes(n: float) -> str:
    units = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n /= 1024.0
        i += 1
    return f"{n:.0f} bytes" if i == 0 else f"{n:.1f} {units[i]}"


def check_declared_size(
    path: object, label: str, shape: tuple[int, ...], max_voxels: int = DEFAULT_MAX_VOXELS,
    itemsize: int | None = None, what: str = "file",
) -> int:
    """Refuse a declared grid before its voxels are read: an axis of length 0, or more than ``max_voxels``.

    ``shape`` is what the header declares (every axis, 4th/5th included; components of vector pixels as an
    extra axis). Returns the voxel count. ``label`` starts the message ("DWI"), ``what`` names the thing
    ("file", "DICOM series").
    """
    shape = tuple(int(s) for s in shape)
    dims = " x ".join(str(s) for s in shape)
    if any(s < 0 for s in shape):
        raise InputError(path, f"{label} {what} declares a negative axis length (shape {dims})")
    if any(s == 0 for s in shape):
        raise InputError(path, f"{label} {what} declares an axis of length 0 (shape {dims}): it has no voxels")
    n = 1
    for s in shape:
        n *= s
    if n > max_voxels:
        size = f", {_fmt_bytes(n * itemsize)} of voxel data" if itemsize else ""
        raise InputError(
            path,
            f"{label} {what} declares {dims} = {_fmt_count(n)} voxels{size}, more than the limit of "
            f"{_fmt_count(max_voxels)} voxels (a damaged or hostile header?); if the image is genuine, "
            "raise the limit with --max-voxels",
        )
    return n


def check_voxel_sizes(path: object, label: str, sizes, source: str) -> None:
    """Refuse voxel sizes (mm) that are 0, non-finite or absurd; ``source`` says which header field gave them."""
    vals = [float(v) for v in sizes]
    shown = "[" + ", ".join(f"{v:g}" for v in vals) + "]"
    if not all(np.isfinite(vals)):
        raise InputError(path, f"{label} file has non-finite voxel sizes {shown} ({source})")
    if any(v == 0 for v in vals):
        raise InputError(
            path, f"{label} file has a voxel size of 0 {shown} ({source}): the grid has no physical size"
        )
    if any(abs(v) < MIN_VOXEL_MM or abs(v) > MAX_VOXEL_MM for v in vals):
        raise InputError(
            path,
            f"{label} file has absurd voxel sizes {shown} mm ({source}; expected {MIN_VOXEL_MM:g}..{MAX_VOXEL_MM:g})",
        )


def check_3d(img: Image, role: str) -> Image:
    """Return ``img`` as a 3D image or raise InputError.

    A 4D (or 5D...) image whose extra axes are all singletons is squeezed to 3D. 2D images (``ndim < 3``,
    or a 3D grid with a spatial axis of length 1, i.e. a single slice) and 4D images with several volumes
    are rejected (a 4D DWI must go through :func:`deepisles.io.read.select_dwi_volume` first).
    """
    label = role_label(role)
    data = np.asarray(img.data)
    if data.size == 0:
        raise InputError(
            _path(img), f"{label} image has an axis of length 0 (shape {tuple(data.shape)}): it has no voxels"
        )
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
    if np.any(spacing < MIN_VOXEL_MM) or np.any(spacing > MAX_VOXEL_MM):
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
    """Reject images with no voxels, no finite value, only zeros, or one constant value.

    NaN/inf voxels already set to 0 by :func:`sanitize_nonfinite` still count as NaN/inf here (its
    ``meta['nonfinite']``): an all-NaN image is reported as such, not as "all voxels are 0".
    """
    label = role_label(role)
    data = np.asarray(img.data)
    if data.size == 0:
        raise InputError(_path(img), f"{label} image is empty (no voxels, shape {tuple(data.shape)})")
    floating = np.issubdtype(data.dtype, np.floating)
    finite = data[np.isfinite(data)] if floating else data.ravel()
    n_bad = int(img.meta.get("nonfinite", 0) or 0) + (data.size - finite.size)
    if finite.size == 0 or n_bad >= data.size:
        raise InputError(
            _path(img),
            f"{label} image is empty: no finite voxel values (all {_fmt_count(data.size)} voxels are NaN/inf)",
        )
    lo, hi = finite.min(), finite.max()
    if lo == hi:
        if n_bad:
            what = (f"every finite voxel is {float(lo):g}; the other {_fmt_count(n_bad)} of "
                    f"{_fmt_count(data.size)} are NaN/inf")
        else:
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
