"""The packaged default ensemble against the classical member: held-out synthetic cases and the real ISLES'22 case.

    python benchmarks/eval_default.py [--n 50] [--seed 777777] [--workdir DIR] [--json results/default_models.json]

Both run through the full `deepisles segment` pipeline (files in, files out) on CPU; masks are scored with the
official ISLES'22 metrics (`deepisles evaluate`'s code). The held-out seed 777777 is never used by
scripts/train_default_models.py (training streams seed*1000+100, validation seed*1000+99). The real case is read
from ../shared/data/isles22 (skipped when absent); it has no FLAIR, so the ensemble there is SEALS + NVAUTO.
The real-case wall time is measured as a user sees it: a fresh `deepisles segment` process, files to outputs.
Targets (issue 11, printed and stored as met / not met): real case Dice >= 0.5 and lesion F1 >= 0.5, both above
the classical member; held-out synthetic mean Dice >= 0.8; real case <= 30 s on 2 CPU cores; packaged default
models <= 20 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from deepisles.api import evaluate, segment, synth

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_common import provenance  # noqa: E402

REAL = REPO.parent / "shared" / "data" / "isles22" / "sub-strokecase0001"
METHODS = {"default ensemble": "auto", "classical": "classical"}


def _cli_wall(out: Path, members: str, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "deepisles", "segment", "--dwi", str(REAL / "sub-strokecase0001_ses-0001_dwi.nii.gz"),
           "--adc", str(REAL / "sub-strokecase0001_ses-0001_adc.nii.gz"), "-o", str(out), "--members", members,
           "--device", "cpu", "--overwrite"]  # fmt: skip
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return time.perf_counter() - t


def targets(d: dict, c: dict) -> dict:
    """Issue 11's acceptance figures from one run's results (``d``: default ensemble, ``c``: classical)."""
    out = {}
    size = sum(f.stat().st_size for f in (REPO / "src" / "deepisles" / "default_models").rglob("*.safetensors"))
    out["packaged models (MB)"] = {"value": round(size / 1e6, 2), "target": "<= 20", "met": size <= 20e6}
    if "real" in d and "real" in c:
        r, k = d["real"], c["real"]
        out["real Dice"] = {"value": round(r["dice"], 4), "target": ">= 0.5", "met": r["dice"] >= 0.5}
        out["real lesion F1"] = {"value": round(r["lesion_f1"], 4), "target": ">= 0.5", "met": r["lesion_f1"] >= 0.5}
        out["real Dice above classical"] = {"value": f"{r['dice']:.3f} vs {k['dice']:.3f}", "target": "above",
                                            "met": r["dice"] > k["dice"]}  # fmt: skip
        out["real F1 above classical"] = {"value": f"{r['lesion_f1']:.3f} vs {k['lesion_f1']:.3f}", "target": "above",
                                          "met": r["lesion_f1"] > k["lesion_f1"]}  # fmt: skip
        out["real wall time (s)"] = {"value": r["wall_s"], "target": "<= 30", "met": r["wall_s"] <= 30}
    if "synthetic" in d:
        v = d["synthetic"]["dice"]["mean"]
        out["synthetic mean Dice"] = {"value": v, "target": ">= 0.8", "met": v >= 0.8}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--seed", type=int, default=777777)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--reuse", action="store_true",
                    help="keep predictions already in --workdir (a case whose report.json exists is not run again; "
                         "same seed -> same synthetic cases); their time is not counted")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="deepisles-default-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["DEEPISLES_HOME"] = str(work / "home")  # an empty weight store: "auto" = the packaged defaults
    result: dict = {"n": args.n, "seed": args.seed, "threads": args.threads, **provenance(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"), "methods": {}}

    if REAL.exists():
        print("real ISLES'22 sub-strokecase0001 (DWI + ADC; no FLAIR):")
        for label, members in METHODS.items():
            out = work / "real" / members
            wall = _cli_wall(out, members, args.threads)
            rep = json.loads((out / "report.json").read_text())
            rows, _ = evaluate(out / "lesion_mask.nii.gz", REAL / "sub-strokecase0001_ses-0001_msk.nii.gz")
            r = rows[0]
            ran = [m["name"] for m in rep["members"]["run"]]
            result["methods"].setdefault(label, {})["real"] = {**{k: r[k] for k in r if k != "case"},
                                                                "wall_s": round(wall, 2), "members": ran}
            print(f"  {label:<17} dice {r['dice']:.3f}  lesion_f1 {r['lesion_f1']:.3f}  "
                  f"|dV| {r['abs_volume_diff_ml']:.2f} mL  |dN| {r['abs_lesion_count_diff']}  "
                  f"wall {wall:.1f} s (fresh process, files to outputs)  members {','.join(ran)}")
    else:
        print(f"real case not found at {REAL}; skipped")

    data = work / "synth"
    ids = synth(data, args.n, args.seed, overwrite=True)
    for label, members in METHODS.items():
        preds = work / "pred" / members
        preds.mkdir(parents=True, exist_ok=True)
        times = []
        reused = 0
        for sub in ids:
            raw = data / "rawdata" / sub / "ses-0001"
            flair = raw / f"{sub}_ses-0001_flair.nii.gz"
            if args.reuse and (preds / sub / "report.json").is_file():
                reused += 1
                continue
            t = time.perf_counter()
            segment(raw / f"{sub}_ses-0001_dwi.nii.gz", raw / f"{sub}_ses-0001_adc.nii.gz",
                    flair if flair.exists() else None, outdir=preds / sub, members=members, device="cpu",
                    overwrite=True, preview=False)  # fmt: skip
            times.append(time.perf_counter() - t)
        rows, summary = evaluate(preds, data)
        result["methods"].setdefault(label, {})["synthetic"] = {
            "cases": len(rows), "s_per_case": round(float(np.mean(times)), 2) if times else None,
            "reused_predictions": reused,
            **{k: {kk: round(vv, 4) for kk, vv in s.items()} for k, s in summary.items()},
        }
        per = f"{np.mean(times):.1f} s/case" if times else "all predictions reused"
        print(f"\n{label}: {len(rows)} held-out synthetic cases (seed {args.seed}), {per}, {reused} reused")
        for k, s in summary.items():
            print(f"  {k:<24} mean {s['mean']:.3f}  median {s['median']:.3f}  IQR {s['q1']:.3f}-{s['q3']:.3f}")

    d, c = result["methods"]["default ensemble"], result["methods"]["classical"]
    print("\nratios default / classical (same run):")
    for where in ("synthetic", "real"):
        if where in d and where in c:
            dd = d[where]["dice"]["mean"] if where == "synthetic" else d[where]["dice"]
            cd = c[where]["dice"]["mean"] if where == "synthetic" else c[where]["dice"]
            print(f"  {where:<10} Dice {dd:.3f} vs {cd:.3f}  ratio {dd / max(cd, 1e-9):.2f}x")
    result["targets"] = targets(d, c)
    print("\ntargets (issue 11):")
    for name, t in result["targets"].items():
        print(f"  {'met    ' if t['met'] else 'NOT met'}  {name}: {t['value']} (target {t['target']})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
