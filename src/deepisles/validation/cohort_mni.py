"""A batch case's lesion mask in MNI space: per-lobe volumes and the cohort's lesion frequency map.

Both use the case -> MNI affine that ``deepisles segment`` stored in the case report
(``report["location"]["registration"]["matrix_ras_to_mni"]``, case RAS mm -> MNI mm; see docs/biomarkers.md):

* **lobe volumes** (:func:`lobe_volumes`): every lesion voxel centre is mapped to MNI mm and looked up in the
  filled AAL3 lobe map of :func:`deepisles.postprocess.atlas.load_atlas` (nearest atlas voxel), exactly as the
  report's per-lesion ``lobes`` are; volume = voxels x voxel volume. Voxels that land outside the template
  brain count as ``outside``, so the lobe volumes plus ``outside`` add up to the mask volume;
* **frequency map** (:func:`warp_to_mni`, :func:`frequency_map`): each mask is resampled (nearest neighbour) onto
  a 2 mm grid of the MNI152 template (every second voxel of the 1 mm template), i.e. for every MNI voxel centre
  ``m`` the case voxel nearest to ``MNI^-1(m)`` is read; the map is the voxel-wise mean of the warped binary
  masks = the share of subjects with a lesion there.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage as ndi

from deepisles import resources
from deepisles.io.image import Image
from deepisles.postprocess.atlas import LOBES, load_atlas
from deepisles.postprocess.lesions import voxel_centres_mm

#: voxel size (mm) of the frequency map's MNI grid: every MAP_STEP-th voxel of the 1 mm template
MAP_STEP = 2
OUTSIDE = "outside"


@lru_cache(maxsize=1)
def map_grid() -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, affine) of the frequency map grid: the 1 mm MNI152 template's voxels 0, 2, 4, ... on each axis."""
    t1, affine = resources.mni152("t1")
    shape = tuple(int(s) for s in np.ceil(np.array(t1.shape) / MAP_STEP).astype(int))
    grid = affine @ np.diag([MAP_STEP, MAP_STEP, MAP_STEP, 1.0])
    return shape, grid  # type: ignore[return-value]


def template_on_grid() -> np.ndarray:
    """The MNI152 T1 (0-1) on :func:`map_grid` (the same voxels, no interpolation), for pictures."""
    t1, _ = resources.mni152("t1")
    return np.asarray(t1[::MAP_STEP, ::MAP_STEP, ::MAP_STEP])


def warp_to_mni(mask: np.ndarray, affine: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Binary ``mask`` (case voxel grid with ``affine``, RAS mm) -> bool mask on :func:`map_grid`, nearest
    neighbour, through ``matrix`` (4x4, case RAS mm -> MNI mm). Outside the case grid is no lesion."""
    shape, grid = map_grid()
    # MNI grid voxel -> MNI mm -> case mm -> case voxel
    to_case = np.linalg.inv(np.asarray(affine, np.float64)) @ np.linalg.inv(np.asarray(matrix, np.float64)) @ grid
    src = np.asarray(mask, dtype=np.uint8)
    out = ndi.affine_transform(src, to_case[:3, :3], to_case[:3, 3], output_shape=shape, order=0, mode="constant",
                               cval=0)  # fmt: skip
    return out > 0


def frequency_map(warped: list[np.ndarray]) -> np.ndarray:
    """Voxel-wise share (0-1, float32) of the warped masks with a lesion; zeros when the list is empty."""
    shape, _ = map_grid()
    if not warped:
        return np.zeros(shape, np.float32)
    total = np.zeros(shape, np.float64)
    for w in warped:
        total += w
    return (total / len(warped)).astype(np.float32)


def lobe_volumes(mask: np.ndarray, affine: np.ndarray, matrix: np.ndarray | None) -> dict[str, float]:
    """Lesion volume (mL) per lobe (:data:`deepisles.postprocess.atlas.LOBES`) and ``outside`` the template
    brain; ``matrix`` may be None only for an empty mask (all zero)."""
    ijk = np.argwhere(np.asarray(mask) > 0)
    out = dict.fromkeys((*LOBES, OUTSIDE), 0.0)
    if len(ijk) == 0:
        return out
    if matrix is None:
        raise ValueError("a non-empty mask needs its MNI registration")
    affine = np.asarray(affine, np.float64)
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    centres = voxel_centres_mm(Image(np.asarray(mask), affine), ijk)
    matrix = np.asarray(matrix, np.float64)
    mni = centres @ matrix[:3, :3].T + matrix[:3, 3]
    ids = load_atlas().lobe_ids(mni)
    counts = np.bincount(ids, minlength=len(LOBES) + 1)
    for k, name in enumerate(LOBES, start=1):
        out[name] = float(counts[k]) * voxel_ml
    out[OUTSIDE] = float(counts[0]) * voxel_ml
    return out

