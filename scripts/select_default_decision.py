"""Pick the default ensemble's decision rule on a synthetic validation stream (never on real cases).

    python scripts/select_default_decision.py [--n 20] [--seed 2099] [--json benchmarks/results/default_decision.json]

Runs the packaged default members (an empty DEEPISLES_HOME: ``--members auto``) through ``deepisles.api.segment``
on ``n`` synthetic cases (``deepisles.synth.write_dataset(seed)``; 2099 is the validation stream of
``scripts/train_default_models.py --seed 2``, never the benchmark's held-out 777777) and scores, with the official
ISLES'22 metrics, every candidate rule from the members' probabilities:

* each member alone at thresholds 0.3-0.7;
* the DeepISLES majority vote of the member masks (the rule in use; with two members a tie goes to mean >= 0.5);
* the mean probability at thresholds 0.3-0.7;
* the vote with SEALS and NVAUTO deciding at ``decision_threshold`` t = 0.3-0.7 (their member setting; FACTORIZER at
  0.5; ``deepisles.ensemble.combine``, so two members at t are exactly "mean probability >= t") - the rules the
  shipped models can use;

both for the full ensemble (with FLAIR) and for DWI + ADC only (SEALS + NVAUTO: what runs on a case without FLAIR).
It reports the best rule of each setting, and picks the ``decision_threshold`` with the best mean of Dice and lesion
F1 over both settings (ties: the one nearest 0.5). ``--apply`` writes that pick into the packaged SEALS and NVAUTO
``member.json`` (``settings.decision_threshold``; the weights and their checksums are not touched).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
TUNED = ("seals", "nvauto")  # the members with a decision_threshold setting


def rules(probs: dict[str, np.ndarray], masks: dict[str, np.ndarray], thresholds: dict[str, float]) -> dict[str, np.ndarray]:
    from deepisles.ensemble import combine
    from deepisles.members.base import MemberResult

    out = {}
    for name, p in probs.items():
        for t in THRESHOLDS:
            out[f"{name} >= {t}"] = p >= t
    results = [MemberResult(n, probs[n], masks[n], threshold=thresholds[n]) for n in probs]
    out["majority vote (in use)"] = combine(results)[0] > 0
    mean = np.mean([probs[n] for n in probs], axis=0)
    for t in THRESHOLDS:
        out[f"mean probability >= {t}"] = mean >= t
    for t in THRESHOLDS:
        at = {n: (t if n in TUNED else 0.5) for n in probs}
        voters = [MemberResult(n, probs[n], (probs[n] >= np.float32(at[n])).astype(np.uint8), threshold=at[n])
                  for n in probs]
        out[vote_rule(t)] = combine(voters)[0] > 0
    return out


def vote_rule(t: float) -> str:
    return f"vote, SEALS and NVAUTO at decision_threshold {t}"


def pick_threshold(table: dict) -> tuple[float, dict]:
    """The decision_threshold with the best mean of (Dice + lesion F1) / 2 over the settings (ties: nearest 0.5)."""
    score = {t: float(np.mean([(table[s]["rules"][vote_rule(t)]["dice"] + table[s]["rules"][vote_rule(t)]["lesion_f1"])
                               / 2 for s in table])) for t in THRESHOLDS}  # fmt: skip
    best = max(THRESHOLDS, key=lambda t: (round(score[t], 4), -abs(t - 0.5)))
    return best, {str(t): round(v, 4) for t, v in score.items()}


def apply(threshold: float) -> list[Path]:
    """Write ``settings.decision_threshold`` into the packaged SEALS and NVAUTO member.json (atomically)."""
    from deepisles.io.write import write_json_atomic
    from deepisles.members.base import DEFAULT_MODELS_DIR
    from deepisles.members.registry import spec

    written = []
    for name in TUNED:
        path = DEFAULT_MODELS_DIR / name / "member.json"
        meta = json.loads(path.read_text())
        meta.setdefault("settings", {})["decision_threshold"] = float(threshold)
        spec(name).runtime_class().parse(meta, path)  # still a valid member.json
        write_json_atomic(path, meta)
        written.append(path)
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=2099)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "default_decision.json")
    ap.add_argument("--apply", action="store_true", help="write the picked decision_threshold into the packaged "
                    "SEALS and NVAUTO member.json")
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
        thresholds = {m.name: m.threshold for m in res.members}
        for setting, names in (("with FLAIR", list(probs)), ("DWI + ADC only", ["seals", "nvauto"])):
            names = [n for n in names if n in probs]
            sub = {n: probs[n] for n in names}, {n: masks[n] for n in names}, {n: thresholds[n] for n in names}
            for rule, mask in rules(*sub).items():
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
    pick, by_threshold = pick_threshold(table)
    print(f"decision_threshold pick: {pick} (mean of (Dice + F1) / 2 over both settings: {by_threshold})")
    dump_json(args.json, {"benchmark": "default_decision", "n": args.n, "seed": args.seed, "settings": table,
                          "decision_threshold": {"pick": pick, "score_by_threshold": by_threshold,
                                                 "applied": bool(args.apply)},
                          "provenance": provenance()})  # fmt: skip
    print(args.json)
    if args.apply:
        for path in apply(pick):
            print(f"wrote decision_threshold {pick} into {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
