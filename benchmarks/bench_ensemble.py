#!/usr/bin/env python
"""Benchmark deepisles against DeepISLES' reference code paths on one real case, in the same run.

For each member (SEALS, NVAUTO, FACTORIZER) and for the whole ensemble: wall time, CPU time, peak resident
memory and (CUDA) peak GPU memory, ours and reference, at the official network sizes with random weights.
See benchmarks/README.md for what is measured, the hardware and the numbers.

Steps (all files go under --workdir, outside git):

1. official-format random-weight checkpoints, built once by the REFERENCE code in the reference environments
   (benchmarks/reference/build_*.py): nnU-Net v1 ``plans.pkl`` + ``.model``/``.model.pkl`` saved by
   DeepISLES' ``nnUNetTrainerV2_DDP``, TorchScript MONAI 0.9.0 SegResNets, PyTorch Lightning checkpoints of
   the vendored factorizer;
2. a subset folder with the requested number of folds/models (links into 1.), imported with
   ``deepisles weights import`` into its own store (``DEEPISLES_HOME``);
3. ours: one process loads the members once (timed per member), then runs ``deepisles.api.segment`` twice on
   the case (files in -> all outputs written, ``save_members=True``): the first run is the per-case cost
   right after loading, the second the warm cost (same case again, models cached);
4. reference: one process chain per member, files in -> native-grid mask file out
   (benchmarks/reference/run_*.{sh,py}); the reference ensemble = the three chains run one after another
   (as DeepISLES does), majority vote not counted (milliseconds);
5. a table (ours, reference, ratio) and a JSON file.

The case has no FLAIR: FACTORIZER gets the DWI itself as the FLAIR stand-in (both sides). DeepISLES
registers FLAIR to DWI with SimpleElastix, which the SimpleITK wheels lack: the reference runs without that
step (identity), ours still runs its own FLAIR->DWI registration (counted in ours' ensemble time, not in
the FACTORIZER member time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench_common import (  # noqa: E402
    PhaseMeter,
    dump_json,
    gpu_mem_from_file,
    mask_agreement,
    provenance,
    run_measured,
    tail,
)

MEMBERS = ("seals", "nvauto", "factorizer")
DEFAULT_CASE = Path("/work/shared/data/isles22/sub-strokecase0001")
SEALS_REL = Path("SEALS/nnUNet_trained_models/nnUNet/3d_fullres/Task012_Ischemic_Stroke_TM_Fullset/"
                 "nnUNetTrainerV2_DDP__nnUNetPlansv2.1")
FACT_LOGS = Path("FACTORIZER/logs/isles2022_dwi-adc-flair")
FACT_CKPT = "version_0/checkpoints/epoch=1999-step=99999.ckpt"
ARCHS = ("resunet", "swin-factorizer")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- environments ----------------------------------------------------------------------------------
class Env:
    """Interpreters and source folders for ours and for the reference code."""

    def __init__(self, args):
        self.args = args
        self.ours_python = args.ours_python or sys.executable
        self.src = Path(args.deepisles_src)
        self.fconfigs = Path(args.factorizer_configs)

        def ref_py(name):
            given = getattr(args, f"ref_python_{name}")
            if given:
                return given
            cand = Path(f"/tmp/ref_{name}/bin/python")
            return str(cand) if cand.exists() else sys.executable

        self.ref_python = {m: ref_py(m) for m in MEMBERS}

    def ours_env(self, home: Path | None = None) -> dict:
        env = dict(os.environ)
        paths = [str(REPO / "src")] + ([self.args.ours_pythonpath] if self.args.ours_pythonpath else [])
        env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        if home is not None:
            env["DEEPISLES_HOME"] = str(home)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def ref_env(self, member: str, extra_paths=(), gpu_file: Path | None = None, bindir: Path | None = None):
        env = dict(os.environ)
        for k in ("PYTHONPATH", "DEEPISLES_HOME"):
            env.pop(k, None)
        paths = [str(HERE / "reference" / "shims"), *map(str, extra_paths)]
        if self.args.ref_pythonpath:
            paths.append(self.args.ref_pythonpath)
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["SEALS_REF_DDP_SHIM"] = "1"
        env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        if gpu_file is not None:
            env["BENCH_GPU_MEM_FILE"] = str(gpu_file)
        if bindir is not None:
            env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
        if self.args.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env


# --- 1. official-format weights ------------------------------------------------------------------------
def ensure_official(env: Env, official: Path, counts: dict, logs: Path) -> dict:
    """Build the missing official-format files with the reference code; returns build timings."""
    out = {}
    w = official / "weights"
    rep = ["--replicate"] if env.args.replicate else []
    need_seals = [k for k in range(counts["seals"])
                  if not (w / SEALS_REL / f"fold_{k}" / "model_final_checkpoint.model.pkl").exists()]
    if need_seals:
        log(f"building SEALS folds {need_seals} (reference nnU-Net trainer)")
        out["seals"] = run_measured(
            [env.ref_python["seals"], str(HERE / "reference" / "build_seals.py"), str(official),
             "--folds", *map(str, need_seals), *rep],
            env=env.ref_env("seals", [env.src / "SEALS"]), log=logs / "build_seals.log")
    need_nv = any(not (w / "NVAUTO" / "ts" / f"model{k}.ts").exists() for k in range(counts["nvauto"]))
    if need_nv:
        log(f"building {counts['nvauto']} NVAUTO TorchScript SegResNets (MONAI 0.9.0)")
        out["nvauto"] = run_measured(
            [env.ref_python["nvauto"], str(HERE / "reference" / "build_nvauto.py"), str(official),
             "--models", str(counts["nvauto"]), *rep],
            env=env.ref_env("nvauto"), log=logs / "build_nvauto.log")
    folds = sorted(set(range(max(counts["resunet"], counts["swin"]))))
    need_f = [(a, f) for a, n in (("resunet", counts["resunet"]), ("swin-factorizer", counts["swin"]))
              for f in range(n) if not (w / FACT_LOGS / f"fold{f}" / a / FACT_CKPT).exists()]
    if need_f:
        log(f"building FACTORIZER checkpoints {need_f} (PyTorch Lightning)")
        fdir = env.src / "FACTORIZER"
        extra = [fdir / "model" / "factorizer", *([Path(env.args.ref_stubs)] if env.args.ref_stubs else []), fdir]
        out["factorizer"] = run_measured(
            [env.ref_python["factorizer"], str(HERE / "reference" / "build_factorizer.py"), str(official),
             "--configs", str(env.fconfigs), "--folds", *map(str, folds),
             "--archs", *sorted({a for a, _ in need_f}), *rep],
            env=env.ref_env("factorizer", extra), log=logs / "build_factorizer.log")
    for k, r in out.items():
        if r["returncode"] != 0:
            raise SystemExit(f"building {k} weights failed:\n{tail(r['log'])}")
    return out


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.symlink(src, dst)


def make_subset(official: Path, subsets: Path, counts: dict) -> tuple[Path, str]:
    tag = f"s{counts['seals']}-n{counts['nvauto']}-r{counts['resunet']}w{counts['swin']}"
    root = subsets / tag
    w, ow = root / "weights", official / "weights"
    if counts["seals"]:
        _link(ow / SEALS_REL / "plans.pkl", w / SEALS_REL / "plans.pkl")
        for k in range(counts["seals"]):
            _link(ow / SEALS_REL / f"fold_{k}", w / SEALS_REL / f"fold_{k}")
    for k in range(counts["nvauto"]):
        _link(ow / "NVAUTO" / "ts" / f"model{k}.ts", w / "NVAUTO" / "ts" / f"model{k}.ts")
    for arch, n in (("resunet", counts["resunet"]), ("swin-factorizer", counts["swin"])):
        for f in range(n):
            _link(ow / FACT_LOGS / f"fold{f}" / arch, w / FACT_LOGS / f"fold{f}" / arch)
    return root, tag


def ensure_store(env: Env, subset: Path, home: Path, members: list[str], logs: Path) -> dict | None:
    marker = home / "imported.json"
    if marker.exists() and set(json.loads(marker.read_text())["members"]) >= set(members):
        return None
    log(f"deepisles weights import {subset} -> {home}")
    r = run_measured([env.ours_python, "-m", "deepisles", "weights", "import", str(subset), "--members",
                      ",".join(members), "--overwrite"], env=env.ours_env(home), log=logs / "import.log")
    if r["returncode"] != 0:
        raise SystemExit(f"weights import failed:\n{tail(r['log'])}")
    dump_json(marker, {"members": members, "import": r})
    return r


# --- inputs -------------------------------------------------------------------------------------------
def case_files(case: Path) -> tuple[Path, Path]:
    dwi = sorted(case.glob("*_dwi.nii*")) or sorted(case.glob("dwi*.nii*"))
    adc = sorted(case.glob("*_adc.nii*")) or sorted(case.glob("adc*.nii*"))
    if not dwi or not adc:
        raise SystemExit(f"{case}: no *_dwi.nii.gz / *_adc.nii.gz")
    return dwi[0], adc[0]


def stage_input(dwi: Path, adc: Path, dest: Path, flair: bool) -> Path:
    """DeepISLES' input layout: dest/{dwi/dwi.nii.gz, adc/adc.nii.gz[, flair/flair.nii.gz = the DWI]}."""
    if dest.exists():
        shutil.rmtree(dest)
    for name, src in (("dwi", dwi), ("adc", adc), *((("flair", dwi),) if flair else ())):
        (dest / name).mkdir(parents=True)
        shutil.copyfile(src, dest / name / f"{name}.nii.gz")
    return dest


