"""What clinical EPI diffusion imaging adds that is not tissue: the false positives a DWI model must learn to ignore.

Two places, two kinds:

* :func:`susceptibility` (template space, before acquisition): signal pile-up and loss of single-shot EPI next to
  air and bone - the frontal sinus and orbits (orbitofrontal cortex, gyrus rectus) and the petrous bone and mastoid
  air cells (inferior and mesial temporal lobe, often on both sides). Both b-values move together (geometric
  compression), so the ADC stays about normal - the "DWI-bright, ADC-normal" regions that fooled the first default
  models on the real ISLES'22 case - plus a small b0/b1000 mismatch (eddy-current distortion differs with the
  diffusion gradient) that can lower the ADC a little, as in real pile-ups.
* :func:`grid_artefacts` (on the scanner grid, before noise): Gibbs ringing from k-space truncation along the
  in-plane axes, an N/2 (Nyquist) ghost along the phase-encoding axis, and head motion between the b0 and the
  diffusion-weighted volumes (a sub-voxel shift, which leaves bright and dark ADC rims at edges).

Every artefact is random per case (some cases have none) and recorded in the case's meta. The lesion mask is never
changed.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from deepisles.synth.anatomy import Template
from deepisles.synth.fields import gaussian_blob

SUSCEPTIBILITY_P = 0.75  # cases with at least one pile-up/loss region
GIBBS_P = 0.5
GHOST_P = 0.4
MOTION_P = 0.3


_CANDIDATES: dict[int, dict[str, np.ndarray]] = {}


def _candidates(template: Template) -> dict[str, np.ndarray]:
    """(Cached per template.) Brain voxels within ~10 mm of the surface next to the sinuses (orbitofrontal) and the petrous bone
    (inferior temporal), MNI coordinates."""
    if id(template) in _CANDIDATES:
        return _CANDIDATES[id(template)]
    x, y, z = template.mni
    inside = template.brain > 0.5
    depth = ndi.distance_transform_edt(inside) * template.spacing
    near = inside & (depth < 10.0)
    _CANDIDATES.clear()
    _CANDIDATES[id(template)] = {
        "orbitofrontal": near & (np.abs(x) < 40) & (y > 15) & (z < -2),
        "inferior-temporal": near & (np.abs(x) > 22) & (y > -45) & (y < 15) & (z < -12),
    }
    return _CANDIDATES[id(template)]


def susceptibility(rng: np.random.Generator, template: Template, s0: np.ndarray, sb: np.ndarray) -> dict:
    """Multiply the template-space b0 (``s0``) and b=1000 (``sb``) maps in place by EPI pile-up/loss blobs."""
    if rng.random() >= SUSCEPTIBILITY_P:
        return {"susceptibility": []}
    regions = _candidates(template)
    field = np.zeros(template.shape, np.float32)
    mismatch = np.zeros(template.shape, np.float32)
    blobs = []
    for _ in range(int(rng.integers(1, 5))):
        name = "inferior-temporal" if rng.random() < 0.6 else "orbitofrontal"
        pool = np.argwhere(regions[name])
        if len(pool) == 0:
            continue
        centre = pool[int(rng.integers(len(pool)))]
        radius_mm = float(rng.uniform(4.0, 12.0))
        amp = float(rng.uniform(0.3, 1.5)) if rng.random() < 0.75 else -float(rng.uniform(0.3, 0.8))
        e = float(rng.uniform(-0.08, 0.2))  # extra on the diffusion-weighted image only
        centres = [centre]
        if name == "inferior-temporal" and rng.random() < 0.6:  # both petrous bones: the other side too
            mirror = template.mni_to_index(
                np.array([-template.mni[0][tuple(centre)], template.mni[1][tuple(centre)],
                          template.mni[2][tuple(centre)]])  # fmt: skip
            )
            centres.append(np.clip(np.round(mirror).astype(int), 0, np.array(template.shape) - 1))
        for c in centres:
            sl, w = gaussian_blob(c, radius_mm / template.spacing * rng.uniform(0.6, 1.4, 3), template.shape)
            field[sl] += amp * w
            mismatch[sl] += e * w
        blobs.append({"region": name, "radius_mm": round(radius_mm, 1), "amplitude": round(amp, 2),
                      "dwi_only": round(e, 3), "bilateral": len(centres) == 2})  # fmt: skip
    gain = np.clip(1.0 + field, 0.05, None)
    s0 *= gain
    sb *= gain * np.clip(1.0 + mismatch, 0.5, None)
    return {"susceptibility": blobs}


def _gibbs(img: np.ndarray, axis: int, keep: float) -> np.ndarray:
    """Keep the central ``keep`` fraction of k-space along ``axis`` (hard truncation): ringing at edges."""
    n = img.shape[axis]
    k = np.fft.fft(img, axis=axis)
    freq = np.abs(np.fft.fftfreq(n))
    shape = [1] * img.ndim
    shape[axis] = n
    k *= (freq <= keep / 2).reshape(shape)
    return np.abs(np.fft.ifft(k, axis=axis)).astype(np.float32)


def grid_artefacts(rng: np.random.Generator, s0: np.ndarray, sb: np.ndarray, brain: np.ndarray,
                   inplane: tuple[int, int], phase_axis: int) -> tuple[np.ndarray, np.ndarray, dict]:  # fmt: skip
    """Gibbs ringing, N/2 ghost and b0/b1000 motion on full scanner-grid arrays (noise-free); ``brain``: where
    the image holds signal. Returns new ``(s0, sb, meta)``."""
    meta: dict = {}
    if rng.random() < GIBBS_P:
        keep = float(rng.uniform(0.5, 0.8))
        for a in inplane:
            s0, sb = _gibbs(s0, a, keep), _gibbs(sb, a, keep)
        meta["gibbs_kspace_kept"] = round(keep, 3)
    if rng.random() < GHOST_P:
        g = float(rng.uniform(0.01, 0.06))
        gb = g * float(rng.uniform(1.0, 2.0))  # phase errors grow with the diffusion gradients
        half = s0.shape[phase_axis] // 2
        s0 = s0 + g * np.roll(s0, half, axis=phase_axis)
        sb = sb + gb * np.roll(sb, half, axis=phase_axis)
        meta["nyquist_ghost"] = [round(g, 3), round(gb, 3)]
    if rng.random() < MOTION_P:
        shift = np.zeros(3)
        for a in inplane:
            shift[a] = rng.uniform(-1.0, 1.0)
        sb = ndi.shift(sb, shift, order=1, mode="nearest").astype(np.float32)
        meta["b0_dwi_motion_vox"] = [round(float(s), 3) for s in shift]
    s0 = np.where(brain, s0, 0).astype(np.float32)
    sb = np.where(brain, sb, 0).astype(np.float32)
    return s0, sb, meta
