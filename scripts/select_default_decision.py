"""Pick the default ensemble's decision rule on a synthetic validation stream (never on real cases).

    python scripts/select_default_decision.py [--n 20] [--seed 2099] [--json benchmarks/results/default_decision.json]

Runs the packaged default members (an empty DEEPISLES_HOME: ``--members auto``) through ``deepisles.api.segment``
on ``n`` synthetic cases (``deepisles.synth.write_dataset(seed)``; 2099 is the validation stream of
``scripts/train_default_models.py --seed 2``, never the benchmark's held-out 777777) and scores, with the official
ISLES'22 metrics, every candidate rule from the members' probabilities:

* each member alone at thresholds 0.3-0.7;
* the DeepISLES majority vote of the member masks (the rule in use; with two members a tie goes to mean >= 0.5);
* the mean probability at thresholds 0.3-0.7;

both for the full ensemble (with FLAIR) and for DWI + ADC only (SEALS + NVAUTO: what runs on a case without FLAIR).
The pick is the rule with the best mean of Dice and lesion F1; the script only reports it (changing the rule is a
code change, recorded in docs/training.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)


def rules(probs: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from deepisles.ensemble import combine
    from deepisles.members.base import MemberResult

    out = {}
    for name, p in probs.items():
        for t in THRESHOLDS:
            out[f"{name} >= {t}"] = p >= t
    results = [MemberResult(n, probs[n], masks[n]) for n in probs]
    out["majority vote (in use)"] = combine(results)[0] > 0
    mean = np.mean([probs[n] for n in probs], axis=0)
    for t in THRESHOLDS:
        out[f"mean probability >= {t}"] = mean >= t
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=2099)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "default_decision.json")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="deepisles-decision-"))
    os.environ["DEEPISLES_HOME"] = str(work / "home")  # empty store: auto = the packaged defaults

    import nibabel as nib
    from bench_common import dump_json, provenance

    from deepisles.api import segment
    from deepisles.io.dataset import find_cases
    from deepisles.metrics import case_metrics
    from deepisles.synth import write_dataset

    write_dataset(work / "ds", args.n, seed=args.seed, overwrite=True)
    scores: dict[str, dict[str, list]] = {"with FLAIR": {}, "DWI + ADC only": {}}
    t0 = time.perf_counter()
    for i, case in enumerate(find_cases(work / "ds")):
        res = segment(case.dwi, case.adc, case.flair, members="auto", device="cpu", preview=False, html=False)
        label = np.asarray(nib.load(str(case.mask)).dataobj) > 0
        vox_ml = float(np.prod(nib.load(str(case.dwi)).header.get_zooms()[:3])) / 1000
        probs = {m.name: m.probability for m in res.members}
        masks = {m.name: m.mask for m in res.members}
        for setting, names in (("with FLAIR", list(probs)), ("DWI + ADC only", ["seals", "nvauto"])):
            names = [n for n in names if n in probs]
            for rule, mask in rules({n: probs[n] for n in names}, {n: masks[n] for n in names}).items():
                m = case_metrics(mask.astype(np.uint8), label.astype(np.uint8), vox_ml)
                scores[setting].setdefault(rule, []).append((m["dice"], m["lesion_f1"]))
        print(f"case {i + 1}/{args.n} {case.case_id}: {time.perf_counter() - t0:.0f} s", flush=True)

    table = {}
    for setting, by_rule in scores.items():
        rows = {r: {"dice": round(float(np.mean([d for d, _ in v])), 4), "lesion_f1": round(float(np.mean([f for _, f in v])), 4)}
                for r, v in by_rule.items()}  # fmt: skip
        best = max(rows, key=lambda r: rows[r]["dice"] + rows[r]["lesion_f1"])
        table[setting] = {"rules": rows, "best": best, "in_use": rows["majority vote (in use)"]}
        print(f"{setting}: best {best} {rows[best]}; in use {rows['majority vote (in use)']}")
    dump_json(args.json, {"benchmark": "default_decision", "n": args.n, "seed": args.seed, "settings": table,
                          "provenance": provenance()})  # fmt: skip
    print(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
