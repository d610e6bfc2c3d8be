"""Synthetic training cases with domain randomisation (in the spirit of SynthSeg).

Each case comes from ``deepisles.synth.generate_case`` (real MNI152 anatomy; random head pose, resolution,
obliquity, noise, bias field, tissue contrast and lesion shapes, sizes, counts and territories), and then gets
extra randomisation of what real scans vary in and the generator keeps narrow:

* DWI contrast: a gamma curve around the brain median (lesion-to-brain DWI ratio from ~1.1x to ~4x; the
  generator alone gives ~1.1-2.5x, the real ISLES'22 case's lesions 1.1-1.9x, other acute lesions reach 2-4x), and
  a smooth per-lesion brightening (x1-1.6, never dimmer);
* a global ADC scale (vendor/fit differences, +-10 %) and FLAIR gamma;
* a second multiplicative bias field, extra Gaussian noise and, sometimes, blur (lower effective resolution);
* lesion ADC severity: the lesion's ADC drop is weakened by up to 40 % (subtle, partial-volume lesions);
* distractors that are not lesions: up to four smooth DWI-bright regions with normal ADC, mostly at the brain
  edge, like the EPI pile-up/susceptibility artefacts and T2 shine-through of real scans. A network trained
  without them marks every bright DWI spot (seen on the real ISLES'22 case: false positives with DWI 1.9x the
  brain median and normal ADC, 3 voxels from the brain edge); with them it has to read the ADC.

The label is never changed. ``SyntheticSource`` yields ``(Case, label)`` pairs built through the same
``build_case`` as ``deepisles segment``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from deepisles.core import Case
from deepisles.io.load import LoadedInputs
from deepisles.synth.fields import gaussian_blob, smooth_noise
from deepisles.synth.generator import SynthCase, case_rng, generate_case


@dataclass
class Randomisation:
    """Ranges of the extra domain randomisation (all on by default; ``none()`` switches it off)."""

    dwi_gamma: tuple[float, float] = (0.8, 1.5)
    lesion_boost: tuple[float, float] = (1.0, 1.6)  # never dimmer: the generator's lesions are already subtle
    lesion_adc_weaken: tuple[float, float] = (0.0, 0.4)
    distractors: int = 4
    distractor_dwi: tuple[float, float] = (1.3, 2.3)
    distractor_radius_mm: tuple[float, float] = (3.0, 12.0)
    adc_scale: tuple[float, float] = (0.9, 1.1)
    flair_gamma: tuple[float, float] = (0.7, 1.4)
    bias_sd: float = 0.15
    noise_sd: tuple[float, float] = (0.0, 0.05)
    blur_p: float = 0.25
    blur_sigma: tuple[float, float] = (0.3, 1.0)

    @classmethod
    def none(cls) -> Randomisation:
        return cls((1, 1), (1, 1), (0, 0), 0, (1, 1), (0, 0), (1, 1), (1, 1), 0.0, (0.0, 0.0), 0.0, (0.0, 0.0))


def _gamma(x: np.ndarray, brain: np.ndarray, g: float) -> np.ndarray:
    ref = float(np.median(x[brain])) if brain.any() else 1.0
    ref = ref if ref > 0 else 1.0
    return (ref * np.power(np.clip(x, 0, None) / ref, g)).astype(np.float32)


def randomise(sc: SynthCase, rng: np.random.Generator, r: Randomisation | None = None) -> SynthCase:
    """Extra domain randomisation of one synthetic case (new arrays; the label is unchanged)."""
    r = r or Randomisation()
    dwi = np.asarray(sc.dwi.data, dtype=np.float32)
    adc = np.asarray(sc.adc.data, dtype=np.float32)
    label = np.asarray(sc.mask.data) > 0
    brain = dwi > 0
    dwi = _gamma(dwi, brain, rng.uniform(*r.dwi_gamma))
    if label.any():
        weight = np.clip(ndi.gaussian_filter(label.astype(np.float32), 0.7) * 1.5, 0, 1)
        dwi *= 1.0 + (rng.uniform(*r.lesion_boost) - 1.0) * weight
        adc *= 1.0 + rng.uniform(*r.lesion_adc_weaken) * weight * (adc < 0.8)
    spacing = np.asarray(sc.dwi.spacing, dtype=np.float64)
    for _ in range(int(rng.integers(0, r.distractors + 1)) if brain.any() else 0):
        _distractor(dwi, adc, brain, label, spacing, rng, r)
    if r.bias_sd > 0:
        field = np.exp(r.bias_sd * smooth_noise(rng, dwi.shape, max(dwi.shape) / 4.0))
        dwi *= field
    sd = rng.uniform(*r.noise_sd) * (float(np.median(dwi[brain])) if brain.any() else 0.0)
    if sd > 0:
        dwi = np.abs(dwi + rng.normal(0.0, sd, dwi.shape).astype(np.float32))
    blur = rng.random() < r.blur_p
    sigma = rng.uniform(*r.blur_sigma) if blur else 0.0
    if sigma > 0:
        dwi, adc = ndi.gaussian_filter(dwi, sigma), ndi.gaussian_filter(adc, sigma)
    adc = adc * rng.uniform(*r.adc_scale)
    dwi[~brain] = 0  # keep the skull-stripped background exactly zero, as the generator writes it
    adc[~brain] = 0
    flair = sc.flair
    if flair is not None:
        f = np.asarray(flair.data, dtype=np.float32)
        flair = flair.with_data(_gamma(f, f > 0, rng.uniform(*r.flair_gamma)))
    return SynthCase(dwi=sc.dwi.with_data(dwi), adc=sc.adc.with_data(adc), flair=flair, mask=sc.mask, meta=sc.meta)


def _distractor(dwi, adc, brain, label, spacing, rng, r: Randomisation) -> None:
    """One DWI-bright, ADC-normal smooth blob (not a lesion), in place; 70 % of them touch the brain edge."""
    edge = ndi.binary_erosion(brain, iterations=3)
    pool = np.argwhere(brain & ~edge) if rng.random() < 0.7 else np.argwhere(brain)
    if len(pool) == 0:
        return
    centre = pool[int(rng.integers(len(pool)))]
    radius = rng.uniform(*r.distractor_radius_mm) / spacing * rng.uniform(0.6, 1.4, 3)
    sl, w = gaussian_blob(centre, radius, dwi.shape, reach=2.0)
    w *= brain[sl] & ~label[sl]
    dwi[sl] *= 1.0 + (rng.uniform(*r.distractor_dwi) - 1.0) * w
    adc[sl] *= 1.0 + rng.uniform(0.0, 0.15) * w


def synth_to_case(sc: SynthCase, device: str = "cpu") -> tuple[Case, np.ndarray]:
    """A synthetic case through the inference preprocessing (FLAIR registration, brain mask): ``(Case, label)``."""
    from deepisles.preprocess.case import build_case

    loaded = LoadedInputs(dwi=sc.dwi, adc=sc.adc, flair=sc.flair, steps={}, warnings=[])
    case, _, _, _ = build_case(loaded, "auto", device)
    return case, np.asarray(sc.mask.data).astype(np.uint8)


class SyntheticSource:
    """Endless synthetic ``(Case, label)`` pairs: case ``i`` of stream ``seed`` is always the same.

    ``with_flair``: draw FLAIR (needed by FACTORIZER; SEALS and NVAUTO skip it, which is faster).
    """

    def __init__(self, seed: int, with_flair: bool = False, randomisation: Randomisation | None = None,
                 device: str = "cpu"):  # fmt: skip
        self.seed, self.with_flair, self.device = int(seed), bool(with_flair), device
        self.randomisation = randomisation or Randomisation()

    def case(self, index: int) -> tuple[Case, np.ndarray]:
        rng = case_rng(self.seed, index)
        r_case, r_rand = rng.spawn(2)
        sc = generate_case(r_case, with_flair=self.with_flair)
        sc = randomise(sc, r_rand, self.randomisation)
        return synth_to_case(sc, self.device)
