#!/usr/bin/env python
"""The GPU targets of issue 13 (item 3) measured in one run, written to one result file.

Parts (in this order; each is skipped with a note when ``--budget`` would be overrun):

1. ``ensemble`` -- the full official-format ensemble (SEALS 5 folds, NVAUTO 15 SegResNets, FACTORIZER 5 Res-U-Nets
   + 5 Swin-Factorizers, official architectures) through ``deepisles.api.segment`` (what ``deepisles segment``
   calls), files in -> every output written (``save_members``), in its own process (``bench_ensemble.py _ours``):
   members loaded once, one warm-up case, then ``--repeats`` warm cases. Warm seconds per case; peak GPU memory
   (``torch.cuda.max_memory_allocated``, largest phase of any case; ``nvidia-smi`` memory.used sampled meanwhile);
   on CPU peak RSS. Target: warm <= 5 s per case, peak <= 12 GiB.
2. ``nvauto`` -- TFLOP/s of the official NVAUTO SegResNet (own process): FLOPs of one batch of windows counted by
   ``torch.utils.flop_counter.FlopCounterMode`` (forward), N batches timed after warm-up with synchronisation. In
   the engine's own configuration (``deepisles.engine.sliding_window.autocast``: fp16 autocast on CUDA, NCDHW,
   ``sw_batch_size`` windows per batch; once as the bare network, once as ``NvautoMember.infer``, the member's
   sliding window over an image of 2 x 2 x 2 windows) and in bf16 autocast + ``channels_last_3d`` with batched
   windows. Target: >= 200 TFLOP/s (best bf16 + channels_last_3d configuration).
3. ``cohort`` -- ``deepisles batch --engine pipelined`` over M synthetic cases (``deepisles.synth.write_dataset``)
   with the same members on the device, as a child process: cases per hour over the whole process (start-up and
   model loading included) and between the first and the last finished case (steady state, what a long cohort
   sees; the target is judged on it). Target: >= 1,000 cases/h.
4. ``agreement`` -- the device path of part 1 (its last warm case) against the fp32 CPU path on the same case and
   the same random-weight networks, run here on the CPU: voxels whose ensemble mask differs, max |dp| of the
   ensemble probability (and per member). When every fold/model of a member holds the same tensors (the
   ``--replicate`` build, checked by the SHA-256 in member.json), the CPU reference runs one network per
   architecture (a store of one fold/model each, imported from the same files): the mean of N identical networks
   is that network's output up to float32 rounding of the mean, and the CPU run costs 1/5-1/15 of the full one.

Weights (``--weights``):

* ``official``: official-format files with random values built by DeepISLES' own code in the reference
  environments (``bench_ensemble.ensure_official``, ``--replicate``), linked into subsets and imported with
  ``deepisles weights import`` (``bench_ensemble.make_subset`` / ``ensure_store``), under ``--workdir``. Arguments
  this script does not know go to bench_ensemble's parser (``--deepisles-src``, ``--factorizer-configs``,
  ``--ref-pythonpath``, ``--ours-pythonpath``, ...). The official DeepISLES weights are not used (not public
  here); the result file says so.
* ``fixtures``: tests/fixtures/official (small networks in the official formats, random weights) replicated to the
  official counts, imported the same way: the dry run's weights, no reference environment needed.

``--dry-run``: CPU, fixture weights, smallest sizes (1 warm case, NVAUTO on 64^3 windows with the official
architecture, 2 cohort cases, 2 timed batches), so that every part's code runs in a few minutes on 2 cores. The
device path of parts 1, 3 and 4 is then the CPU with ``--precision bf16`` (the CPU's reduced-precision path, the
closest to the GPU's fp16 autocast) when the CPU has bfloat16 units. The result says ``"dry_run": true`` and
marks every target "not measured": its numbers are not GPU measurements.

    # GPU machine (gpu_run.sh does this): build + import the weights, then the four parts
    python benchmarks/bench_gpu_targets.py --device cuda --workdir /tmp/wd --case CASE --budget 420 \\
        --out gpu_targets.json [bench_ensemble.py reference options]
    # dry run on this CPU
    python benchmarks/bench_gpu_targets.py --dry-run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
try:
    import deepisles  # noqa: F401
except ImportError:  # a copied tree without an installed package (a lent GPU machine)
    sys.path.insert(0, str(REPO / "src"))

import bench_ensemble as be  # noqa: E402
from bench_common import NvidiaSmiSampler, dump_json, nvidia_smi, provenance, run_measured, tail  # noqa: E402

MEMBERS = ("seals", "nvauto", "factorizer")
OFFICIAL_COUNTS = {"seals": 5, "nvauto": 15, "resunet": 5, "swin": 5}
SINGLE_COUNTS = {"seals": 1, "nvauto": 1, "resunet": 1, "swin": 1}
FIXTURES = REPO / "tests" / "fixtures" / "official"
GIB = 2**30

# the targets (issue 13, item 3) and where they stood before
TARGETS = {
    "ensemble_warm_s_per_case": {
        "target": 5.0, "better": "lower", "unit": "s per case",
        "what": "full official-format ensemble, files -> all outputs, warm (after one warm-up case), one GPU",
        "before": "18.2 s warm on an H200 (results/gpu_h200_full.json; fp16 autocast, 8 flips per SEALS batch)"},
    "peak_gpu_memory_gib": {
        "target": 12.0, "better": "lower", "unit": "GiB",
        "what": "torch.cuda.max_memory_allocated, largest phase of any case of part 1 (2^30 bytes)",
        "before": "13.6 GiB (13 922.7 MiB, SEALS, before the 4-flip change; results/gpu_h200_full.json)"},
    "nvauto_tflops": {
        "target": 200.0, "better": "higher", "unit": "TFLOP/s",
        "what": "official NVAUTO SegResNet forward, bf16 autocast + channels_last_3d + batched windows (best batch)",
        "before": "198 TFLOP/s on an H200 for that network (issue 13)"},
    "cohort_cases_per_hour": {
        "target": 1000.0, "better": "higher", "unit": "cases/h",
        "what": "deepisles batch --engine pipelined, full official-format ensemble, one GPU, steady state",
        "before": "not measured on a GPU (CPU: results/batch_throughput_cpu.json when present)"},
    "agreement_with_fp32_cpu": {
        "target": "stated", "better": None, "unit": "voxels / probability",
        "what": "device path vs fp32 CPU path, same case and networks: ensemble mask voxels differing, max |dp|",
        "before": "NVAUTO alone vs the reference on an H200: 208 voxels (fp16 both sides)"},
}  # fmt: skip


def log(msg: str) -> None:
    print(f"[targets {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- weights ---------------------------------------------------------------------------------------------
def _symlink(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists() and not dst.is_symlink():
        os.symlink(src, dst)


def official_from_fixtures(dest: Path, counts: dict) -> Path:
    """An official-layout folder made of the official-format test fixtures, every fold/model a link to the first
    one (what ``--replicate`` builds at full size): SEALS (nnU-Net v1 DDP), NVAUTO (TorchScript), FACTORIZER
    (Lightning checkpoints)."""
    w = dest / "weights"
    seals = FIXTURES / "seals" / "main" / "weights" / be.SEALS_REL
    _symlink(seals / "plans.pkl", w / be.SEALS_REL / "plans.pkl")
    for k in range(counts["seals"]):
        _symlink(seals / "fold_0", w / be.SEALS_REL / f"fold_{k}")
    for k in range(counts["nvauto"]):
        _symlink(FIXTURES / "nvauto" / "weights" / "NVAUTO" / "ts" / "model0.ts", w / "NVAUTO" / "ts" / f"model{k}.ts")
    flogs = FIXTURES / "factorizer" / "weights" / be.FACT_LOGS
    for arch, n in (("resunet", counts["resunet"]), ("swin-factorizer", counts["swin"])):
        for f in range(n):
            _symlink(flogs / "fold0" / arch, w / be.FACT_LOGS / f"fold{f}" / arch)
    return dest


def store_summary(home: Path) -> dict:
    """Per member of a store: models, architectures, bytes of the weight files, the network description."""
    out = {}
    for m in MEMBERS:
        mj = home / "weights" / m / "member.json"
        if not mj.is_file():
            out[m] = {"missing": str(mj)}
            continue
        meta = json.loads(mj.read_text())
        files = meta.get("files") or {}
        archs: dict = {}
        for e in meta.get("models") or []:
            archs[e.get("arch") or "-"] = archs.get(e.get("arch") or "-", 0) + 1
        net = meta.get("network")
        out[m] = {
            "models": len(meta.get("models") or []), "archs": archs,
            "bytes": sum((home / "weights" / m / f).stat().st_size for f in files if (home / "weights" / m / f).exists()),
            "network": net if len(json.dumps(net)) < 2000 else (net or {}).get("class"),
            "source": meta.get("source"),
        }  # fmt: skip
    return out


def _same_file(paths: list[Path]) -> bool:
    """Every path is the same file (hard links or symlinks to one inode) or holds the same bytes."""
    if not paths or not all(p.is_file() for p in paths):
        return False
    ids = {(p.stat().st_dev, p.stat().st_ino) for p in paths}
    if len(ids) == 1:
        return True
    from deepisles.io.hashing import sha256_file

    return len({sha256_file(p) for p in paths}) == 1


def official_replication(official: Path, counts: dict) -> dict:
    """Per member: whether every fold/model of the official-layout folder is the same file as the first (what
    ``--replicate`` builds). Decided on the official files: the imported safetensors differ in their metadata."""
    w = official / "weights"
    seals = [w / be.SEALS_REL / f"fold_{k}" for k in range(counts["seals"])]
    fact = {a: [w / be.FACT_LOGS / f"fold{f}" / a / be.FACT_CKPT for f in range(n)]
            for a, n in (("resunet", counts["resunet"]), ("swin-factorizer", counts["swin"]))}  # fmt: skip
    return {
        "seals": all(_same_file([d / f for d in seals]) for f in ("model_final_checkpoint.model",
                                                                  "model_final_checkpoint.model.pkl")),
        "nvauto": _same_file([w / "NVAUTO" / "ts" / f"model{k}.ts" for k in range(counts["nvauto"])]),
        "factorizer": all(_same_file(v) for v in fact.values()),
    }  # fmt: skip


def prepare_weights(args, env) -> dict:
    """Official(-format) folder -> subset -> imported store, for the run's counts and (when every member is
    replicated) for one network per architecture."""
    wd = args.workdir
    logs = wd / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    counts = dict(args.counts)
    info = {"kind": args.weights, "counts": counts, "counts_are_official": counts == OFFICIAL_COUNTS,
            "official_weights": False}
    t = time.perf_counter()
    if args.weights == "fixtures":
        official = official_from_fixtures(wd / "official_fixtures", counts)
        info["what"] = ("tests/fixtures/official: small networks in the official formats (nnU-Net v1 DDP pickles, "
                        "TorchScript SegResNets, Lightning checkpoints) with random weights, NOT the official "
                        "architectures' sizes; fold/model 0 linked as every other fold/model; imported with "
                        "`deepisles weights import`")  # fmt: skip
    else:
        official = wd / "official"
        info["build"] = be.ensure_official(env, official, counts, logs)
        info["what"] = ("official-format files at the official architectures' sizes with RANDOM weights, built by "
                        "DeepISLES' own code (benchmarks/reference/build_*.py"
                        f"{', --replicate: one network per architecture linked as every fold/model' if env.args.replicate else ''}"
                        "), imported with `deepisles weights import`; the official DeepISLES weights are not "
                        "present")  # fmt: skip
    subset, tag = be.make_subset(official, wd / "subsets", counts)
    home = wd / "stores" / (tag if args.weights == "official" else f"fixtures_{tag}")
    imp = be.ensure_store(env, subset, home, list(MEMBERS), logs)
    info.update(official=str(official), store=str(home), members=store_summary(home))
    if imp:
        info["import"] = imp
    info["replicated_members"] = official_replication(official, counts)
    info["replicated"] = all(info["replicated_members"].values())
    if info["replicated"] and counts != SINGLE_COUNTS:
        sub1, tag1 = be.make_subset(official, wd / "subsets", SINGLE_COUNTS)
        home1 = wd / "stores" / (tag1 if args.weights == "official" else f"fixtures_{tag1}")
        be.ensure_store(env, sub1, home1, list(MEMBERS), logs)
        info["reference_store"] = str(home1)
        info["reference_store_note"] = ("every fold/model of each member holds the same tensors: the fp32 CPU "
                                        "reference (part 4) runs one network per architecture from this store")
    else:
        info["reference_store"] = str(home)
    info["prepare_s"] = round(time.perf_counter() - t, 1)
    return info


# --- part 2: NVAUTO throughput (own process) -----------------------------------------------------------------
def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def nvauto_worker(a) -> None:
    """``_nvauto``: TFLOP/s of one NVAUTO SegResNet in several configurations; writes ``a.result`` (JSON)."""
    import dataclasses

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from deepisles import store
    from deepisles.engine.sliding_window import autocast as engine_autocast
    from deepisles.engine.sliding_window import monai_starts
    from deepisles.members.nvauto import NvautoMember, build_segresnet

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    meta, folder = store.read_member_folder(Path(a.store) / "weights" / "nvauto")
    config = NvautoMember.parse(meta, Path(folder) / "member.json")
    entry = config.models[0]
    settings = config.settings
    res = {"device": str(dev), "store_network": config.network_of(entry)}
    if a.official_config:  # the store holds a small fixture network: the documented official architecture instead
        sys.path.insert(0, str(HERE / "reference"))
        from build_nvauto import CONFIG  # the configuration the reference build uses (MONAI SegResNet kwargs)

        torch.manual_seed(0)
        spec = {"class": "SegResNet", "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in CONFIG.items()}}
        net = build_segresnet(spec).eval().requires_grad_(False)
        res["network"] = spec
        res["network_source"] = ("the official NVAUTO configuration of benchmarks/reference/build_nvauto.py built by "
                                 "deepisles' build_segresnet, random weights (the store's network is a small fixture)")
    else:
        net = NvautoMember.load_network(config, entry, Path(folder))
        res["network"] = config.network_of(entry)
        res["network_source"] = f"store model {entry.name} ({folder})"
    net = net.to(dev)
    res["parameters_m"] = round(sum(p.numel() for p in net.parameters()) / 1e6, 2)
    roi = [int(v) for v in (a.window.split(",") if a.window else settings.roi_size)]
    sw = int(settings.sw_batch_size)
    res.update(window=roi, sw_batch_size=sw, engine_amp=bool(settings.amp), warmup=a.warmup, iters=a.iters,
               cudnn_benchmark_default=torch.backends.cudnn.benchmark)  # fmt: skip

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def flops_of(x, ctx) -> int:
        with torch.inference_mode(), ctx():
            with FlopCounterMode(display=False) as fc:
                net(x)
        return int(fc.get_total_flops())

    def timed(fn, warmup, iters) -> float:
        with torch.inference_mode():
            for _ in range(warmup):
                fn()
            sync()
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            sync()
        return (time.perf_counter() - t) / iters

    def measure(name, batch, ctx, memory_format, dtype_note):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        x = torch.randn(batch, 2, *roi, device=dev).contiguous(memory_format=memory_format)
        flops = flops_of(x, ctx)

        def run():
            with ctx():
                net(x)

        s = timed(run, a.warmup, a.iters)
        row = {"config": name, "batch": batch, "precision": dtype_note, "memory_format": str(memory_format),
               "flops_per_batch": flops, "tflop_per_window": round(flops / batch / 1e12, 4),
               "s_per_batch": round(s, 5), "windows_per_s": round(batch / s, 2), "tflops": _sig(flops / s / 1e12)}
        if cuda:
            row["gpu_peak_alloc_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        log(f"nvauto {name}: {row['tflops']} TFLOP/s ({row['s_per_batch']} s per batch of {batch})")
        res["configs"].append(row)
        Path(a.result).write_text(json.dumps(res, indent=2))  # what is done survives a timeout
        return row

    res["configs"] = []
    engine_prec = "fp16 autocast" if cuda and settings.amp else "fp32"

    def engine_ctx():
        return engine_autocast(dev, bool(settings.amp))

    # (a) the engine's configuration, bare network
    base = measure(f"engine_network_b{sw}", sw, engine_ctx, torch.contiguous_format, engine_prec)
    # (b) the engine itself: the member's sliding window over an image of 2 x 2 x 2 windows (blending included)
    shape = [r + max(8, r // 6) for r in roi]
    member = NvautoMember(config.replace(models=(entry,), settings=dataclasses.replace(settings, roi_size=tuple(roi))),
                          [net], device=dev)  # fmt: skip
    img = torch.randn(2, *shape)
    windows = 1
    for s, r in zip(shape, roi, strict=True):
        windows *= len(monai_starts(s, r, float(settings.overlap)))
    s = timed(lambda: [p for p in member.infer(img)], min(a.warmup, 1), max(1, a.iters // 5))
    per_window = base["flops_per_batch"] / base["batch"]
    row = {"config": "engine_sliding_window", "image": shape, "windows": windows, "batch": sw,
           "precision": engine_prec, "memory_format": str(torch.contiguous_format),
           "s_per_image": round(s, 4), "tflops": _sig(windows * per_window / s / 1e12),
           "note": "NvautoMember.infer on one model: padding, window batches of sw_batch_size, Gaussian blending, "
                   "softmax; FLOPs = windows x the bare network's FLOPs per window"}  # fmt: skip
    log(f"nvauto engine_sliding_window: {row['tflops']} TFLOP/s ({windows} windows in {row['s_per_image']} s)")
    res["configs"].append(row)
    Path(a.result).write_text(json.dumps(res, indent=2))
    # (c) bf16 autocast + channels_last_3d, batched windows
    net.to(memory_format=torch.channels_last_3d)

    def bf16():
        return torch.autocast(dev.type, dtype=torch.bfloat16)

    for b in sorted({sw, *a.batches}):
        measure(f"bf16_cl3d_b{b}", b, bf16, torch.channels_last_3d, "bf16 autocast")
    if cuda and a.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
        b = max(sw, *a.batches)
        measure(f"bf16_cl3d_b{b}_cudnn_benchmark", b, bf16, torch.channels_last_3d, "bf16 autocast")
        torch.backends.cudnn.benchmark = False
    bf = [r for r in res["configs"] if r["config"].startswith("bf16_cl3d")]
    best = max(bf, key=lambda r: r["tflops"])
    res["best_bf16_cl3d"] = {"config": best["config"], "tflops": best["tflops"]}
    res["engine_network_tflops"] = base["tflops"]
    res["engine_sliding_window_tflops"] = row["tflops"]
    if cuda:
        res["device_name"] = torch.cuda.get_device_name(dev)
    Path(a.result).write_text(json.dumps(res, indent=2))


# --- parts run from the parent -----------------------------------------------------------------------------
def make_env(args, device: str, repeats: int):
    """bench_ensemble's Env (interpreters, PYTHONPATH, DEEPISLES_HOME) for ``device``; reference options from the
    arguments this script passed through."""
    eargs = be.parse_args(["--device", device, "--workdir", str(args.workdir), "--repeats", str(repeats),
                           *(["--replicate"] if args.weights == "official" else []), *args.passthrough])  # fmt: skip
    return be.Env(eargs)


def case_inputs(case: Path) -> tuple[Path, Path, Path | None]:
    """DWI, ADC and FLAIR (None when the case has none) of a case folder."""
    if (case / "dwi.nii.gz").exists():  # the ensemble fixture's layout
        fl = case / "flair.nii.gz"
        return case / "dwi.nii.gz", case / "adc.nii.gz", fl if fl.exists() else None
    dwi, adc = be.case_files(case)
    fl = sorted(case.glob("*_flair.nii*"))
    return dwi, adc, fl[0] if fl else None


def _members_in_report(outdir: Path) -> dict:
    rep = outdir / "report.json"
    if not rep.exists():
        return {}
    r = json.loads(rep.read_text())
    runs = (r.get("members") or {}).get("run") or []
    keep = ("weights", "models", "device", "amp", "fast", "precision")
    return {m.get("name"): {k: m[k] for k in keep if k in m} for m in runs} | {
        "_skipped": (r.get("members") or {}).get("skipped")}


def part_ensemble(args, env, home: Path, case, timeout: float) -> dict:
    dwi, adc, flair = case
    cuda = args.device.startswith("cuda")
    run_dir = args.workdir / "runs" / f"targets_{args.device.replace(':', '')}{'_dryrun' if args.dry_run else ''}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    with NvidiaSmiSampler(enabled=cuda) as smi:
        r = be.run_ours(env, home, list(MEMBERS), dwi, adc, run_dir, timeout, flair=flair, precision=args.precision)
    cases = r.get("cases") or []
    out = {"process": r.get("process"), "precision": args.precision, "flair": str(flair) if flair else
           "none in the case: a copy of the DWI is given as FLAIR (FACTORIZER needs one)", "repeats": args.repeats}  # fmt: skip
    if not cases:
        out["error"] = (r.get("process") or {}).get("error") or "no case finished"
        return out
    warm = [c["wall_s"] for c in cases[1:]]
    out.update({
        "import_s": r.get("import_s"), "load_s": r.get("load_total_s"),
        "load": {m: {k: v for k, v in p.items() if k != "phase"} for m, p in (r.get("load") or {}).items()},
        "first_case_s": cases[0]["wall_s"], "warm_s": warm,
        "warm_median_s": round(statistics.median(warm), 3) if warm else None,
        "warm_min_s": min(warm) if warm else None,
        "steps_s_last_case": cases[-1].get("timing_s"),
        "phases_last_case": [{k: p.get(k) for k in ("phase", "wall_s", "gpu_peak_alloc_mib", "peak_rss_mib")}
                             for p in cases[-1]["phases"]],
        "outdir_last_case": cases[-1]["outdir"],
        "members": _members_in_report(Path(cases[-1]["outdir"])),
        "peak_rss_mib": max([(r.get("process") or {}).get("peak_rss_mib") or 0] + [c.get("peak_rss_mib") or 0 for c in cases]),
    })  # fmt: skip
    if cuda:
        out["gpu_peak_alloc_mib"] = max(c.get("gpu_peak_alloc_mib", 0) for c in cases)
        out["gpu_peak_alloc_mib_warm"] = max((c.get("gpu_peak_alloc_mib", 0) for c in cases[1:]), default=None)
        out["gpu_peak_reserved_mib"] = max(c.get("gpu_peak_reserved_mib", 0) for c in cases)
        phases = [p for c in cases for p in c["phases"]]
        top = max(phases, key=lambda p: p.get("gpu_peak_alloc_mib", 0))
        out["gpu_peak_phase"] = top["phase"]
        out["gpu_models_resident_mib"] = max((p.get("gpu_peak_alloc_mib") or 0) for p in (r.get("load") or {}).values())
        out["nvidia_smi"] = smi.result()
    return out


def part_nvauto(args, env, home: Path, timeout: float) -> dict:
    res_file = args.workdir / "runs" / f"nvauto_{args.device.replace(':', '')}.json"
    res_file.parent.mkdir(parents=True, exist_ok=True)
    res_file.unlink(missing_ok=True)
    cmd = [env.ours_python, str(Path(__file__).resolve()), "_nvauto", "--device", args.device, "--store", str(home),
           "--result", str(res_file), "--warmup", str(args.nvauto_warmup), "--iters", str(args.nvauto_iters),
           "--batches", ",".join(map(str, args.nvauto_batches))]  # fmt: skip
    if args.nvauto_window:
        cmd += ["--window", args.nvauto_window]
    if args.weights == "fixtures":
        cmd.append("--official-config")
    if args.device.startswith("cuda"):
        cmd.append("--cudnn-benchmark")
    r = run_measured(cmd, env=env.ours_env(home), log=args.workdir / "logs" / "nvauto.log", timeout=timeout)
    out = {"process": r, **(json.loads(res_file.read_text()) if res_file.exists() else {})}
    if r["returncode"] != 0:
        out["error"] = tail(r["log"])
        rows = {c["config"]: c for c in out.get("configs", [])}
        bf = [c for n, c in rows.items() if n.startswith("bf16_cl3d")]
        if bf and "best_bf16_cl3d" not in out:  # the child was stopped after some configurations
            best = max(bf, key=lambda c: c["tflops"])
            out["best_bf16_cl3d"] = {"config": best["config"], "tflops": best["tflops"]}
        for key, name in (("engine_network_tflops", f"engine_network_b{out.get('sw_batch_size')}"),
                          ("engine_sliding_window_tflops", "engine_sliding_window")):
            if key not in out and name in rows:
                out[key] = rows[name]["tflops"]
    return out


def _mask_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*_desc-lesion_mask.nii.gz"))


def copies_of_case(ds: Path, case, n: int) -> Path:
    """A dataset in the ISLES'22 layout holding ``n`` copies of one case (``--cohort-source case``)."""
    for i in range(n):
        raw = ds / "rawdata" / f"sub-copy{i + 1:04d}" / "ses-0001"
        raw.mkdir(parents=True, exist_ok=True)
        for mod, src in zip(("dwi", "adc", "flair"), case, strict=True):
            if src is not None:
                shutil.copyfile(src, raw / f"sub-copy{i + 1:04d}_ses-0001_{mod}.nii.gz")
    return ds


