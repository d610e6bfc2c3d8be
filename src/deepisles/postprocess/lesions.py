"""Connected lesions (26-connectivity) and the numbers measured on them."""

from __future__ import annotations

import cc3d
import numpy as np

from deepisles.io.image import Image

CONNECTIVITY = 26


def label_lesions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of a binary mask (26-connectivity), labels 1..N ordered by cc3d."""
    labels, n = cc3d.connected_components(np.asarray(mask) > 0, connectivity=CONNECTIVITY, return_N=True)
    return labels, int(n)


def lesion_table(mask: Image, adc: Image | None = None) -> list[dict]:
    """One row per lesion, largest first: id, voxels, volume (mL), centroid (RAS mm), mean ADC.

    ``adc`` must be on the mask's grid (canonical unit 10^-3 mm^2/s).
    """
    labels, n = label_lesions(mask.data)
    if n == 0:
        return []
    idx = np.nonzero(labels)
    lab = labels[idx]
    counts = np.bincount(lab, minlength=n + 1)[1:]
    coords = np.stack(idx, axis=1).astype(np.float64)
    sums = np.stack([np.bincount(lab, weights=coords[:, k], minlength=n + 1)[1:] for k in range(3)], axis=1)
    centroid_vox = sums / counts[:, None]
    centroid_mm = (mask.affine[:3, :3] @ centroid_vox.T).T + mask.affine[:3, 3]
    if adc is not None:
        adc_vals = np.asarray(adc.data, dtype=np.float64)[idx]
        mean_adc = np.bincount(lab, weights=adc_vals, minlength=n + 1)[1:] / counts
    vox_ml = mask.voxel_volume_ml
    rows = []
    for k in np.argsort(-counts, kind="stable"):
        row = {
            "id": 0,
            "voxels": int(counts[k]),
            "volume_ml": round(float(counts[k] * vox_ml), 6),
            "centroid_mm": [round(float(v), 2) for v in centroid_mm[k]],
        }
        if adc is not None:
            row["mean_adc_1e-3_mm2_s"] = round(float(mean_adc[k]), 4)
        rows.append(row)
    for i, row in enumerate(rows, start=1):
        row["id"] = i
    return rows


def lesion_summary(mask: Image) -> dict:
    """Total lesion volume (mL) and count (26-connectivity)."""
    _, n = label_lesions(mask.data)
    voxels = int(np.count_nonzero(mask.data))
    return {"volume_ml": round(voxels * mask.voxel_volume_ml, 6), "count": n, "voxels": voxels}
