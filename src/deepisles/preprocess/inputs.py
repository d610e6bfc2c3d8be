"""harmonise_inputs(): the read and validated inputs -> DWI and ADC on one grid, ADC in canonical units.

Follows :func:`deepisles.io.load.read_inputs` (steps 1-6 there):

7. ADC unit -> 10^-3 mm^2/s (:func:`deepisles.preprocess.units.to_canonical_adc`; an ADC whose values match
   no known unit is an :class:`~deepisles.errors.InputError`);
8. ADC onto the DWI grid when the grids differ (:func:`deepisles.preprocess.resample.resample_to`): when the
   voxel centres are the same (axes stored in another order / flipped / shifted by whole voxels) the array is
   reordered exactly (``steps['adc_to_dwi_grid'] == 'reordered'``, ``adc_resampled`` False); otherwise it is
   interpolated linearly in physical space (``'interpolated'``, ``adc_resampled`` True, with a warning).

The records go into the same ``steps`` / ``warnings`` as the reading's (report.json ``steps``). The FLAIR
stays on its own grid: registration onto the DWI is :mod:`deepisles.preprocess.register`'s job.
:func:`load_inputs` is both steps in one call (what ``segment`` and ``train`` do before building the Case).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from deepisles.io.image import Image
from deepisles.io.load import LoadedInputs, read_inputs
from deepisles.io.validate import DEFAULT_MAX_VOXELS
from deepisles.preprocess.resample import resample_to
from deepisles.preprocess.units import to_canonical_adc


def _grid(img: Image) -> dict:
    return {
        "shape": list(img.shape[:3]),
        "spacing_mm": [round(s, 4) for s in img.spacing],
    }


def _adc_onto_dwi(adc: Image, dwi: Image, steps: dict, warnings: list[str]) -> Image:
    """Step 8: ``adc`` on the DWI grid, recording how in ``steps`` (and ``warnings`` when interpolated)."""
    if adc.same_grid(dwi):
        steps["adc_resampled"] = False
        steps["adc_to_dwi_grid"] = "same grid"
        steps["adc_resample_reason"] = "ADC is on the DWI grid"
        return adc
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
    return adc


def harmonise_inputs(loaded: LoadedInputs) -> LoadedInputs:
    """Steps 7-8 (module docstring): a new :class:`LoadedInputs` whose ADC is in 10^-3 mm^2/s on the DWI grid.

    ``loaded`` is not changed; the result's ``steps`` / ``warnings`` are ``loaded``'s plus this step's records.
    """
    steps = dict(loaded.steps)
    warnings = list(loaded.warnings)
    adc, unit_info = to_canonical_adc(loaded.adc)
    steps["adc_unit"] = unit_info
    steps["grids"] = {"dwi": _grid(loaded.dwi), "adc": _grid(adc)}
    if loaded.flair is not None:
        steps["grids"]["flair"] = _grid(loaded.flair)
    adc = _adc_onto_dwi(adc, loaded.dwi, steps, warnings)
    return replace(loaded, adc=adc, steps=steps, warnings=warnings)


def load_inputs(
    dwi_path: str | Path,
    adc_path: str | Path,
    flair_path: str | Path | None = None,
    bval_path: str | Path | None = None,
    max_voxels: int | None = DEFAULT_MAX_VOXELS,
) -> LoadedInputs:
    """:func:`~deepisles.io.load.read_inputs` then :func:`harmonise_inputs`: DWI (3D), ADC (10^-3 mm^2/s, DWI
    grid), FLAIR (own grid), with the steps and warnings of both."""
    return harmonise_inputs(read_inputs(dwi_path, adc_path, flair_path, bval_path=bval_path, max_voxels=max_voxels))