def part_cohort(args, env, home: Path, case, n_cases: int, timeout: float) -> dict:
    t = time.perf_counter()
    if args.cohort_source == "synth":
        from deepisles.synth import write_dataset

        ds = args.workdir / f"cohort_ds_seed{args.cohort_seed}_n{n_cases}"
        if not (ds / "synth_manifest.json").exists():
            shutil.rmtree(ds, ignore_errors=True)
            write_dataset(ds, n_cases, seed=args.cohort_seed)
        source = f"deepisles.synth.write_dataset({n_cases} cases, seed {args.cohort_seed})"
    else:
        ds = args.workdir / f"cohort_ds_copies_n{n_cases}"
        shutil.rmtree(ds, ignore_errors=True)
        copies_of_case(ds, case, n_cases)
        source = (f"{n_cases} copies of the case {args.case} (--cohort-source case: the small fixture networks need "
                  "thousands of SEALS tiles on a brain-sized synthetic case; 2 synthetic cases did not finish in "
                  "10 min on 2 CPU cores)")  # fmt: skip
    synth_s = round(time.perf_counter() - t, 1)
    out = args.workdir / "runs" / f"cohort_{args.device.replace(':', '')}{'_dryrun' if args.dry_run else ''}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [env.ours_python, "-m", "deepisles", "batch", "--input", str(ds), "-o", str(out), "--members",
           ",".join(MEMBERS), "--device", args.device, "--engine", "pipelined", "--workers", str(args.workers),
           "--precision", args.precision]  # fmt: skip
    log(f"cohort: {n_cases} cases ({args.cohort_source}), deepisles batch --engine pipelined on {args.device}")
    cuda = args.device.startswith("cuda")
    t0 = time.time()
    with NvidiaSmiSampler(enabled=cuda) as smi:
        r = run_measured(cmd, env=env.ours_env(home), log=args.workdir / "logs" / "cohort.log", timeout=timeout)
    masks = _mask_files(out)
    done = [m.stat().st_mtime - t0 for m in masks]
    res = {"cases": n_cases, "source": source, "dataset_s": synth_s, "command": " ".join(cmd[1:]),
           "process": r, "cases_done": len(masks), "precision": args.precision}  # fmt: skip
    if r["returncode"] != 0:
        res["log_tail"] = tail(r["log"])
    if masks:
        res["cases_per_hour_end_to_end"] = round(len(masks) / r["wall_s"] * 3600, 1)
        res["first_case_done_s"] = round(min(done), 2)
        res["last_case_done_s"] = round(max(done), 2)
    if len(masks) >= 2 and max(done) > min(done):
        res["cases_per_hour_steady"] = round((len(masks) - 1) / (max(done) - min(done)) * 3600, 1)
    try:
        from bench_batch_throughput import mean_steps

        res["mean_step_s"] = mean_steps(out)
    except Exception as exc:  # noqa: BLE001 (an optional breakdown)
        res["mean_step_s"] = f"unavailable ({type(exc).__name__})"
    if cuda:
        res["nvidia_smi"] = smi.result()
    return res


