"""The synthetic example of docs/validation.md ("Stratified evaluation"): a cohort of 40 box-and-ball lesion masks
with imperfect predictions and three scanner vendors, scored with ``deepisles evaluate --by``.

    python scripts/strata_example.py OUT_DIR     # writes OUT_DIR/cohort (dataset, predictions) and OUT_DIR/strata

Everything is made here with numpy (seed 0): no data needed. Vendor "C" predictions are made worse on purpose.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from deepisles import api

SHAPE, SPACING = (64, 64, 48), 2.0  # 0.008 mL per voxel


def _ball(shape, centre, radius):
    z = np.indices(shape).astype(np.float32)
    return sum((z[i] - centre[i]) ** 2 for i in range(3)) <= radius**2


def _case(rng, vendor):
    gt = np.zeros(SHAPE, bool)
    n = int(rng.choice([0, 1, 1, 1, 2, 3, 5, 8]))
    big = rng.random() < 0.4
    for _ in range(n):
        r = rng.uniform(6, 13) if big and n == 1 else rng.uniform(1.2, 5)
        c = [rng.uniform(r + 1, s - r - 1) for s in SHAPE]
        gt |= _ball(SHAPE, c, r)
    pred = gt.copy()
    labels, k = ndimage.label(gt, np.ones((3, 3, 3)))
    for i in range(1, k + 1):  # each lesion: missed, eroded or dilated
        comp = labels == i
        u = rng.random()
        if u < (0.25 if vendor == "C" else 0.08):
            pred &= ~comp
        elif u < 0.55:
            pred &= ~(comp & ~ndimage.binary_erosion(comp))
        else:
            pred |= ndimage.binary_dilation(comp)
    if rng.random() < (0.5 if vendor == "C" else 0.15):  # a false positive
        pred |= _ball(SHAPE, [rng.uniform(4, s - 4) for s in SHAPE], 2.5)
    return gt.astype(np.uint8), pred.astype(np.uint8)


def main(out: Path) -> None:
    rng = np.random.default_rng(0)
    ds, preds = out / "cohort" / "ds", out / "cohort" / "preds"
    affine = np.diag([SPACING] * 3 + [1.0])
    tsv = ["participant_id\tsite"]
    for i in range(40):
        sub, ses = f"sub-ex{i:03d}", "ses-0001"
        vendor = "ABC"[i % 3]
        gt, pred = _case(rng, vendor)
        for path, data in ((ds / "derivatives" / sub / ses / f"{sub}_{ses}_msk.nii.gz", gt),
                           (preds / f"{sub}_pred.nii.gz", pred)):  # fmt: skip
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, affine), str(path))
        raw = ds / "rawdata" / sub / ses / "dwi"
        raw.mkdir(parents=True, exist_ok=True)
        for role in ("dwi", "adc"):
            nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), affine), str(raw / f"{sub}_{ses}_{role}.nii.gz"))
        if i != 7:  # one DWI without a sidecar: its case goes to "n/a"
            side = {"Manufacturer": f"Vendor{vendor}", "MagneticFieldStrength": 3 if i % 2 else 1.5}
            (raw / f"{sub}_{ses}_dwi.json").write_text(json.dumps(side))
        tsv.append(f"{sub}\tsite{i % 4 + 1}")
    (ds / "participants.tsv").write_text("\n".join(tsv) + "\n")
    _, summary = api.evaluate(preds, ds, by=("volume", "count", "Manufacturer"), out_dir=out / "strata",
                              overwrite=True, seed=0)  # fmt: skip
    ba = summary["strata"]["bland_altman"]
    print(f"wrote {out / 'strata'}; Bland-Altman bias {ba['bias_ml']:.2f} mL, "
          f"LoA {ba['loa_low_ml']:.2f} to {ba['loa_high_ml']:.2f} mL")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "strata-example"))
