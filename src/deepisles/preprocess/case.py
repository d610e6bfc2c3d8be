"""From validated inputs to the members' ``Case``: FLAIR onto the DWI grid (registered, or passed through when
already there and aligned), brain mask, skull strip.

One source of truth for ``deepisles segment`` and ``deepisles train``: a network sees the same images in
training as at inference.
"""

from __future__ import annotations

import time

import numpy as np

from deepisles.core import Case
from deepisles.io.load import LoadedInputs


def build_case(loaded: LoadedInputs, skull_strip: str = "auto", device: str = "cpu",
               say=lambda _msg: None, flair_registered: bool = False) -> tuple[Case, dict, list[str], dict]:  # fmt: skip
    """``(case, steps, warnings, timing)`` for validated inputs (see ``deepisles.io.load.load_inputs``).

    The FLAIR is brought onto the DWI grid by :func:`deepisles.preprocess.register.align_to`: registered, or
    passed through unchanged when it is already on the DWI grid and aligned; ``flair_registered``
    (``--flair-registered``) skips the registration (a FLAIR on another grid is then resampled in physical space).
    ``steps`` gains ``flair_registration`` (``action`` and ``summary`` say which) and ``skull_strip``;
    ``warnings`` are new warnings only.
    """
    from deepisles.preprocess.brain_mask import brain_mask

    steps: dict = {}
    warnings: list[str] = []
    timing: dict[str, float] = {}
    flair_img = None
    if loaded.flair is not None:
        from deepisles.preprocess.register import align_to

        say("FLAIR onto the DWI grid" if flair_registered else "registering FLAIR to DWI")
        t = time.perf_counter()
        flair_img, reg_info = align_to(loaded.flair, loaded.dwi, assume_registered=flair_registered)
        steps["flair_registration"] = reg_info
        timing["register"] = time.perf_counter() - t

    say(f"brain mask ({skull_strip})")
    t = time.perf_counter()
    brain, mask_info = brain_mask(loaded.dwi, skull_strip, device=device, flair=flair_img)
    steps["skull_strip"] = mask_info
    timing["brain_mask"] = time.perf_counter() - t
    _check_adc_covers_brain(loaded, brain)
    nonzero = np.asarray(loaded.dwi.data) != 0
    if mask_info.get("chosen") in ("classical", "hdbet") and (~nonzero).mean() > 0.25:
        kept = float((brain & nonzero).sum()) / max(int(nonzero.sum()), 1)
        if kept < 0.85:
            warnings.append(
                f"--skull-strip {skull_strip} kept only {kept:.0%} of the non-zero DWI region, which already looks "
                "skull-stripped; lesions outside the brain mask are lost (check preview.png; --skull-strip auto "
                "uses the existing background)"
            )

    dwi_img, adc_img = loaded.dwi, loaded.adc
    if mask_info.get("chosen") in ("classical", "hdbet"):  # as DeepISLES: members see skull-stripped DWI/ADC/FLAIR
        dwi_img = dwi_img.with_data(np.where(brain, dwi_img.data, 0).astype(dwi_img.data.dtype))
        adc_img = adc_img.with_data(np.where(brain, adc_img.data, 0).astype(adc_img.data.dtype))
        if flair_img is not None:
            flair_img = flair_img.with_data(np.where(brain, flair_img.data, 0).astype(np.float32))
    return Case(dwi=dwi_img, adc=adc_img, brain=brain, flair=flair_img), steps, warnings, timing


MIN_ADC_BRAIN_COVERAGE = 0.5


def _check_adc_covers_brain(loaded: LoadedInputs, brain: np.ndarray) -> None:
    """On the DWI grid, most of the DWI brain must hold ADC values: two scans that overlap in their bounding boxes
    but not where the brain is (or an ADC that is zero there) are an input error, not an empty result."""
    from deepisles.errors import InputError

    n_brain = int(np.count_nonzero(brain))
    if n_brain == 0:
        raise InputError(loaded.dwi.source or None, "the brain mask of the DWI is empty (no brain found)")
    adc = np.asarray(loaded.adc.data)
    covered = int(np.count_nonzero(brain & np.isfinite(adc) & (adc > 0))) / n_brain
    if covered < MIN_ADC_BRAIN_COVERAGE:
        raise InputError(
            loaded.adc.source or None,
            f"on the DWI grid the ADC holds values in only {covered:.0%} of the DWI brain (need "
            f"{MIN_ADC_BRAIN_COVERAGE:.0%}); check that DWI and ADC come from the same scan and cover the same region",
        )
