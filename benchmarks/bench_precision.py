"""CPU inference precision: ``--precision bf16`` against the default fp32, time and agreement, in one run.

    python benchmarks/bench_precision.py [--cases 3] [--repeats 2] [--out benchmarks/results/cpu_precision.json]

Two model sets, each on the same prepared cases (inputs read, FLAIR registered and brain mask built once; only
the members' step is timed, warm, ``--repeats`` times per precision, the median reported):

* ``default``: the packaged default models (compact SEALS/NVAUTO/FACTORIZER) on ``--cases`` synthetic cases;
* ``official-format``: the official-architecture fixture networks (tests/fixtures/official: SEALS 2 folds,
  NVAUTO 2 models, FACTORIZER 4 models, random weights, imported with ``deepisles weights import``) on the
  ensemble fixture case. Their sizes are the official ones per network, their weights are not.

Agreement: voxels whose ensemble (and member) mask differs, Dice bf16 vs fp32, max |dp|. The result file records
the commit and the machine. Refuses to run on a CPU without bfloat16 units (as ``--precision bf16`` does).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import dump_json, provenance  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = REPO / "tests" / "fixtures" / "official"


def _prepare(files, opts):
    from deepisles import pipeline
    from deepisles.progress import Silent

    trace = pipeline.Trace()
    loaded = pipeline.validate(files, opts, trace, Silent())
    return loaded, pipeline.prepare_case(loaded, opts, trace, Silent())


def _timed_runs(member_set, case, precision: str, repeats: int):
    from deepisles import pipeline
    from deepisles.progress import Silent

    pipeline.run_members(member_set, case, pipeline.Trace(), Silent(), precision)  # warm-up
    times, runs = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        runs = pipeline.run_members(member_set, case, pipeline.Trace(), Silent(), precision)
        times.append(time.perf_counter() - t)
    return statistics.median(times), runs


def _agreement(a: np.ndarray, b: np.ndarray, pa: np.ndarray, pb: np.ndarray) -> dict:
    a, b = a > 0, b > 0
    total = int(a.sum() + b.sum())
    return {"voxels_differing": int((a != b).sum()), "mask_voxels_fp32": int(a.sum()),
            "dice": 1.0 if total == 0 else round(2 * float((a & b).sum()) / total, 5),
            "max_abs_dp": float(np.abs(pa.astype(np.float64) - pb).max())}  # fmt: skip


def compare(name: str, cases: list, member_names: str, repeats: int) -> dict:
    from deepisles import pipeline
    from deepisles.progress import Silent

    opts = pipeline.RunOptions(members=member_names)
    member_set = pipeline.load_members(opts, Silent())
    rows = []
    for files in cases:
        loaded, case = _prepare(files, opts)
        t32, r32 = _timed_runs(member_set, case, "fp32", repeats)
        t16, r16 = _timed_runs(member_set, case, "bf16", repeats)
        e32, e16 = pipeline.combine_members(r32, loaded.dwi), pipeline.combine_members(r16, loaded.dwi)
        row = {"case": str(files.dwi), "members_s_fp32": round(t32, 3), "members_s_bf16": round(t16, 3),
               "speedup": round(t32 / t16, 3),
               "ensemble": _agreement(e32.mask.data, e16.mask.data, e32.probability.data, e16.probability.data),
               "members": {a.name: _agreement(a.mask, b.mask, a.probability, b.probability)
                           for a, b in zip(r32.results, r16.results, strict=True)}}  # fmt: skip
        print(name, row["case"], f"fp32 {t32:.2f} s, bf16 {t16:.2f} s, x{t32 / t16:.2f}",
              f"ensemble voxels differing {row['ensemble']['voxels_differing']}", flush=True)
        rows.append(row)
    return {"members": [m.name for m in member_set.run], "cases": rows,
            "speedup_median": round(statistics.median(r["speedup"] for r in rows), 3)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cpu_precision.json")
    args = ap.parse_args()

    from deepisles.engine.sliding_window import cpu_bf16_support

    flag = cpu_bf16_support()
    if flag is None:
        print("this CPU has no bfloat16 units (AMX-BF16 / AVX512-BF16): nothing to measure", file=sys.stderr)
        return 2
    import torch

    result = {"provenance": provenance(), "cpu_bf16": flag, "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["DEEPISLES_HOME"] = str(tmp / "home")  # empty store: the packaged default models
        from deepisles import pipeline
        from deepisles.synth import write_dataset

        ids = write_dataset(tmp / "synth", args.cases, seed=4242)
        cases = []
        for sub in ids:
            raw = tmp / "synth" / "rawdata" / sub / "ses-0001"
            cases.append(pipeline.InputFiles(raw / f"{sub}_ses-0001_dwi.nii.gz", raw / f"{sub}_ses-0001_adc.nii.gz",
                                             raw / f"{sub}_ses-0001_flair.nii.gz"))  # fmt: skip
        result["default"] = compare("default", cases, "auto", args.repeats)

        from deepisles.members import clear_cache
        from deepisles.weights.importer import import_weights

        clear_cache()
        os.environ["DEEPISLES_HOME"] = str(tmp / "official")
        for src in (OFFICIAL / "seals" / "main", OFFICIAL / "nvauto", OFFICIAL / "factorizer"):
            import_weights(src, say=lambda _m: None)
        ens = OFFICIAL / "ensemble" / "inputs"
        fixture = [pipeline.InputFiles(ens / "dwi.nii.gz", ens / "adc.nii.gz", ens / "flair.nii.gz")]
        result["official_format"] = compare("official-format", fixture, "seals,nvauto,factorizer", args.repeats)
    dump_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