# --- 3. ours ------------------------------------------------------------------------------------------
def ours_worker(args) -> None:
    """Runs in its own process: load members once, then segment() the case twice."""
    t0 = time.perf_counter()
    import torch

    from deepisles import api
    from deepisles.members import resolve_members

    cuda = args.device.startswith("cuda")
    meter = PhaseMeter(cuda=cuda)
    res = {"import_s": round(time.perf_counter() - t0, 3), "load": {}, "cases": []}
    members = args.members.split(",")
    for name in members:
        meter.start(f"load_{name}")
        resolve_members(name, args.device, args.fast)
        meter.stop()
        res["load"][name] = meter.phases[-1]
    res["load_total_s"] = round(sum(p["wall_s"] for p in res["load"].values()), 3)
    dwi, adc = Path(args.dwi), Path(args.adc)
    flair = Path(args.flair) if args.flair else None
    for i in range(args.repeats):
        phases = PhaseMeter(cuda=cuda)

        def progress(msg, phases=phases):
            phases.start(msg)

        outdir = Path(args.outdir) / f"case{i + 1}"
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        result = api.segment(dwi, adc, flair, outdir=outdir, members=args.members, device=args.device,
                             fast=args.fast, save_members=True, overwrite=True, progress=progress,
                             precision=args.precision)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
        phases.stop()
        rec = {"wall_s": round(wall, 3), "phases": phases.phases,
               "timing_s": {k: round(v, 3) for k, v in result.report.get("timing_s", {}).items()},
               "outdir": str(outdir), "lesion_ml": result.volume_ml}
        if cuda:
            rec["gpu_peak_alloc_mib"] = max(p.get("gpu_peak_alloc_mib", 0) for p in phases.phases)
            rec["gpu_peak_reserved_mib"] = max(p.get("gpu_peak_reserved_mib", 0) for p in phases.phases)
        rec["peak_rss_mib"] = max((p.get("peak_rss_mib") or 0) for p in phases.phases)
        res["cases"].append(rec)
    res["hwm_reset_ok"] = meter.hwm_reset_ok
    if cuda:
        res["gpu_peak_alloc_mib_total"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    res["torch_threads"] = torch.get_num_threads()
    Path(args.result).write_text(json.dumps(res, indent=2))


def run_ours(env: Env, home: Path, members: list[str], dwi: Path, adc: Path, run_dir: Path, timeout,
             flair: Path | None = None, precision: str = "fp32") -> dict:
    """Ours in its own process (``_ours``): load the members once, then ``env.args.repeats`` case runs. ``flair``:
    the case's FLAIR; without one FACTORIZER gets a copy of the DWI. ``precision``: api.segment's (CPU only)."""
    out = run_dir / "ours"
    out.mkdir(parents=True, exist_ok=True)
    result = out / "result.json"
    fl = []
    if flair is not None:
        fl = ["--flair", str(flair)]
    elif "factorizer" in members:  # the FLAIR stand-in: a copy of the DWI (deepisles refuses one file twice)
        shutil.copyfile(dwi, out / "flair_standin.nii.gz")
        fl = ["--flair", str(out / "flair_standin.nii.gz")]
    cmd = [env.ours_python, str(Path(__file__).resolve()), "_ours", "--device", env.args.device,
           "--members", ",".join(members), "--dwi", str(dwi), "--adc", str(adc), "--outdir", str(out),
           "--result", str(result), "--repeats", str(env.args.repeats), "--precision", precision, *fl]
    if env.args.fast:
        cmd.append("--fast")
    log(f"ours: {', '.join(members)} on {env.args.device} (load once, {env.args.repeats} case runs)")
    r = run_measured(cmd, env=env.ours_env(home), log=out / "log.txt", timeout=timeout)
    if r["returncode"] != 0 or not result.exists():
        r["error"] = tail(r["log"])
        log(f"ours FAILED:\n{r['error']}")
        return {"process": r}
    return {"process": r, **json.loads(result.read_text())}


# --- 4. reference ---------------------------------------------------------------------------------------
def _refbin(env: Env, member: str, wd: Path) -> Path:
    """A folder with ``python`` (the reference interpreter) and ``nnUNet_predict`` for the SEALS chain."""
    b = wd / f"refbin_{member}"
    b.mkdir(parents=True, exist_ok=True)
    py = b / "python"  # a wrapper, not a link: a venv's interpreter must be started by its own path
    if py.is_symlink() or py.exists():
        py.unlink()
    py.write_text(f'#!/bin/sh\nexec "{env.ref_python[member]}" "$@"\n')
    py.chmod(0o755)
    (b / "nnUNet_predict").write_text(
        f"#!{env.ref_python[member]}\nfrom nnunet.inference.predict_simple import main\nmain()\n")
    (b / "nnUNet_predict").chmod(0o755)
    return b


def run_reference(env: Env, member: str, counts: dict, subset: Path, dwi: Path, adc: Path, run_dir: Path,
                  timeout) -> dict:
    d = run_dir / f"ref_{member}"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    inp = stage_input(dwi, adc, d / "input", flair=member == "factorizer")
    gpu_file = d / "gpu_mem.txt"
    weights = subset / "weights"
    threads = []
    cuda = env.args.device.startswith("cuda")
    if member == "seals":
        seals_copy = d / "SEALS"
        shutil.copytree(env.src / "SEALS", seals_copy)
        folds = " ".join(str(k) for k in range(counts["seals"]))
        cmd = ["bash", str(HERE / "reference" / "run_seals.sh"), str(inp), str(weights), str(seals_copy), folds,
               "--disable_tta" if env.args.fast else ""]
        renv = env.ref_env("seals", [seals_copy], gpu_file, _refbin(env, "seals", run_dir))
        desc = f"{counts['seals']} fold(s), {'no ' if env.args.fast else '8-flip '}mirroring"
    elif member == "nvauto":
        n = counts["nvauto"]
        exact = cuda and n == 15 and not env.args.no_exact
        cmd = [env.ref_python["nvauto"], str(HERE / "reference" / "run_nvauto.py"), "--input", str(inp),
               "--weights", str(weights), "--models", str(n), "--device", "cuda" if cuda else "cpu", *threads]
        if exact:
            cmd += ["--exact", "--deepisles-src", str(env.src)]
        renv = env.ref_env("nvauto", [], gpu_file)
        desc = f"{n} model(s)" + (" (DeepISLES process.py unchanged)" if exact else "")
    else:
        ck = [str(Path("logs/isles2022_dwi-adc-flair") / f"fold{f}" / a / FACT_CKPT)
              for a, n in (("resunet", counts["resunet"]), ("swin-factorizer", counts["swin"])) for f in range(n)]
        exact = counts["resunet"] == 5 and counts["swin"] == 5 and not env.args.no_exact
        cmd = [env.ref_python["factorizer"], str(HERE / "reference" / "run_factorizer.py"), "--input", str(inp),
               "--weights", str(weights), "--deepisles-src", str(env.src)]
        cmd += ["--exact"] if exact else ["--ckpt", *ck]
        extra = [Path(env.args.ref_stubs)] if env.args.ref_stubs else []
        renv = env.ref_env("factorizer", extra, gpu_file)
        desc = f"{counts['resunet']} Res-U-Net + {counts['swin']} Swin-Factorizer" + (
            " (DeepISLES process.py, Elastix stubbed)" if exact else "")
    log(f"reference {member}: {desc}")
    r = run_measured(cmd, env=renv, cwd=str(d), log=d / "log.txt", timeout=timeout)
    r["what"] = desc
    mask = inp / "output" / member / "lesion_msk.nii.gz"
    if "--exact" in cmd and r["returncode"] != 0 and not r["timed_out"]:
        log(f"reference {member}: DeepISLES' process.py failed ({tail(r['log'], 3)}); the driver instead")
        failed = r
        cmd = [c for c in cmd if c != "--exact"]
        if member == "factorizer":
            cmd += ["--ckpt", *ck]
        left = None if timeout is None else timeout - failed["wall_s"]
        r = run_measured(cmd, env=renv, cwd=str(d), log=d / "log_driver.txt", timeout=left)
        r["what"] = desc.split(" (")[0] + " (driver; process.py failed)"
        r["exact_failed"] = {k: failed[k] for k in ("wall_s", "returncode")} | {"error": tail(failed["log"])}
    r["output"] = str(mask) if mask.exists() else None
    if r["returncode"] != 0 or not mask.exists():
        r["error"] = tail(r["log"])
        log(f"reference {member} FAILED (rc {r['returncode']}):\n{r['error']}")
    g = gpu_mem_from_file(gpu_file)
    if g is not None:
        r["gpu_peak_alloc_mib"] = round(g / 2**20, 1)
    return r


# --- 5. report ------------------------------------------------------------------------------------------
def summarize(res: dict) -> dict:
    """Per member and ensemble: ours (cold = load + first case; warm = second case) vs reference."""
    ours, refs = res.get("ours") or {}, res.get("reference") or {}
    cases = ours.get("cases") or []
    rows = {}
    for m in res["members"]:
        row = {}
        ref = refs.get(m)
        if ref and ref.get("returncode") == 0:
            row["ref_s"] = ref["wall_s"]
            row["ref_rss_mib"] = ref["peak_rss_mib"]
            row["ref_cpu_s"] = ref["cpu_s"]
            row["ref_gpu_mib"] = ref.get("gpu_peak_alloc_mib")
        if cases:
            load = ours["load"][m]["wall_s"]
            runs = [c["timing_s"].get(f"member_{m}") for c in cases]
            row["ours_load_s"] = load
            row["ours_case1_s"] = runs[0]
            row["ours_warm_s"] = runs[-1] if len(runs) > 1 else None
            row["ours_cold_s"] = round(load + runs[0], 3) if runs[0] is not None else None
            ph = [p for c in cases for p in c["phases"] if p["phase"] == f"member {m}"]
            cpu = [p.get("cpu_s") for p in ph[:1]]
            if cpu and cpu[0] is not None:
                row["ours_case1_cpu_s"] = cpu[0]
            row["ours_rss_mib"] = max([ours["load"][m].get("peak_rss_mib") or 0] + [p.get("peak_rss_mib") or 0 for p in ph])
            if any("gpu_peak_alloc_mib" in p for p in ph):
                row["ours_gpu_mib"] = max(p.get("gpu_peak_alloc_mib", 0) for p in ph)
        if row.get("ref_s") and row.get("ours_cold_s"):
            row["ratio_cold"] = round(row["ref_s"] / row["ours_cold_s"], 2)
        if row.get("ref_s") and row.get("ours_warm_s"):
            row["ratio_warm"] = round(row["ref_s"] / row["ours_warm_s"], 2)
        if row.get("ref_cpu_s") and row.get("ours_case1_cpu_s"):
            row["ratio_cpu_time"] = round(row["ref_cpu_s"] / row["ours_case1_cpu_s"], 2)
        if ref and ref.get("output") and cases:
            prob = Path(cases[0]["outdir"]) / "members" / f"{m}_prob.nii.gz"
            if prob.exists():
                row["mask_agreement"] = mask_agreement(Path(ref["output"]), prob, 0.5)
        rows[m] = row
    ens = {}
    ok = [m for m in res["members"] if rows[m].get("ref_s")]
    if len(ok) == len(res["members"]):
        ens["ref_s"] = round(sum(rows[m]["ref_s"] for m in ok), 3)
        ens["ref_rss_mib"] = max(rows[m]["ref_rss_mib"] for m in ok)
        g = [rows[m].get("ref_gpu_mib") for m in ok if rows[m].get("ref_gpu_mib")]
        ens["ref_gpu_mib"] = max(g) if g else None
    if cases:
        ens["ours_load_s"] = ours["load_total_s"]
        ens["ours_case1_s"] = cases[0]["wall_s"]
        ens["ours_cold_s"] = round(ours["load_total_s"] + cases[0]["wall_s"], 3)
        ens["ours_warm_s"] = cases[-1]["wall_s"] if len(cases) > 1 else None
        ens["ours_process_wall_s"] = ours["process"]["wall_s"]
        # ru_maxrss of the process can be lowered by the per-phase resets: take the largest phase peak too
        ens["ours_rss_mib"] = max([ours["process"]["peak_rss_mib"]]
                                  + [p.get("peak_rss_mib") or 0 for c in cases for p in c["phases"]]
                                  + [p.get("peak_rss_mib") or 0 for p in ours["load"].values()])
        if any("gpu_peak_alloc_mib" in c for c in cases):
            # the phases reset torch's peak statistics, so the process-end max_memory_allocated
            # (gpu_peak_alloc_mib_total) is the last phase's peak only: take the largest phase peak of any case
            ens["ours_gpu_mib"] = max(c.get("gpu_peak_alloc_mib", 0) for c in cases)
            ens["ours_gpu_reserved_mib"] = max(c.get("gpu_peak_reserved_mib", 0) for c in cases)
    if len(ok) == len(res["members"]):
        ens["ref_cpu_s"] = round(sum(refs[m]["cpu_s"] for m in ok), 3)
    if cases and all("cpu_s" in p for p in cases[0]["phases"]):
        ens["ours_cold_cpu_s"] = round(sum(p["cpu_s"] for p in ours["load"].values())
                                       + sum(p["cpu_s"] for p in cases[0]["phases"]), 3)
        if ens.get("ref_cpu_s"):
            ens["ratio_cpu_time"] = round(ens["ref_cpu_s"] / ens["ours_cold_cpu_s"], 2)
    if ens.get("ref_s") and ens.get("ours_cold_s"):
        ens["ratio_cold"] = round(ens["ref_s"] / ens["ours_cold_s"], 2)
    if ens.get("ref_s") and ens.get("ours_warm_s"):
        ens["ratio_warm"] = round(ens["ref_s"] / ens["ours_warm_s"], 2)
    return {"members": rows, "ensemble": ens}


def print_table(res: dict) -> None:
    s = res["summary"]

    def f(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    hdr = (f"{'':<11}{'what':<34}{'ours load':>10}{'ours 1st':>10}{'ours warm':>10}{'reference':>10}"
           f"{'ratio cold':>11}{'ratio warm':>11}{'RSS ours/ref MiB':>19}")
    gpu = res["device"].startswith("cuda")
    if gpu:
        hdr += f"{'GPU ours/ref MiB':>19}"
    print(f"\n{res['device']} | {res['machine'].get('gpu') or res['machine'].get('cpu')} | "
          f"{res['machine'].get('cpu_count')} CPUs | torch threads {res['machine'].get('torch_threads')} | "
          f"counts {res['counts']}{' | FAST' if res['fast'] else ''} | commit {res['commit']['commit'][:12]}"
          f"{' (uncommitted changes)' if res['commit']['dirty'] else ''}")
    print(hdr)
    for name, row in [*s["members"].items(), ("ENSEMBLE", s["ensemble"])]:
        what = res["what"].get(name, "")
        line = (f"{name:<11}{what[:33]:<34}{f(row.get('ours_load_s')):>10}{f(row.get('ours_case1_s')):>10}"
                f"{f(row.get('ours_warm_s')):>10}{f(row.get('ref_s')):>10}"
                f"{f(row.get('ratio_cold'), '{:.2f}x'):>11}{f(row.get('ratio_warm'), '{:.2f}x'):>11}"
                f"{f(row.get('ours_rss_mib'), '{:.0f}') + '/' + f(row.get('ref_rss_mib'), '{:.0f}'):>19}")
        if gpu:
            line += f"{f(row.get('ours_gpu_mib'), '{:.0f}') + '/' + f(row.get('ref_gpu_mib'), '{:.0f}'):>19}"
        print(line)
    print("times in seconds; ratio = reference / ours (cold: ours load + first case; warm: second case);")
    print("ENSEMBLE ours = whole segment() (read, skull-strip check, FLAIR registration, members, vote, "
          "writing); reference = the member chains one after another")


# --- main -------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--members", default="seals,nvauto,factorizer")
    ap.add_argument("--seals-folds", type=int, default=5, help="SEALS folds (official: 5)")
    ap.add_argument("--nvauto-models", type=int, default=15, help="NVAUTO models (official: 15)")
    ap.add_argument("--resunets", type=int, default=5, help="FACTORIZER Res-U-Nets (official: 5)")
    ap.add_argument("--swins", type=int, default=5, help="FACTORIZER Swin-Factorizers (official: 5)")
    ap.add_argument("--fast", action="store_true",
                    help="ours: fast=True (SEALS without mirroring, NVAUTO/FACTORIZER their documented fast subsets "
                         "of the models given); reference: SEALS with nnUNet_predict --disable_tta, NVAUTO and "
                         "FACTORIZER unchanged (they have no fast mode), i.e. ours-fast against DeepISLES")
    ap.add_argument("--case", type=Path, default=DEFAULT_CASE)
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("DEEPISLES_BENCH_DIR",
                                                                       "~/.cache/deepisles-bench")).expanduser())
    ap.add_argument("--json", type=Path, help="results file (default: benchmarks/results/<device>_<counts>.json)")
    ap.add_argument("--repeats", type=int, default=2, help="ours: case runs after loading (2nd = warm)")
    ap.add_argument("--no-ours", action="store_true")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--ours-from", type=Path, default=None,
                    help="take ours' measurement from an earlier results JSON (same device and counts) instead "
                         "of running it again; its start time is recorded")
    ap.add_argument("--reference-from", type=Path, default=None,
                    help="keep the reference runs of an earlier results JSON for the members not run now")
    ap.add_argument("--no-exact", action="store_true",
                    help="never run DeepISLES' process.py unchanged (always the drivers)")
    ap.add_argument("--replicate", action="store_true",
                    help="build one set of weights per architecture and hard-link the other folds/models to it "
                         "(timing does not depend on the values; saves build time on a lent GPU machine)")
    ap.add_argument("--build-only", action="store_true", help="build + import the weights, run nothing")
    ap.add_argument("--timeout", type=float, default=None, help="per process, seconds")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run: each process is stopped when it would overrun, and a "
                         "reference run is not started with less than 20 s left (recorded as skipped)")
    ap.add_argument("--ref-order", default=None, help="order of the reference runs (default: --members order)")
    ap.add_argument("--deepisles-src", default="/tmp/ref_src/src", help="DeepISLES src/ (fetched, not in git)")
    ap.add_argument("--factorizer-configs", default="/tmp/ref_work",
                    help="folder with factorizer-isles22's registry.py, resunet.yaml, swin.yaml")
    ap.add_argument("--ref-stubs", default="/tmp/ref_stubs" if Path("/tmp/ref_stubs").exists() else None,
                    help="extra PYTHONPATH entry for the FACTORIZER reference (torchvision stub)")
    for m in MEMBERS:
        ap.add_argument(f"--ref-python-{m}", default=None, help=f"interpreter of the {m} reference env")
    ap.add_argument("--ref-pythonpath", default=None, help="extra PYTHONPATH for every reference process")
    ap.add_argument("--ours-python", default=None)
    ap.add_argument("--ours-pythonpath", default=None, help="extra PYTHONPATH for ours")
    return ap.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_ours":
        wp = argparse.ArgumentParser()
        for a in ("--device", "--members", "--dwi", "--adc", "--flair", "--outdir", "--result"):
            wp.add_argument(a)
        wp.add_argument("--repeats", type=int, default=2)
        wp.add_argument("--fast", action="store_true")
        wp.add_argument("--precision", default="fp32")
        return ours_worker(wp.parse_args(argv[1:]))
    args = parse_args(argv)
    t_start = time.perf_counter()
    members = [m.strip() for m in args.members.split(",") if m.strip()]
    counts = {"seals": args.seals_folds if "seals" in members else 0,
              "nvauto": args.nvauto_models if "nvauto" in members else 0,
              "resunet": args.resunets if "factorizer" in members else 0,
              "swin": args.swins if "factorizer" in members else 0}
    env = Env(args)
    wd = args.workdir
    logs = wd / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    res = {"device": args.device, "fast": args.fast, "members": members, "counts": counts,
           "case": str(args.case), **provenance(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "flair": "none in the case: the DWI file is given as FLAIR to FACTORIZER (both sides)",
           "what": {}}
    res["build"] = ensure_official(env, wd / "official", counts, logs)
    subset, tag = make_subset(wd / "official", wd / "subsets", counts)
    home = wd / "stores" / tag
    if not args.no_ours or args.build_only:
        imp = ensure_store(env, subset, home, members, logs)
        if imp:
            res["import"] = imp
    if args.build_only:
        log(f"weights ready: official {wd / 'official'}, subset {subset}, store {home}")
        return
    dwi, adc = case_files(args.case)
    run_dir = wd / "runs" / f"{args.device.replace(':', '')}_{tag}{'_fast' if args.fast else ''}"
    run_dir.mkdir(parents=True, exist_ok=True)
    res["what"] = {
        "seals": f"{counts['seals']} fold(s){', no mirroring' if args.fast else ', 8 mirrors'}",
        "nvauto": f"{counts['nvauto']} SegResNet(s)",
        "factorizer": f"{counts['resunet']} ResUNet + {counts['swin']} SwinFact",
        "ENSEMBLE": "+".join(m for m in members),
    }
    json_path = args.json or HERE / "results" / f"{args.device.replace(':', '')}_{tag}{'_fast' if args.fast else ''}.json"

    def save():
        res["summary"] = summarize(res)
        res["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        try:
            res["machine"]["loadavg_end"] = os.getloadavg()
        except OSError:
            pass
        dump_json(json_path, res)

    def timeout():
        if args.budget is None:
            return args.timeout
        left = args.budget - (time.perf_counter() - t_start) - 5
        return left if args.timeout is None else min(left, args.timeout)

    if args.ours_from:
        prev = json.loads(args.ours_from.read_text())
        if prev.get("counts") != counts or prev.get("device") != args.device:
            raise SystemExit(f"{args.ours_from}: other device or counts ({prev.get('device')}, {prev.get('counts')})")
        res["ours"] = prev["ours"]
        res["ours_from"] = {"file": str(args.ours_from), "started": prev.get("started"),
                            "commit": prev.get("commit"), "machine": prev.get("machine")}
    elif not args.no_ours:
        res["ours"] = run_ours(env, home, members, dwi, adc, run_dir, timeout())
        save()
    res["reference"] = {}
    if args.reference_from:
        prev = json.loads(args.reference_from.read_text())
        for m, r in (prev.get("reference") or {}).items():
            if r.get("returncode") == 0 and prev.get("counts") == counts:
                res["reference"][m] = {**r, "from": r.get("from", str(args.reference_from)),
                                       "started": r.get("started", prev.get("started")),
                                       "commit": r.get("commit", prev.get("commit"))}
    if not args.no_reference:
        order = [m.strip() for m in (args.ref_order or args.members).split(",") if m.strip() in members]
        for m in order:
            if m in res["reference"]:
                continue
            if args.budget is not None and timeout() < 20:
                res["reference"][m] = {"skipped": "budget"}
                log(f"reference {m}: skipped (budget)")
                continue
            res["reference"][m] = run_reference(env, m, counts, subset, dwi, adc, run_dir, timeout())
            save()
    save()
    print_table(res)
    log(f"results: {json_path}")


if __name__ == "__main__":
    main()
