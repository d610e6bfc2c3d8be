"""Real anatomy for synthetic cases: the MNI152 2009a templates (vendored, :mod:`deepisles.resources`) on a 1.5 mm grid.

Tissue fractions come straight from the template's grey- and white-matter probability maps; the brain mask is
nilearn's definition (T1 template > 0.2 of its maximum) and CSF is what is left: ``brain - GM - WM``.
Everything here is computed once per process (``functools.lru_cache``) and treated as read-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage as ndi

from deepisles import resources

WORK_SPACING_MM = 1.5
_MARGIN_MM = 8.0
SHARPEN_GAMMA = 1.8

# Vascular territory labels of the working grid (approximate, drawn in MNI millimetres).
ACA, MCA, PCA, CEREBELLUM, BRAINSTEM, DEEP_MCA, THALAMUS = 1, 2, 3, 4, 5, 6, 7
TERRITORY_NAMES = {
    ACA: "ACA",
    MCA: "MCA",
    PCA: "PCA",
    CEREBELLUM: "cerebellar",
    BRAINSTEM: "brainstem",
    DEEP_MCA: "MCA-deep",
    THALAMUS: "thalamus",
}


@dataclass(frozen=True)
class Template:
    """Tissue maps on the working grid. ``affine`` maps voxel indices to MNI millimetres."""

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    territory: np.ndarray
    ventricles: np.ndarray
    reach: np.ndarray
    outside_mm: np.ndarray  # distance outside the brain mask (0 inside)
    affine: np.ndarray
    mni: tuple[np.ndarray, np.ndarray, np.ndarray]
    derived: dict  # smoothed helper maps: csf_near, periventricular, gm_smooth

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.gm.shape)

    @property
    def spacing(self) -> float:
        return float(self.affine[0, 0])

    @property
    def voxel_volume_ml(self) -> float:
        return self.spacing**3 / 1000.0

    def mni_to_index(self, points_mm: np.ndarray) -> np.ndarray:
        """MNI mm (..., 3) -> fractional voxel indices (..., 3)."""
        return (np.asarray(points_mm, dtype=np.float64) - self.affine[:3, 3]) / self.spacing


@lru_cache(maxsize=1)
def load_template() -> Template:
    """Load the MNI152 2009 T1/GM/WM maps, derive brain and CSF, and resample them to 1.5 mm (cached)."""
    t1, aff = resources.mni152("t1")
    gm, _ = resources.mni152("gm")
    wm, _ = resources.mni152("wm")
    brain = resources.mni152_brain().astype(np.float32)  # nilearn's load_mni152_brain_mask definition

    # crop to the brain + margin, on a 1.5 mm grid aligned with the 1 mm one
    idx = np.nonzero(brain)
    lo_vox = np.array([i.min() for i in idx])
    hi_vox = np.array([i.max() for i in idx])
    lo_mm = aff[:3, :3] @ lo_vox + aff[:3, 3] - _MARGIN_MM
    hi_mm = aff[:3, :3] @ hi_vox + aff[:3, 3] + _MARGIN_MM
    step = WORK_SPACING_MM
    shape = np.ceil((hi_mm - lo_mm) / step).astype(int) + 1
    grid_mm = [lo_mm[a] + step * np.arange(shape[a]) for a in range(3)]
    # work on a 1 mm crop (a few voxels larger than needed) to keep the one-off cost low
    c0 = np.maximum(lo_vox - int(_MARGIN_MM) - 3, 0)
    c1 = np.minimum(hi_vox + int(_MARGIN_MM) + 4, np.array(t1.shape))
    crop = tuple(slice(int(a), int(b)) for a, b in zip(c0, c1, strict=True))
    src_idx = [(grid_mm[a] - aff[a, 3]) / aff[a, a] - c0[a] for a in range(3)]
    coords = np.stack(np.meshgrid(*src_idx, indexing="ij"))

    def down(vol: np.ndarray) -> np.ndarray:
        # anti-alias (1 mm -> 1.5 mm), then trilinear resampling; outside the template is 0
        smoothed = ndi.gaussian_filter(vol[crop], 0.45, mode="constant")
        return ndi.map_coordinates(smoothed, coords, order=1, mode="constant", cval=0.0).astype(np.float32)

    brain_w = np.clip(down(brain), 0.0, 1.0)
    gm_w = np.clip(down(gm), 0.0, 1.0)
    wm_w = np.clip(down(wm), 0.0, 1.0)
    tissue = gm_w + wm_w
    over = tissue > brain_w
    scale = np.ones_like(tissue)
    scale[over] = brain_w[over] / np.maximum(tissue[over], 1e-6)
    gm_w *= scale
    wm_w *= scale
    csf_w = np.clip(brain_w - gm_w - wm_w, 0.0, 1.0)
    gm_w, wm_w, csf_w = _sharpen(brain_w, gm_w, wm_w, csf_w, SHARPEN_GAMMA)

    affine = np.eye(4)
    affine[:3, :3] *= step
    affine[:3, 3] = lo_mm
    mni = tuple(m.astype(np.float32) for m in np.meshgrid(*grid_mm, indexing="ij"))
    territory = territories(mni, gm_w + wm_w)
    # CSF well inside the brain (>= 12 mm from its surface): the ventricles, used for periventricular effects
    deep = ndi.binary_erosion(brain_w > 0.5, iterations=int(round(12 / step)))
    ventricles = (csf_w * deep).astype(np.float32)
    # where a scanner voxel may still hold brain (+ the optional CSF shell): the brain dilated by 7.5 mm
    reach = ndi.binary_dilation(brain_w > 0.02, iterations=5).astype(np.uint8)
    outside_mm = (ndi.distance_transform_edt(brain_w < 0.5) * step).astype(np.float32)
    derived = {
        "csf_near": ndi.gaussian_filter(csf_w, 1.2),
        "periventricular": ndi.gaussian_filter(ventricles, 2.5),
        "gm_smooth": ndi.gaussian_filter(gm_w, 1.0),
    }
    for arr in (
        gm_w,
        wm_w,
        csf_w,
        brain_w,
        territory,
        ventricles,
        reach,
        outside_mm,
        *mni,
        *derived.values(),
    ):
        arr.setflags(write=False)
    return Template(
        gm_w, wm_w, csf_w, brain_w, territory, ventricles, reach, outside_mm, affine, mni, derived
    )


def _sharpen(brain, gm, wm, csf, gamma: float):
    """Crisper GM/WM boundary: an individual brain has less GM/WM mixing than a 152-subject average.

    Within the tissue part of each voxel the GM:WM proportions p are replaced by p**gamma / sum(p**gamma);
    the CSF and brain fractions are unchanged.
    """
    eps = 1e-6
    tissue = gm + wm
    pg = np.clip(gm / np.maximum(tissue, eps), 0, 1) ** gamma
    pw = np.clip(wm / np.maximum(tissue, eps), 0, 1) ** gamma
    total = np.maximum(pg + pw, eps)
    return (tissue * pg / total).astype(np.float32), (tissue * pw / total).astype(np.float32), csf


def territories(mni, tissue: np.ndarray) -> np.ndarray:
    """Approximate arterial territories from MNI coordinates (x, y, z arrays; coarse but anatomically placed).

    Lesion code calls this with randomly jittered coordinates so territory borders are not planes.
    """
    x, y, z = mni
    ax = np.abs(x)
    lab = np.zeros(tissue.shape, np.uint8)
    inside = tissue > 0.2
    lab[inside] = MCA
    aca = (ax < 16 + 8 * (z > 40)) & (y > -52 - 18 * (z > 25)) & (z > -25)  # incl. precuneus
    lab[inside & aca] = ACA
    occipital = (y < -70) & (z < 28 + 0.5 * (-70 - y))
    pca = occipital | ((y < -50) & (ax < 22) & (z < 22)) | ((y < -12) & (z < -8) & (ax < 42))
    lab[inside & pca] = PCA
    cereb = (y < -38) & (z < -12 - 0.15 * (-38 - y))
    lab[inside & cereb] = CEREBELLUM
    stem = (ax < 13) & (y > -44) & (y < -8) & (z < -6)
    lab[inside & stem] = BRAINSTEM
    deep = (ax > 8) & (ax < 32) & (y > -22) & (y < 26) & (z > -8) & (z < 24)
    lab[inside & deep] = DEEP_MCA
    thal = (ax > 2) & (ax < 22) & (y > -36) & (y < -5) & (z > -4) & (z < 19)
    lab[inside & thal] = THALAMUS
    return lab