def _compare(a_path: Path, b_path: Path, threshold: float | None = None) -> dict:
    """Device (a) against reference (b): probabilities (max |dp|) or masks (``threshold`` None: > 0)."""
    import nibabel as nib
    import numpy as np

    a = np.asarray(nib.load(str(a_path)).dataobj, dtype=np.float64)
    b = np.asarray(nib.load(str(b_path)).dataobj, dtype=np.float64)
    if a.shape != b.shape:
        return {"error": f"shape {a.shape} vs {b.shape}"}
    ma, mb = (a >= threshold, b >= threshold) if threshold is not None else (a > 0, b > 0)
    tot = int(ma.sum() + mb.sum())
    out = {"voxels_differing": int((ma != mb).sum()), "mask_voxels_device": int(ma.sum()),
           "mask_voxels_reference": int(mb.sum()), "dice": round(2 * float((ma & mb).sum()) / tot, 6) if tot else 1.0}
    if threshold is not None:
        d = np.abs(a - b)
        out.update(max_abs_dp=float(d.max()), mean_abs_dp=float(d.mean()), voxels_dp_over_1e_3=int((d > 1e-3).sum()))
    return out


def part_agreement(args, home_ref: Path, case, device_outdir: Path, timeout: float) -> dict:
    dwi, adc, flair = case
    env = make_env(args, "cpu", 1)
    run_dir = args.workdir / "runs" / f"targets_cpu_fp32_reference{'_dryrun' if args.dry_run else ''}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    log(f"agreement: the fp32 CPU path on the same case ({home_ref.name})")
    r = be.run_ours(env, home_ref, list(MEMBERS), dwi, adc, run_dir, timeout, flair=flair, precision="fp32")
    cases = r.get("cases") or []
    out = {"reference_store": str(home_ref), "reference_process": r.get("process"),
           "device_precision": args.precision, "device_outputs": str(device_outdir)}  # fmt: skip
    if not cases:
        out["error"] = (r.get("process") or {}).get("error") or "the CPU reference did not finish"
        return out
    ref = Path(cases[0]["outdir"])
    out["reference_outputs"] = str(ref)
    out["reference_case_s"] = cases[0]["wall_s"]
    out["reference_members"] = _members_in_report(ref)
    prob = _compare(device_outdir / "lesion_prob.nii.gz", ref / "lesion_prob.nii.gz", 0.5)
    for k in ("voxels_differing", "mask_voxels_device", "mask_voxels_reference", "dice"):  # p >= 0.5, not the vote
        if k in prob:
            prob[f"{k}_at_p_0.5"] = prob.pop(k)
    out["ensemble_probability"] = prob
    out["ensemble_mask"] = _compare(device_outdir / "lesion_mask.nii.gz", ref / "lesion_mask.nii.gz")
    out["members"] = {}
    for m in MEMBERS:
        a, b = device_outdir / "members" / f"{m}_prob.nii.gz", ref / "members" / f"{m}_prob.nii.gz"
        if a.exists() and b.exists():
            out["members"][m] = _compare(a, b, 0.5)
    return out


