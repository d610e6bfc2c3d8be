"""Connected lesions (26-connectivity) and the numbers measured on them."""

from __future__ import annotations

import cc3d
import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull
from scipy.spatial.distance import pdist

from deepisles.io.image import Image

CONNECTIVITY = 26


def label_lesions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of a binary mask (26-connectivity), labels 1..N ordered by cc3d."""
    labels, n = cc3d.connected_components(np.asarray(mask) > 0, connectivity=CONNECTIVITY, return_N=True)
    return labels, int(n)


def ranked_lesions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Like :func:`label_lesions`, relabelled so that lesion 1 is the largest (ties: cc3d order).

    These ids are the ``id`` of :func:`lesion_table` rows and of ``lesions.csv``.
    """
    labels, n = label_lesions(mask)
    if n == 0:
        return labels, 0
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    remap = np.zeros(n + 1, labels.dtype)
    remap[np.argsort(-counts, kind="stable") + 1] = np.arange(1, n + 1, dtype=labels.dtype)
    return remap[labels], n


def max_extent_mm(points_mm: np.ndarray) -> float:
    """Largest distance (mm) between two of the given points (voxel centres in world mm): the lesion's
    maximum Feret diameter. Computed on the convex hull's vertices (the farthest pair is always two of them);
    0 for a single voxel."""
    pts = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
    if len(pts) < 2:
        return 0.0
    if len(pts) > 8:
        # "QJ" joggles the input, so flat (single-slice) and straight lesions get a hull too
        pts = pts[ConvexHull(pts, qhull_options="QJ").vertices]
    return float(pdist(pts).max())


def voxel_centres_mm(img: Image, ijk: np.ndarray) -> np.ndarray:
    """World (RAS mm) positions (N, 3) of voxel indices (N, 3) of ``img``."""
    return np.asarray(ijk, dtype=np.float64) @ img.affine[:3, :3].T + img.affine[:3, 3]


def lesion_table(mask: Image, adc: Image | None = None, agreement: Image | None = None) -> list[dict]:
    """One row per lesion, largest first: id, voxels, volume (mL), centroid (RAS mm), maximum extent (mm),
    mean and minimum ADC, mean and minimum network agreement.

    ``adc`` and ``agreement`` (share of networks voting lesion, :func:`deepisles.ensemble.agreement`) must be on
    the mask's grid (ADC in the canonical unit 10^-3 mm^2/s).
    """
    labels, n = ranked_lesions(mask.data)
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    centroid_vox = np.asarray(ndi.center_of_mass(np.ones(labels.shape, np.float32), labels, index))
    centroid_mm = voxel_centres_mm(mask, centroid_vox.reshape(-1, 3))
    objects = ndi.find_objects(labels)
    if adc is not None:
        adc_data = np.asarray(adc.data, dtype=np.float64)
        mean_adc = np.asarray(ndi.mean(adc_data, labels, index)).reshape(-1)
        min_adc = np.asarray(ndi.minimum(adc_data, labels, index)).reshape(-1)
    if agreement is not None:
        if tuple(agreement.shape) != tuple(labels.shape):
            raise ValueError(f"agreement map of shape {tuple(agreement.shape)}, lesion mask {tuple(labels.shape)}")
        agree = np.asarray(agreement.data, dtype=np.float64)
        mean_agree = np.asarray(ndi.mean(agree, labels, index)).reshape(-1)
        min_agree = np.asarray(ndi.minimum(agree, labels, index)).reshape(-1)
    vox_ml = mask.voxel_volume_ml
    rows = []
    for k in range(n):
        box = objects[k]
        ijk = np.argwhere(labels[box] == k + 1) + np.array([s.start for s in box])
        row = {
            "id": k + 1,
            "voxels": int(counts[k]),
            "volume_ml": round(float(counts[k] * vox_ml), 6),
            "centroid_mm": [round(float(v), 2) for v in centroid_mm[k]],
            "max_extent_mm": round(max_extent_mm(voxel_centres_mm(mask, ijk)), 2),
        }
        if adc is not None:
            row["mean_adc_1e-3_mm2_s"] = round(float(mean_adc[k]), 4)
            row["min_adc_1e-3_mm2_s"] = round(float(min_adc[k]), 4)
        if agreement is not None:
            row["agreement_mean"] = round(float(mean_agree[k]), 4)
            row["agreement_min"] = round(float(min_agree[k]), 4)
        rows.append(row)
    return rows


def lesion_summary(mask: Image) -> dict:
    """Total lesion volume (mL) and count (26-connectivity)."""
    _, n = label_lesions(mask.data)
    voxels = int(np.count_nonzero(mask.data))
    return {"volume_ml": round(voxels * mask.voxel_volume_ml, 6), "count": n, "voxels": voxels}
