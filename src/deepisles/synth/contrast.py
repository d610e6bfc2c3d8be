"""Tissue contrast: ADC, b0 (T2-weighted EPI) and FLAIR signal per compartment, lesion and ageing effects.

The DWI is not painted: it follows the mono-exponential model ``S_b = S0 * exp(-b * ADC)`` per tissue
compartment (GM, WM, CSF; lesion changes the tissue compartments only), summed by partial volume. The scanner's
ADC map is then computed from the noisy b0 and b=1000 images, exactly as a scanner does, so its noise, its
Rician floor in CSF and the cancellation of the coil bias field are all real consequences of the model.

Reference values (10^-3 mm^2/s): WM ~0.7, GM ~0.8-0.9, CSF ~3.0. b0 ratios come from the real EPI b0 that dipy
ships (``S0_10slices.nii.gz``) and the real ISLES'22 case: CSF is ~4-6x brighter than WM on b0, GM ~1.2-1.35x,
parenchyma SNR ~22 on one b0 average; see :func:`measure_dipy_b0`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from deepisles.errors import DeepIslesError
from deepisles.synth.anatomy import Template
from deepisles.synth.fields import gaussian_blob, smooth_noise

B_VALUE = 1000.0  # s/mm^2

# Measured once from dipy's S0_10slices.nii.gz (see measure_dipy_b0): parenchyma mode / background Rician
# sigma, and the 99th-percentile (CSF) / median brain signal ratio.
DIPY_B0_SNR = 22.0
DIPY_B0_CSF_RATIO = 5.9
MIMIC_P = 0.35  # cases with T2 shine-through mimics (1-3 blobs of long-T2, normal-ADC tissue)


@dataclass
class TissueParams:
    adc_wm: float
    adc_gm: float
    adc_csf: float
    s0_wm: float
    s0_gm: float
    s0_csf: float
    flair_wm: float
    flair_gm: float
    flair_csf: float
    texture: float  # relative amplitude of fine tissue texture (b0 and FLAIR)
    adc_texture: float
    csf_boost: float
    csf_shell_mm: float
    wmh: float  # white-matter hyperintensity burden (0 = none)

    @classmethod
    def random(cls, rng: np.random.Generator, atrophy: float) -> TissueParams:
        return cls(
            adc_wm=float(rng.uniform(0.66, 0.76)),
            adc_gm=float(rng.uniform(0.80, 0.90)),
            adc_csf=float(rng.uniform(2.95, 3.25)),
            s0_wm=1.0,
            s0_gm=float(rng.uniform(1.3, 1.45)),
            s0_csf=float(rng.uniform(4.0, 5.5)),
            flair_wm=1.0,
            flair_gm=float(rng.uniform(1.15, 1.35)),
            flair_csf=float(rng.uniform(0.12, 0.3)),
            texture=float(rng.uniform(0.03, 0.06)),
            adc_texture=float(rng.uniform(0.02, 0.04)),
            csf_boost=float(np.clip(0.15 + 0.85 * atrophy, 0, 1)),
            csf_shell_mm=float(rng.uniform(0.0, 3.0)),
            wmh=float(rng.uniform(0.0, 1.0) * atrophy) if rng.random() < 0.6 else 0.0,
        )

    def as_dict(self) -> dict:
        return {k: round(v, 4) for k, v in asdict(self).items()}


@dataclass
class SignalMaps:
    """Template-space maps sampled by the acquisitions (float32, noiseless, unscaled)."""

    s0: np.ndarray
    sb: np.ndarray
    flair: np.ndarray
    lesion: np.ndarray  # 1 inside the ground-truth lesion (tissue), 0 elsewhere
    brain: np.ndarray  # brain fraction (template brain + this subject's CSF shell)


@dataclass
class SubjectTissue:
    """This subject's tissue fractions on the template grid (after atrophy and the CSF shell)."""

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray

    @property
    def tissue(self) -> np.ndarray:
        return self.gm + self.wm


def subject_tissue(template: Template, params: TissueParams) -> SubjectTissue:
    gm = template.gm.copy()
    wm = template.wm.copy()
    csf = template.csf.copy()
    brain = template.brain.copy()

    # atrophy: CSF where the template has some (sulci, ventricles, cisterns) takes over tissue, which turns the
    # population-average's faint sulci into the crisp CSF clefts of an individual (older) brain
    if params.csf_boost > 0:
        rel = np.clip(csf / np.maximum(brain, 1e-6), 0, 1)
        new_rel = rel + params.csf_boost * (1 - rel) * np.clip((rel - 0.05) / 0.25, 0, 1)
        keep = (1 - new_rel) / np.maximum(1 - rel, 1e-6)
        gm *= keep
        wm *= keep
        csf = brain * new_rel
    # subarachnoid CSF around the brain that the skull stripping kept (0-3 mm)
    if params.csf_shell_mm > 0:
        outside = template.outside_mm
        shell = (np.clip((params.csf_shell_mm - outside) / 1.5 + 0.5, 0, 1) * (outside > 0)).astype(
            np.float32
        )
        csf = csf + shell
        brain = np.clip(brain + shell, 0, 1)
    return SubjectTissue(gm, wm, csf.astype(np.float32), brain.astype(np.float32))