# --- verdicts ----------------------------------------------------------------------------------------------
def verdicts(res: dict) -> dict:
    """Each target with its measured value and met / not met / not measured (and why)."""
    parts = res["parts"]
    gpu = res["device"].startswith("cuda") and not res["dry_run"]
    why_not = None if gpu else (
        "dry run on CPU: the numbers check that the code runs; they are NOT GPU measurements"
        if res["dry_run"] else f"run on {res['device']}, not on a GPU")  # fmt: skip
    ens, nv, coh, agr = (parts.get(k) or {} for k in ("ensemble", "nvauto", "cohort", "agreement"))
    values = {
        "ensemble_warm_s_per_case": ens.get("warm_median_s"),
        "peak_gpu_memory_gib": round(ens["gpu_peak_alloc_mib"] / 1024, 2) if ens.get("gpu_peak_alloc_mib") else None,
        "nvauto_tflops": (nv.get("best_bf16_cl3d") or {}).get("tflops"),
        "cohort_cases_per_hour": coh.get("cases_per_hour_steady"),
        "agreement_with_fp32_cpu": ({"ensemble_voxels_differing": agr["ensemble_mask"]["voxels_differing"],
                                     "ensemble_max_abs_dp": agr["ensemble_probability"].get("max_abs_dp")}
                                    if agr.get("ensemble_mask") and "voxels_differing" in agr["ensemble_mask"] else None),
    }  # fmt: skip
    extra = {
        "ensemble_warm_s_per_case": {"first_case_s": ens.get("first_case_s"), "warm_s": ens.get("warm_s"),
                                     "peak_rss_gib": round(ens["peak_rss_mib"] / 1024, 2) if ens.get("peak_rss_mib") else None},
        "peak_gpu_memory_gib": {"reserved_gib": round(ens["gpu_peak_reserved_mib"] / 1024, 2) if ens.get("gpu_peak_reserved_mib") else None,
                                "phase": ens.get("gpu_peak_phase"),
                                "nvidia_smi_used_peak_gib": round(ens["nvidia_smi"]["used_peak_mib"] / 1024, 2) if ens.get("nvidia_smi") else None,
                                "cpu_peak_rss_gib": round(ens["peak_rss_mib"] / 1024, 2) if ens.get("peak_rss_mib") else None},
        "nvauto_tflops": {"config": (nv.get("best_bf16_cl3d") or {}).get("config"),
                          "engine_network_tflops": nv.get("engine_network_tflops"),
                          "engine_sliding_window_tflops": nv.get("engine_sliding_window_tflops"),
                          "window": nv.get("window")},
        "cohort_cases_per_hour": {"end_to_end": coh.get("cases_per_hour_end_to_end"), "cases_done": coh.get("cases_done"),
                                  "cases": coh.get("cases")},
        "agreement_with_fp32_cpu": {"members": {m: {k: v.get(k) for k in ("voxels_differing", "max_abs_dp")}
                                                for m, v in (agr.get("members") or {}).items()},
                                    "device_precision": agr.get("device_precision")},
    }  # fmt: skip
    out = {}
    for name, t in TARGETS.items():
        v = values[name]
        row = {"value": v, "target": t["target"] if t["better"] is None else
               f"{'<=' if t['better'] == 'lower' else '>='} {t['target']:g} {t['unit']}", "unit": t["unit"],
               "what": t["what"], "before": t["before"], **{k: x for k, x in extra[name].items() if x is not None}}  # fmt: skip
        skipped = (res.get("skipped") or {}).get({"ensemble_warm_s_per_case": "ensemble", "peak_gpu_memory_gib":
                                                  "ensemble", "nvauto_tflops": "nvauto", "cohort_cases_per_hour":
                                                  "cohort", "agreement_with_fp32_cpu": "agreement"}[name])  # fmt: skip
        if skipped:
            row["status"] = f"not measured ({skipped})"
        elif why_not:
            row["status"] = f"not measured ({why_not})"
        elif v is None:
            row["status"] = "not measured (the part failed or was not run)"
        elif t["better"] is None:
            row["status"] = "stated"
        else:
            ok = v <= t["target"] if t["better"] == "lower" else v >= t["target"]
            row["status"] = "met" if ok else "not met"
        out[name] = row
    return out


