"""Cases per hour of `deepisles batch`, serial against pipelined engine, in one run on this machine.

N synthetic cases (`deepisles.synth.write_dataset`), the default models (`--members auto` with an empty
DEEPISLES_HOME: the packaged defaults), CPU. Each engine runs `deepisles batch` as a child process into its own
output root; wall time covers everything (start-up, model loading, every case, cohort table). The masks of the
two runs are compared byte for byte. Result JSON with provenance (commit, machine) in benchmarks/results/.

    python benchmarks/bench_batch_throughput.py --cases 20 [--workers 0] [--work /tmp/bench-batch]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import dump_json, provenance, run_measured, tail  # noqa: E402

HERE = Path(__file__).resolve().parent


def mean_steps(root: Path) -> dict:
    """Mean of each step's seconds (report.json ``timing_s``) over the cases of one run: where the time goes."""
    import json

    sums: dict = {}
    reports = sorted(root.rglob("*_report.json"))
    for f in reports:
        for k, v in json.loads(f.read_text()).get("timing_s", {}).items():
            sums[k] = sums.get(k, 0.0) + v
    return {k: round(v / len(reports), 2) for k, v in sums.items()} if reports else {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--workers", type=int, default=0, help="pipelined worker processes (0: the engine's default)")
    ap.add_argument("--engines", default="serial,pipelined")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-batch-throughput"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "batch_throughput_cpu.json")
    args = ap.parse_args()

    from deepisles.synth import write_dataset

    shutil.rmtree(args.work, ignore_errors=True)
    (args.work / "home").mkdir(parents=True)
    t = time.perf_counter()
    write_dataset(args.work / "ds", args.cases, seed=args.seed)
    synth_s = time.perf_counter() - t
    env = {**os.environ, "DEEPISLES_HOME": str(args.work / "home")}  # empty store: auto = packaged defaults
    deepisles = str(Path(sys.executable).with_name("deepisles"))
    runs = {}
    load0 = list(os.getloadavg())
    for engine in args.engines.split(","):
        out = args.work / f"out-{engine}"
        cmd = [deepisles, "batch", "--input", str(args.work / "ds"), "-o", str(out), "--members", "auto",
               "--device", "cpu", "--engine", engine, "--workers", str(args.workers)]  # fmt: skip
        print(f"[{engine}] {' '.join(cmd)}", flush=True)
        r = run_measured(cmd, env=env, log=args.work / f"{engine}.log")
        masks = sorted(out.rglob("*_desc-lesion_mask.nii.gz"))
        r.update(engine=engine, cases_done=len(masks), cases_per_hour=round(len(masks) / r["wall_s"] * 3600, 1),
                 mean_step_s=mean_steps(out), loadavg_after=list(os.getloadavg()))
        if r["returncode"] != 0:
            r["log_tail"] = tail(r["log"])
        runs[engine] = r
        print(f"[{engine}] {r['wall_s']:.0f} s, {r['cases_per_hour']} cases/h, rc {r['returncode']}", flush=True)
    result = {
        "benchmark": "batch_throughput",
        "what": "deepisles batch wall time (start-up + model loading + all cases) per engine, default models, CPU",
        "cases": args.cases, "seed": args.seed, "workers": args.workers, "synth_s": round(synth_s, 1),
        "cpu_count": os.cpu_count(), "loadavg_before": load0, "runs": runs, "provenance": provenance(),
    }  # fmt: skip
    if {"serial", "pipelined"} <= runs.keys():
        s, p = runs["serial"], runs["pipelined"]
        result["ratio_pipelined_over_serial"] = round(p["cases_per_hour"] / s["cases_per_hour"], 3)
        a_root, b_root = args.work / "out-serial", args.work / "out-pipelined"
        same = [m for m in sorted(a_root.rglob("*_mask.nii.gz"))
                if (b_root / m.relative_to(a_root)).is_file() and (b_root / m.relative_to(a_root)).read_bytes() == m.read_bytes()]  # fmt: skip
        result["masks_identical"] = f"{len(same)} of {s['cases_done']}"
        print(f"ratio {result['ratio_pipelined_over_serial']}, identical masks {result['masks_identical']}")
    dump_json(args.out, result)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
