"""load_inputs(): read, validate and harmonise the inputs of ``deepisles segment``.

Order (every user-caused problem raises :class:`InputError` naming the file, before anything is written):

1. read DWI, ADC (and FLAIR) - NIfTI / MetaImage / DICOM;
2. 4D DWI -> the b~1000 volume (b-values from ``bval_path``, else a ``.bval``/JSON next to the DWI, else the
   DICOM tags);
3. ``check_3d`` (+ a usable affine) for each image;
4. NaN/inf -> 0 (warning with the count);
5. ``check_not_empty``;
6. the same file given twice is refused; DWI and ADC must overlap in physical space (>= 50% of the smaller
   bounding box); a FLAIR that overlaps less only gets a warning (registration decides);
7. ADC unit -> 10^-3 mm^2/s;
8. ADC onto the DWI grid when the grids differ: when the voxel centres are the same (axes stored in another
   order / flipped / shifted by whole voxels) the array is reordered exactly (``steps['adc_to_dwi_grid'] ==
   'reordered'``, ``adc_resampled`` False); otherwise it is interpolated linearly in physical space
   (``'interpolated'``, ``adc_resampled`` True, with a warning).

``max_voxels`` (default :data:`~deepisles.io.validate.DEFAULT_MAX_VOXELS`, None means the default) is passed to
:func:`~deepisles.io.read.read_image`: a file declaring more voxels is refused before its data is read.

The FLAIR stays on its own grid: registration onto the DWI is another module's job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deepisles.errors import InputError
from deepisles.io.image import Image
from deepisles.io.read import find_bvals, read_bvals_file, read_image, select_dwi_volume
from deepisles.io.validate import (
    DEFAULT_MAX_VOXELS,
    MIN_OVERLAP_FRACTION,
    check_3d,
    check_affine,
    check_not_empty,
    check_overlap,
    overlap_fraction,
    role_label,
    sanitize_nonfinite,
)
from deepisles.preprocess.resample import resample_to
from deepisles.preprocess.units import to_canonical_adc


@dataclass
class LoadedInputs:
    dwi: Image
    adc: Image  # canonical unit 10^-3 mm^2/s, on the DWI grid
    flair: Image | None = None  # on its own grid
    steps: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _grid(img: Image) -> dict:
    return {
        "shape": list(img.shape[:3]),
        "spacing_mm": [round(s, 4) for s in img.spacing],
    }


def _prepare(img: Image, role: str, steps: dict, warnings: list[str]) -> Image:
    img = check_3d(img, role)
    check_affine(img, role)
    img, warn = sanitize_nonfinite(img, role)
    warnings.extend(warn)
    steps["nonfinite"][role] = int(img.meta.get("nonfinite", 0))
    check_not_empty(img, role)
    return img


def _describe(img: Image) -> dict:
    keep = ("format", "original_dtype", "series_uid", "series_description", "series_rule", "bvals")
    return {"path": img.source, **{k: img.meta[k] for k in keep if k in img.meta}}


def load_inputs(
    dwi_path: str | Path,
    adc_path: str | Path,
    flair_path: str | Path | None = None,
    bval_path: str | Path | None = None,
    max_voxels: int | None = DEFAULT_MAX_VOXELS,
) -> LoadedInputs:
    """Read and check the inputs; return DWI (3D), ADC (10^-3 mm^2/s, DWI grid), FLAIR (own grid)."""
    warnings: list[str] = []
    steps: dict = {"nonfinite": {}}

    paths = {"dwi": Path(dwi_path), "adc": Path(adc_path)}
    if flair_path is not None:
        paths["flair"] = Path(flair_path)
    seen: dict[Path, str] = {}
    for role, p in paths.items():
        if not p.is_file():
            continue  # a DICOM folder may hold the series of several roles
        key = p.resolve()
        if key in seen:
            raise InputError(p, f"the same file is given as {role_label(seen[key])} and {role_label(role)}")
        seen[key] = role

    # 1. read
    dwi = read_image(paths["dwi"], "dwi", max_voxels=max_voxels)
    adc = read_image(paths["adc"], "adc", max_voxels=max_voxels)
    flair = read_image(paths["flair"], "flair", max_voxels=max_voxels) if "flair" in paths else None
    for img in (dwi, adc, flair):
        if img is not None:
            warnings.extend(img.meta.get("read_warnings", []))
    steps["read"] = {"dwi": _describe(dwi), "adc": _describe(adc)}
    if flair is not None:
        steps["read"]["flair"] = _describe(flair)

    # 2. 4D DWI
    if bval_path is not None:
        bvals, bsource = read_bvals_file(bval_path), str(bval_path)
    else:
        bvals, bsource = find_bvals(paths["dwi"]), "file next to the DWI"
        if bvals is None and dwi.meta.get("bvals") is not None:
            bvals, bsource = list(dwi.meta["bvals"]), "DICOM tags"
    if bvals is None:
        bsource = None
    if np.asarray(dwi.data).ndim == 4:
        dwi, warn = select_dwi_volume(dwi, bvals)
        warnings.extend(warn)
        steps["dwi_volume"] = {**dwi.meta.get("dwi_volume", {}), "bvals_source": bsource}
    else:
        steps["dwi_volume"] = None

    # 3-5. dimensionality, affine, NaN/inf, emptiness
    dwi = _prepare(dwi, "dwi", steps, warnings)
    adc = _prepare(adc, "adc", steps, warnings)
    if flair is not None:
        flair = _prepare(flair, "flair", steps, warnings)

    # 6. same data twice, physical overlap
    if dwi.shape == adc.shape and np.array_equal(np.asarray(dwi.data), np.asarray(adc.data)):
        raise InputError(paths["adc"], "ADC file holds exactly the same voxels as the DWI file")
    steps["overlap_dwi_adc"] = round(check_overlap(dwi, adc), 4)
    if flair is not None:
        frac = overlap_fraction(dwi, flair)
        steps["overlap_dwi_flair"] = round(frac, 4)
        if frac < MIN_OVERLAP_FRACTION:
            warnings.append(
                f"FLAIR {flair.source}: its bounding box shares only {100 * frac:.0f}% with the DWI's in "
                "physical space; registration may fail"
            )

    # 7. ADC unit
    adc, unit_info = to_canonical_adc(adc)
    steps["adc_unit"] = unit_info

    # 8. ADC onto the DWI grid
    steps["grids"] = {"dwi": _grid(dwi), "adc": _grid(adc)}
    if flair is not None:
        steps["grids"]["flair"] = _grid(flair)
    if adc.same_grid(dwi):
        steps["adc_resampled"] = False
        steps["adc_to_dwi_grid"] = "same grid"
        steps["adc_resample_reason"] = "ADC is on the DWI grid"
    else:
        reason = (
            f"ADC grid {adc.shape[:3]} at {tuple(round(s, 3) for s in adc.spacing)} mm differs from the DWI grid "
            f"{dwi.shape[:3]} at {tuple(round(s, 3) for s in dwi.spacing)} mm"
        )
        if adc.shape[:3] == dwi.shape[:3]:
            shift = float(np.abs(adc.affine - dwi.affine).max())
            reason = f"ADC affine differs from the DWI affine (max element difference {shift:.3g})"
        adc = resample_to(adc, dwi, order=1, fill=0.0)
        how = adc.meta.get("resampled_from", {})
        if how.get("method") == "reordered":
            axes, flipped, offs, n_src = how["axes"], how["flips"], how["offsets"], how["shape"]
            shifts = [offs[a] - (n_src[a] - 1 if f else 0) for a, f in zip(axes, flipped, strict=True)]
            parts = [f"DWI axes i, j, k are ADC axes {', '.join('ijk'[a] for a in axes)}"]
            if any(flipped):
                parts.append("flipped along " + ", ".join("ijk"[j] for j in range(3) if flipped[j]))
            if any(shifts):
                parts.append(f"shifted by {tuple(shifts)} voxels")
            what = "; ".join(parts)
            steps["adc_resampled"] = False
            steps["adc_to_dwi_grid"] = "reordered"
            steps["adc_resample_reason"] = (
                f"{reason}, but the voxel centres are the same ({what}); the voxels were reordered exactly, "
                "not interpolated"
            )
            if any(shifts):  # part of the DWI grid lies outside the ADC's
                warnings.append(f"ADC {adc.source}: {reason}; its voxels were moved exactly onto the DWI grid "
                                f"({what}); DWI voxels outside the ADC's field of view get ADC 0")
        else:
            steps["adc_resampled"] = True
            steps["adc_to_dwi_grid"] = "interpolated"
            steps["adc_resample_reason"] = reason + "; resampled linearly onto the DWI grid in physical space"
            warnings.append(f"ADC {adc.source}: {reason}; resampled onto the DWI grid")

    return LoadedInputs(dwi=dwi, adc=adc, flair=flair, steps=steps, warnings=warnings)