def signal_maps(
    rng: np.random.Generator,
    template: Template,
    subject: SubjectTissue,
    params: TissueParams,
    labels: np.ndarray,
    lesion_params: dict[int, tuple[float, float, float]],
) -> SignalMaps:
    """Build b0, b=1000 and FLAIR signal maps on the template grid for one subject.

    ``labels``: lesion label volume (tissue voxels only); ``lesion_params[k] = (adc_drop, t2_increase,
    flair_increase)``.
    """
    gm, wm, csf, brain = subject.gm, subject.wm, subject.csf, subject.brain

    shape = template.shape
    # ADC, T2 and FLAIR changes of tissue: lesions (+ heterogeneity) and white-matter hyperintensities
    drop = np.zeros(shape, np.float32)
    t2 = np.zeros(shape, np.float32)
    fl = np.zeros(shape, np.float32)
    inside = labels > 0
    if lesion_params and inside.any():
        n = int(labels.max())
        lut = np.zeros((3, n + 1), np.float32)
        for k, (d, t, f) in lesion_params.items():
            lut[:, k] = (d, t, f)
        # work in the lesions' bounding box (+ margin for the blur)
        nz = np.nonzero(inside)
        box = tuple(slice(max(int(i.min()) - 6, 0), int(i.max()) + 7) for i in nz)
        lab = labels[box]
        sub_shape = lab.shape
        # heterogeneous inside (patchy, more restricted in the core than at the rim), soft ~1 mm edge
        hetero = 1.0 + 0.12 * np.clip(smooth_noise(rng, sub_shape, 2.0), -2.5, 2.5)
        core = 0.82 + 0.18 * np.clip(ndi.gaussian_filter((lab > 0).astype(np.float32), 2.0) * 1.6, 0, 1)
        d_box = lut[0][lab] * np.clip(hetero * core, 0.5, 1.12)
        t_box = lut[1][lab] * hetero
        f_box = lut[2][lab] * np.clip(1.0 + 0.3 * smooth_noise(rng, sub_shape, 1.5), 0.3, 1.8)
        for full, part in ((drop, d_box), (t2, t_box), (fl, f_box)):
            full[box] = ndi.gaussian_filter(part, 0.6)

    adc_up = np.zeros(shape, np.float32)
    if params.wmh > 0:
        # periventricular caps/bands and patchy deep white-matter lesions (chronic small-vessel disease)
        peri = template.derived["periventricular"] * 3.0
        patch = smooth_noise(rng, shape, 2.0)
        wmh = np.clip(peri + 0.35 * patch - (1.2 - 0.6 * params.wmh), 0, 1) * (wm > 0.5) * (~inside)
        wmh = ndi.gaussian_filter(wmh.astype(np.float32), 0.7)
        fl = fl + 0.9 * wmh
        t2 = t2 + 0.25 * wmh
        adc_up = (0.35 * wmh).astype(np.float32)

    # T2 shine-through mimics (not lesions): older infarcts / gliosis / oedema with long T2 and normal or raised
    # ADC, bright on DWI by their T2 alone - the other "DWI-bright, ADC-normal" false positives
    mimics = int(rng.integers(1, 4)) if rng.random() < MIMIC_P else 0
    tissue_pool = np.argwhere((gm + wm > 0.7) & ~inside) if mimics else None
    for _ in range(mimics):
        if tissue_pool is None or len(tissue_pool) == 0:
            break
        c = tissue_pool[int(rng.integers(len(tissue_pool)))]
        sl, w = gaussian_blob(c, rng.uniform(2.0, 8.0) / template.spacing * rng.uniform(0.6, 1.4, 3), shape)
        w *= ~inside[sl]
        t2[sl] += float(rng.uniform(0.3, 0.9)) * w
        adc_up[sl] += float(rng.uniform(0.0, 0.4)) * w

    # fine (~1 mm) and blotchy (~4 mm) tissue texture that the template average has lost
    tex = 1.0 + params.texture * (0.8 * smooth_noise(rng, shape, 0.8) + 0.6 * smooth_noise(rng, shape, 2.5))
    tex_adc = 1.0 + params.adc_texture * smooth_noise(rng, shape, 1.0)
    b = B_VALUE / 1000.0  # ADC is in 10^-3 mm^2/s
    tissue_s0 = 1.0 + t2
    adc_scale = tex_adc * (1.0 - drop) * (1.0 + adc_up)
    gm_s0 = gm * params.s0_gm * tissue_s0
    wm_s0 = wm * params.s0_wm * tissue_s0
    csf_s0 = csf * params.s0_csf
    s0 = gm_s0 + wm_s0 + csf_s0
    sb = (
        gm_s0 * np.exp(-b * params.adc_gm * adc_scale)
        + wm_s0 * np.exp(-b * params.adc_wm * adc_scale)
        + csf_s0 * np.exp(-b * params.adc_csf * tex_adc)
    )
    flair = (gm * params.flair_gm + wm * params.flair_wm) * (1.0 + fl) + csf * params.flair_csf
    return SignalMaps(
        s0=(s0 * tex).astype(np.float32),
        sb=(sb * tex).astype(np.float32),
        flair=(flair * tex).astype(np.float32),  # same tissue, same texture
        lesion=inside.astype(np.float32),
        brain=brain,
    )