# --- main --------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)  # fmt: skip
    ap.add_argument("--device", default=None, help="cuda | cuda:N | cpu (default: cuda, or cpu with --dry-run)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, fixture weights, smallest sizes: checks that every part runs (numbers are not GPU ones)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run (parts skipped with a note)")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default benchmarks/results/gpu_targets_*.json)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="weights, stores, runs (default ~/.cache/deepisles-bench; dry run /tmp/deepisles-gpu-targets-dryrun)")
    ap.add_argument("--weights", choices=("official", "fixtures"), default=None,
                    help="official-format full-size random weights built by the reference code (default), or the "
                         "small official-format test fixtures (default with --dry-run)")  # fmt: skip
    ap.add_argument("--case", type=Path, default=None,
                    help=f"case folder (*_dwi, *_adc[, *_flair]; default {be.DEFAULT_CASE})")
    ap.add_argument("--repeats", type=int, default=None, help="warm cases after the warm-up case (default 3; dry run 1)")
    ap.add_argument("--cohort-cases", type=int, default=None, help="synthetic cases for part 3 (default 8; dry run 2)")
    ap.add_argument("--cohort-seed", type=int, default=13)
    ap.add_argument("--cohort-source", choices=("synth", "case"), default=None,
                    help="part 3's cases: synthetic (deepisles.synth, default) or copies of --case (dry run default)")
    ap.add_argument("--workers", type=int, default=0, help="pipelined engine workers (0: its default)")
    ap.add_argument("--nvauto-iters", type=int, default=None, help="timed batches per configuration (default 10; dry run 2)")
    ap.add_argument("--nvauto-warmup", type=int, default=None, help="untimed batches first (default 3; dry run 1)")
    ap.add_argument("--nvauto-batches", default=None, help="bf16 + channels_last_3d batch sizes (default 2,4; dry run 2)")
    ap.add_argument("--nvauto-window", default=None, help="override the window, e.g. 64,64,64 (dry run default)")
    ap.add_argument("--counts", default=None,
                    help="SEALS folds, NVAUTO models, Res-U-Nets, Swin-Factorizers (default the official 5,15,5,5; "
                         "dry run 2,2,2,2)")
    ap.add_argument("--parts", default="ensemble,nvauto,agreement,cohort")
    ap.add_argument("--precision", default=None,
                    help="api.segment / batch --precision of the device path (CPU only; dry run: bf16 when the CPU has "
                         "bfloat16 units, else fp32)")  # fmt: skip
    args, rest = ap.parse_known_args(argv)
    args.passthrough = rest  # reference-environment options for bench_ensemble's parser
    dry = args.dry_run
    args.device = args.device or ("cpu" if dry else "cuda")
    if dry and args.device != "cpu":
        ap.error("--dry-run runs on the CPU")
    args.weights = args.weights or ("fixtures" if dry else "official")
    args.workdir = (args.workdir or Path("/tmp/deepisles-gpu-targets-dryrun" if dry else
                                         os.environ.get("DEEPISLES_BENCH_DIR", "~/.cache/deepisles-bench"))).expanduser()  # fmt: skip
    args.repeats = args.repeats if args.repeats is not None else (1 if dry else 3)
    args.cohort_cases = args.cohort_cases or (2 if dry else 8)
    args.cohort_source = args.cohort_source or ("case" if dry else "synth")
    args.nvauto_iters = args.nvauto_iters or (2 if dry else 10)
    args.nvauto_warmup = args.nvauto_warmup if args.nvauto_warmup is not None else (1 if dry else 3)
    args.nvauto_batches = [int(b) for b in (args.nvauto_batches or ("2" if dry else "2,4")).split(",")]
    args.nvauto_window = args.nvauto_window or ("64,64,64" if dry else None)
    counts = [int(v) for v in (args.counts or ("2,2,2,2" if dry else "5,15,5,5")).split(",")]
    if len(counts) != 4 or min(counts) < 1:
        ap.error("--counts: four positive numbers (SEALS folds, NVAUTO models, Res-U-Nets, Swin-Factorizers)")
    args.counts = dict(zip(("seals", "nvauto", "resunet", "swin"), counts, strict=True))
    if args.precision is None:
        from deepisles.engine.sliding_window import cpu_bf16_support

        args.precision = "bf16" if args.device == "cpu" and dry and cpu_bf16_support() else "fp32"
    if args.case is None:  # dry run: the fixture networks' own small case (the real one has ~10^4 SEALS tiles for them)
        args.case = FIXTURES / "ensemble" / "inputs" if dry or not be.DEFAULT_CASE.exists() else be.DEFAULT_CASE
    args.out = args.out or HERE / "results" / (
        "gpu_targets_dryrun_cpu.json" if dry else f"gpu_targets_{args.device.replace(':', '')}.json")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_nvauto":
        wp = argparse.ArgumentParser()
        for k in ("--device", "--store", "--result", "--window"):
            wp.add_argument(k)
        wp.add_argument("--warmup", type=int, default=3)
        wp.add_argument("--iters", type=int, default=10)
        wp.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[2])
        wp.add_argument("--official-config", action="store_true")
        wp.add_argument("--cudnn-benchmark", action="store_true")
        nvauto_worker(wp.parse_args(argv[1:]))
        return 0
    args = parse_args(argv)
    t_start = time.perf_counter()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]

    def left() -> float:
        return float("inf") if args.budget is None else args.budget - (time.perf_counter() - t_start)

    res = {
        "benchmark": "gpu_targets (issue 13 item 3)", "dry_run": args.dry_run, "device": args.device,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": args.budget, **provenance(),
        "note": ("DRY RUN on the CPU with small official-format fixture networks and the smallest sizes: it shows that "
                 "every part runs; its numbers are NOT GPU measurements and every target is 'not measured'"
                 if args.dry_run else "measured on " + args.device),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "parts": {}, "skipped": {},
    }  # fmt: skip
    if args.dry_run:
        from deepisles.engine.sliding_window import cpu_bf16_support

        res["cpu_bf16"] = cpu_bf16_support()
        res["dry_run_substitutions"] = {
            "device": "the CPU instead of one GPU; the device path of parts 1, 3 and 4 runs `--precision "
                      f"{args.precision}` (the CPU's reduced-precision path) where the GPU runs fp16 autocast",
            "weights": f"tests/fixtures/official (small networks in the official formats), counts {args.counts}, "
                       "instead of the official architectures' sizes built by the reference code at 5, 15, 5 + 5",
            "case": f"{args.case} (the fixtures' small case, with FLAIR) instead of the ISLES'22 case",
            "peak memory": "peak RSS of the process (no GPU: no torch.cuda peak, no nvidia-smi samples)",
            "nvauto": f"the official NVAUTO architecture (init_filters 32, blocks 1,2,2,4,4) built with random weights "
                      f"on {args.nvauto_window} windows instead of 192x192x128; engine configuration = fp32 (the "
                      "engine's CPU default) instead of fp16 autocast; bf16 autocast + channels_last_3d on the "
                      "CPU; no cudnn.benchmark configuration",
            "cohort": (f"{args.cohort_cases} copies of the case instead of synthetic cases (--cohort-source case)"
                       if args.cohort_source == "case" else f"{args.cohort_cases} synthetic cases"),
            "repeats": f"{args.repeats} warm case(s), {args.nvauto_iters} timed NVAUTO batches after "
                       f"{args.nvauto_warmup} warm-up",
        }  # fmt: skip
    if args.device.startswith("cuda"):
        f = nvidia_smi("name,memory.total,driver_version")
        res["nvidia_smi"] = f
        name = (res["machine"].get("gpu") or (f[0] if f else "")) or ""
        res["device_name"] = name
        if not any(k in name for k in ("H100", "H200", "GH200", "B200")):
            res["device_note"] = f"{name or 'this GPU'} is not an H100/H200-class GPU: the targets are stated for one"
    else:
        res["device_name"] = res["machine"].get("cpu")

    def save():
        res["targets"] = verdicts(res)
        res["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        try:
            res["machine"]["loadavg_end"] = os.getloadavg()
        except OSError:
            pass
        dump_json(args.out, res)

    env = make_env(args, args.device, 1 + args.repeats)
    log(f"weights: {args.weights} -> {args.workdir}")
    res["weights"] = prepare_weights(args, env)
    home, home_ref = Path(res["weights"]["store"]), Path(res["weights"]["reference_store"])
    case = case_inputs(args.case)
    res["case"] = {"folder": str(args.case), "dwi": str(case[0]), "adc": str(case[1]),
                   "flair": str(case[2]) if case[2] else None}  # fmt: skip
    save()
    # minimum seconds each part needs to be worth starting (the cohort shrinks to what is left)
    need = {"ensemble": 60, "nvauto": 30, "agreement": 60, "cohort": 90} if not args.dry_run else \
        {"ensemble": 20, "nvauto": 20, "agreement": 20, "cohort": 20}  # fmt: skip

    def reserve(after: str) -> float:
        later = parts[parts.index(after) + 1:]
        return sum(need[p] for p in later)

    def budget_for(p: str) -> float | None:
        if args.budget is None:
            return None
        return left() - reserve(p) - 5

    for p in parts:
        b = budget_for(p)
        if b is not None and b < need[p]:
            res["skipped"][p] = f"budget: {left():.0f} s left, {need[p]} s needed plus {reserve(p):.0f} s for the later parts"
            log(f"{p}: skipped ({res['skipped'][p]})")
            continue
        t = time.perf_counter()
        if p == "ensemble":
            log(f"ensemble: load once, 1 warm-up + {args.repeats} warm case(s) on {args.device} ({args.precision})")
            res["parts"]["ensemble"] = part_ensemble(args, env, home, case, b)
        elif p == "nvauto":
            log("nvauto: TFLOP/s of the official SegResNet")
            res["parts"]["nvauto"] = part_nvauto(args, env, home, b)
        elif p == "agreement":
            dev_out = (res["parts"].get("ensemble") or {}).get("outdir_last_case")
            if not dev_out:
                res["skipped"][p] = "no device output from part 1 (ensemble)"
                continue
            res["parts"]["agreement"] = part_agreement(args, home_ref, case, Path(dev_out), b)
        elif p == "cohort":
            n = args.cohort_cases
            per_case = (res["parts"].get("ensemble") or {}).get("warm_median_s")
            if b is not None and per_case:
                # start-up + loading + the first case, then one case each (+ about 3 s to synthesise each)
                fit = int((b - 30 - 2 * per_case) / (per_case + (3 if args.cohort_source == "synth" else 0)))
                if fit < n:
                    res["cohort_note"] = f"{n} cases requested, {max(fit, 2)} fit in the budget ({per_case} s per case)"
                    n = max(fit, 2)
            res["parts"]["cohort"] = part_cohort(args, env, home, case, n, b)
        res["parts"][p]["part_wall_s"] = round(time.perf_counter() - t, 1)
        save()
    save()
    print(json.dumps({k: {"value": v["value"], "status": v["status"]} for k, v in res["targets"].items()}, indent=1))
    log(f"results: {args.out} ({res['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
