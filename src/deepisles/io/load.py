"""read_inputs(): read and validate the inputs of ``deepisles segment`` (no preprocessing).

Order (every user-caused problem raises :class:`InputError` naming the file, before anything is written):

1. read DWI, ADC (and FLAIR) - NIfTI / MetaImage / DICOM;
2. 4D DWI -> the b~1000 volume (b-values from ``bval_path``, else a ``.bval``/JSON next to the DWI, else the
   DICOM tags);
3. ``check_3d`` (+ a usable affine) for each image;
4. NaN/inf -> 0 (warning with the count);
5. ``check_not_empty``;
6. the same file given twice is refused; DWI and ADC must overlap in physical space (>= 50% of the smaller
   bounding box); a FLAIR that overlaps less only gets a warning (registration decides).

``max_voxels`` (default :data:`~deepisles.io.validate.DEFAULT_MAX_VOXELS`, None means the default) is passed to
:func:`~deepisles.io.read.read_image`: a file declaring more voxels is refused before its data is read.

Every image stays as stored (values and grid): the ADC unit and the ADC onto the DWI grid are
:func:`deepisles.preprocess.inputs.harmonise_inputs`' job (``preprocess.inputs.load_inputs`` does both steps),
registering the FLAIR onto the DWI is :mod:`deepisles.preprocess.register`'s.
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


@dataclass
class LoadedInputs:
    """The inputs of one case with what was done to them (``steps``, for report.json) and ``warnings``.

    After :func:`read_inputs` every image is as stored; after
    :func:`deepisles.preprocess.inputs.harmonise_inputs` the ADC is in 10^-3 mm^2/s on the DWI grid.
    """

    dwi: Image
    adc: Image
    flair: Image | None = None  # on its own grid
    steps: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


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


def read_inputs(
    dwi_path: str | Path,
    adc_path: str | Path,
    flair_path: str | Path | None = None,
    bval_path: str | Path | None = None,
    max_voxels: int | None = DEFAULT_MAX_VOXELS,
) -> LoadedInputs:
    """Read and check the inputs; return DWI (3D), ADC and FLAIR, each on its own grid in its stored values."""
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

    return LoadedInputs(dwi=dwi, adc=adc, flair=flair, steps=steps, warnings=warnings)