def bias_field(
    rng: np.random.Generator, world_mm: np.ndarray, centre_mm: np.ndarray, amplitude: float
) -> np.ndarray:
    """Smooth multiplicative receive-coil bias (N,) at scanner positions (3, N): exp of a random quadratic."""
    x, y, z = ((world_mm - centre_mm[:, None]) / 100.0).astype(np.float32)
    coef = rng.normal(0.0, 1.0, 9)
    coef[3:] *= 0.6
    log_b = coef[0] * x + coef[1] * y + coef[2] * z
    log_b += coef[3] * x * x + coef[4] * y * y + coef[5] * z * z
    log_b += coef[6] * x * y + coef[7] * x * z + coef[8] * y * z
    log_b *= amplitude / max(float(np.std(log_b)), 1e-9)
    return np.exp(log_b - np.median(log_b))


def rician(rng: np.random.Generator, signal: np.ndarray, sigma: float, corr_vox: float = 0.0) -> np.ndarray:
    """Magnitude of ``signal`` plus complex Gaussian noise (Rician); optional in-plane-ish noise correlation."""
    n1 = rng.standard_normal(signal.shape, dtype=np.float32)
    n2 = rng.standard_normal(signal.shape, dtype=np.float32)
    if corr_vox > 0:
        # correlated noise as after k-space filtering / interpolation; keep the per-voxel variance
        n1 = ndi.gaussian_filter(n1, corr_vox)
        n2 = ndi.gaussian_filter(n2, corr_vox)
        n1 /= max(float(n1.std()), 1e-6)
        n2 /= max(float(n2.std()), 1e-6)
    return np.sqrt((signal + sigma * n1) ** 2 + (sigma * n2) ** 2)


DIPY_B0_HINT = "measuring dipy's EPI b0 needs dipy (a dev-only dependency): pip install 'deepisles[dev]'"


def dipy_b0_path() -> Path | None:
    """dipy's ``S0_10slices.nii.gz`` when dipy is installed (found without importing dipy), else None."""
    spec = importlib.util.find_spec("dipy")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "files" / "S0_10slices.nii.gz"
    return path if path.is_file() else None


def measure_dipy_b0(path: Path | None = None) -> dict:
    """SNR and CSF/brain ratio of dipy's real EPI b0 (how DIPY_B0_SNR / DIPY_B0_CSF_RATIO were obtained).

    A documentation measurement only (synthesis uses the constants): needs dipy, or ``path`` to that file;
    raises :class:`~deepisles.errors.DeepIslesError` with the install hint otherwise.
    """
    import nibabel as nib

    path = path or dipy_b0_path()
    if path is None:
        raise DeepIslesError(DIPY_B0_HINT)
    d = np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)[..., 0]
    corner = np.zeros(d.shape, bool)
    for sx in (slice(0, 10), slice(-10, None)):
        for sy in (slice(0, 10), slice(-10, None)):
            corner[sx, sy] = True
    sigma = float(d[corner].mean() / np.sqrt(np.pi / 2))  # Rayleigh background
    brain = ndi.binary_fill_holes(ndi.binary_opening(d > 5 * sigma))
    v = d[brain]
    hist, edges = np.histogram(v, bins=200, range=(0, float(np.percentile(v, 99.5))))
    mode = float(edges[np.argmax(hist[5:]) + 5])
    return {
        "sigma": sigma,
        "parenchyma_mode": mode,
        "snr": mode / sigma,
        "csf_ratio": float(np.percentile(v, 99) / np.median(v)),
    }
