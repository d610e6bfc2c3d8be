"""CPU ``--fast`` against the full ensemble: time of the members' step and agreement, in one run.

    python benchmarks/bench_fast.py [--repeats 2] [--out benchmarks/results/cpu_fast.json]

The official-architecture fixture networks (tests/fixtures/official: SEALS 2 folds, NVAUTO 2 models, FACTORIZER
2 Res-U-Nets + 2 Swin-Factorizers; official sizes per network, random weights) imported into an empty store, on
the ensemble fixture case (DWI + ADC + FLAIR). The case is prepared once (read, FLAIR registered, brain mask);
only the members' step is timed, warm, ``--repeats`` times per mode, median reported; fp32. ``--fast`` is: SEALS
without test-time mirroring, NVAUTO models 0, 3, 6, 9, 12 (here: model 0 of 2), FACTORIZER Res-U-Nets only
(docs/deviations.md row 10). With the official 5 SEALS folds / 15 NVAUTO models the saving is larger than with
these fixture counts. Agreement: Dice of the fast mask against the full one, voxels differing, max |dp|, per member
and for the vote. The result file records the commit and the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import dump_json, provenance  # noqa: E402
from bench_precision import OFFICIAL, _agreement, _prepare, _timed_runs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MEMBERS = "seals,nvauto,factorizer"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cpu_fast.json")
    args = ap.parse_args()
    import torch

    result = {"provenance": provenance(), "torch_threads": torch.get_num_threads(), "precision": "fp32"}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DEEPISLES_HOME"] = str(Path(tmp) / "official")
        from deepisles import pipeline
        from deepisles.progress import Silent
        from deepisles.weights.importer import import_weights

        for src in (OFFICIAL / "seals" / "main", OFFICIAL / "nvauto", OFFICIAL / "factorizer"):
            import_weights(src, say=lambda _m: None)
        ens = OFFICIAL / "ensemble" / "inputs"
        files = pipeline.InputFiles(ens / "dwi.nii.gz", ens / "adc.nii.gz", ens / "flair.nii.gz")
        runs, times = {}, {}
        for mode, fast in (("full", False), ("fast", True)):
            opts = pipeline.RunOptions(members=MEMBERS, fast=fast)
            member_set = pipeline.load_members(opts, Silent())
            loaded, case = _prepare(files, opts)
            times[mode], runs[mode] = _timed_runs(member_set, case, "fp32", args.repeats)
            print(f"{mode}: members {times[mode]:.2f} s", flush=True)
        full, fast = runs["full"], runs["fast"]
        e_full, e_fast = pipeline.combine_members(full, loaded.dwi), pipeline.combine_members(fast, loaded.dwi)
        result |= {
            "case": str(files.dwi), "repeats": args.repeats,
            "members_s_full": round(times["full"], 3), "members_s_fast": round(times["fast"], 3),
            "speedup": round(times["full"] / times["fast"], 3),
            "ensemble": _agreement(e_full.mask.data, e_fast.mask.data, e_full.probability.data, e_fast.probability.data),
            "members": {a.name: _agreement(a.mask, b.mask, a.probability, b.probability)
                        for a, b in zip(full.results, fast.results, strict=True)},
        }  # fmt: skip
        print(f"speed-up x{result['speedup']}, ensemble Dice fast vs full {result['ensemble']['dice']}")
    dump_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
