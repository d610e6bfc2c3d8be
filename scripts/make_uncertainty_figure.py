"""docs/uncertainty_agreement.png: a lesion_agreement.nii.gz slice of a synthetic case (docs/validation.md).

    python scripts/make_uncertainty_figure.py [OUT.png] [--seed 3]

Segments a synthetic case (deepisles.synth, not patient data) with the members `auto` picks (the packaged
default models when no weights are installed: one network each) and draws the axial slice holding most lesion:
DWI, the agreement map over it (0 transparent) and the ensemble mask's outline; the title carries report.json's
review flag.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default=str(Path(__file__).parents[1] / "docs" / "uncertainty_agreement.png"))
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()

    from deepisles.api import segment
    from deepisles.synth import generate_case

    case = generate_case(args.seed, lesion=True, with_flair=True)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for name in ("dwi", "adc", "flair"):
            nib.save(getattr(case, name).to_nifti(), d / f"{name}.nii.gz")
        segment(d / "dwi.nii.gz", d / "adc.nii.gz", d / "flair.nii.gz", outdir=d / "out", device="cpu",
                preview=False, html=False)  # fmt: skip
        dwi_img = nib.load(d / "dwi.nii.gz")
        dwi = np.asarray(dwi_img.dataobj, dtype=np.float32)
        sx, sy = (float(v) for v in dwi_img.header.get_zooms()[:2])
        agree = np.asarray(nib.load(d / "out" / "lesion_agreement.nii.gz").dataobj)
        mask = np.asarray(nib.load(d / "out" / "lesion_mask.nii.gz").dataobj) > 0
        u = json.loads((d / "out" / "report.json").read_text())["uncertainty"]

    z = int(np.argmax((agree > 0).sum(axis=(0, 1))))
    fig, ax = plt.subplots(figsize=(4.6, 4.2), dpi=100)
    aspect = sy / sx  # square millimetres, not square voxels
    ax.imshow(dwi[:, :, z].T, cmap="gray", origin="lower", aspect=aspect)
    shown = np.ma.masked_where(agree[:, :, z] <= 0, agree[:, :, z])
    im = ax.imshow(shown.T, cmap="viridis", vmin=0, vmax=1, origin="lower", alpha=0.85, aspect=aspect)
    if mask[:, :, z].any():
        ax.contour(mask[:, :, z].T.astype(float), levels=[0.5], colors="red", linewidths=1.0, origin="lower")
    nets = ", ".join(f"{k} {v}" for k, v in u["networks"].items())
    flag = {True: "review recommended", False: "no review flag", None: "not assessed"}[u["review_recommended"]]
    ax.set_title(f"network agreement\n{nets}\n{flag}; disagreement {u['disagreement_volume_ml']:.1f} mL",
                 fontsize=8)  # fmt: skip
    ax.axis("off")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="share of networks voting lesion")
    fig.tight_layout()
    fig.savefig(args.out)
    print(args.out, json.dumps({k: u[k] for k in ("networks", "disagreement_volume_ml", "mean_agreement_in_mask",
                                                  "review_recommended", "reasons")}))  # fmt: skip


if __name__ == "__main__":
    main()
