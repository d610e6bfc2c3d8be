"""ISLES'22 metrics of the classical member on the real ISLES'22 case and on synthetic cases.

    python benchmarks/eval_classical.py [--n 20] [--seed 2026] [--workdir DIR]

Runs the full `deepisles segment` pipeline (files in, files out, --members classical) and scores the masks with
`deepisles evaluate`'s code. The real case is read from ../shared/data/isles22 (skipped when absent).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from deepisles.api import evaluate, segment, synth

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "isles22" / "sub-strokecase0001"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--members", default="classical")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="deepisles-eval-"))
    work.mkdir(parents=True, exist_ok=True)

    if REAL.exists():
        out = work / "real"
        t = time.perf_counter()
        segment(REAL / "sub-strokecase0001_ses-0001_dwi.nii.gz", REAL / "sub-strokecase0001_ses-0001_adc.nii.gz",
                outdir=out, members=args.members, device="cpu", overwrite=True)
        dt = time.perf_counter() - t
        rows, _ = evaluate(out / "lesion_mask.nii.gz", REAL / "sub-strokecase0001_ses-0001_msk.nii.gz")
        r = rows[0]
        print(f"real ISLES'22 sub-strokecase0001 ({dt:.1f} s): dice {r['dice']:.3f}  lesion_f1 {r['lesion_f1']:.3f}  "
              f"abs_volume_diff_ml {r['abs_volume_diff_ml']:.2f}  abs_lesion_count_diff {r['abs_lesion_count_diff']}")
    else:
        print(f"real case not found at {REAL}; skipped")

    data = work / "synth"
    ids = synth(data, args.n, args.seed, overwrite=True)
    preds = work / "pred"
    preds.mkdir(exist_ok=True)
    times = []
    for sub in ids:
        raw = data / "rawdata" / sub / "ses-0001"
        t = time.perf_counter()
        segment(raw / f"{sub}_ses-0001_dwi.nii.gz", raw / f"{sub}_ses-0001_adc.nii.gz",
                raw / f"{sub}_ses-0001_flair.nii.gz", outdir=preds / sub, members=args.members, device="cpu",
                overwrite=True, preview=False)
        times.append(time.perf_counter() - t)
    rows, summary = evaluate(preds, data)
    print(f"\n{len(rows)} synthetic cases (seed {args.seed}), {np.mean(times):.1f} s/case:")
    print(f"{'case':<18}{'dice':>8}{'f1':>8}{'|dV| mL':>10}{'|dN|':>6}")
    for r in rows:
        print(f"{r['case']:<18}{r['dice']:8.3f}{r['lesion_f1']:8.3f}{r['abs_volume_diff_ml']:10.2f}"
              f"{r['abs_lesion_count_diff']:6d}")
    for k, s in summary.items():
        print(f"{k:<24} mean {s['mean']:.3f}  median {s['median']:.3f}  IQR {s['q1']:.3f}–{s['q3']:.3f}")


if __name__ == "__main__":
    main()
