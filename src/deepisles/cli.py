"""The `deepisles` command: parses arguments, calls deepisles.api, prints. Errors -> one line, exit 2."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from deepisles import __version__
from deepisles.errors import DeepIslesError, Interrupted
from deepisles.io.read import DEFAULT_MAX_VOXELS

app = typer.Typer(
    name="deepisles",
    help="Find and measure acute ischemic stroke lesions on brain MRI (DWI + ADC, optional FLAIR).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# markup=False: every message may hold user text (paths, case ids, member notes); rich never interprets it.
# Styles are given as Text objects; the few markup strings (status and progress lines) go through escape().
out = Console(markup=False)
err = Console(stderr=True, markup=False)

SKULL_STRIP = ("auto", "none", "classical", "hdbet")


def _line(label: str, style: str, msg: str) -> None:
    err.print(Text.assemble((label, style), " ", " ".join(str(msg).split())), highlight=False, soft_wrap=True)


def _friendly(fn):
    """Errors end as one line on stderr, never a traceback: ``error: ...`` and exit code 2 for what the user asked
    (inputs, options, output folder), 1 for a failure while working (e.g. writing results, any OSError), 130
    for Ctrl-C (the message says what was left behind)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Interrupted as exc:
            _line("interrupted:", "bold red", str(exc).removeprefix("interrupted: "))
            raise typer.Exit(130) from None
        except DeepIslesError as exc:
            _line("error:", "bold red", str(exc))
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:  # reading or writing outside the checked paths (disk full, removed folder...)
            where = f"{exc.filename}: " if exc.filename else ""
            _line("error:", "bold red", f"{where}{exc.strerror or type(exc).__name__}")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            _line("interrupted", "bold red", "")
            raise typer.Exit(130) from None

    return wrapper


class _StatusLine:
    """deepisles.progress.Progress on a rich status spinner: the latest step (user text escaped)."""

    def __init__(self, status):
        self.status = status

    def step(self, message: str) -> None:
        self.status.update(escape(message))

    def advance(self, done: int, total: int | None = None, item: str = "") -> None:
        pass


class _Bar:
    """deepisles.progress.Progress on one rich progress-bar task: advances move it, steps and items name it."""

    def __init__(self, bar, task, print_steps: bool = False):
        self.bar, self.task, self.print_steps = bar, task, print_steps

    def step(self, message: str) -> None:
        if self.print_steps:  # a line each (e.g. training's data preparation), above the bar
            self.bar.console.print(Text(message), highlight=False, soft_wrap=True)
        else:
            self.bar.update(self.task, description=escape(message))

    def advance(self, done: int, total: int | None = None, item: str = "") -> None:
        self.bar.update(self.task, completed=done, total=total, **({"description": escape(item)} if item else {}))


def _warn_lines(warnings: list[str]) -> None:
    for w in warnings:
        _line("warning:", "yellow", w)


def _print_result(result, outdir: Path | None) -> None:
    rep = result.report
    table = Table(title="deepisles result", show_header=False)
    table.add_row("lesion volume", f"{rep['lesions']['volume_ml']:.3f} mL")
    table.add_row("lesion count", f"{rep['lesions']['count']} (26-connectivity)")
    table.add_row("members run", ", ".join(m["name"] for m in rep["members"]["run"]))
    defaults = [m["name"] for m in rep["members"]["run"] if (m.get("weights") or {}).get("kind") == "default"]
    if defaults:
        note = rep["members"]["run"][0].get("weights", {}).get("note", "")
        table.add_row("weights", Text(f"{', '.join(defaults)}: {note}", style="yellow"))
    if rep["members"]["skipped"]:
        by_reason: dict[str, list[str]] = {}
        for s in rep["members"]["skipped"]:
            by_reason.setdefault(s["reason"], []).append(s["member"])
        table.add_row("members skipped", "\n".join(f"{', '.join(m)}: {r}" for r, m in by_reason.items()))
    table.add_row("ensemble", rep["ensemble"]["rule"])
    if outdir is not None:
        table.add_row("outputs", str(outdir))
    out.print(table)


@app.command()
@_friendly
def segment(
    dwi: Annotated[str, typer.Option("--dwi", help="DWI (b≈1000): .nii/.nii.gz, .mha/.mhd or a DICOM series folder.")],
    adc: Annotated[str, typer.Option("--adc", help="ADC map (any of 10^-3 mm²/s, 10^-6 mm²/s, mm²/s; detected).")],
    outdir: Annotated[Path, typer.Option("-o", "--output", help="Output folder (created if needed).")],
    flair: Annotated[str | None, typer.Option("--flair", help="Optional FLAIR; registered to the DWI (used unchanged when already on the DWI grid and aligned).")] = None,
    flair_registered: Annotated[bool, typer.Option("--flair-registered", help="The FLAIR is already registered to the DWI: skip the registration (on another grid it is resampled onto the DWI grid in physical space).")] = False,
    bval: Annotated[str | None, typer.Option("--bval", help="b-values of a 4D DWI (default: a .bval/.json beside it).")] = None,
    skull_strip: Annotated[str, typer.Option("--skull-strip", help="auto (use zero background if skull-stripped, else classical) | none | classical | hdbet (needs deepisles[hdbet]).")] = "auto",
    members: Annotated[str, typer.Option("--members", help="Comma-separated members (seals, nvauto, factorizer, classical), or auto: installed weights, else the packaged default models (trained on synthetic data).")] = "auto",
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")] = "auto",
    fast: Annotated[bool, typer.Option("--fast", help="Faster, approximate: SEALS without test-time mirroring, NVAUTO 5 of 15 models, FACTORIZER Res-U-Nets only (docs/deviations.md).")] = False,
    save_members: Annotated[bool, typer.Option("--save-members", help="Also write members/<name>_prob.nii.gz for each member.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace results already in the output folder.")] = False,
    no_preview: Annotated[bool, typer.Option("--no-preview", help="Do not write preview.png.")] = False,
    no_html: Annotated[bool, typer.Option("--no-html", help="Do not write report.html (the offline report with the viewer).")] = False,
    output_type: Annotated[str, typer.Option("--output-type", help="nifti (always written) | dicom-seg: also lesion_seg.dcm, a DICOM SEG referencing the DWI series (DICOM input only).")] = "nifti",
    max_voxels: Annotated[int, typer.Option("--max-voxels", help="Refuse an input image whose header declares more voxels than this (all volumes; checked before its data is read).", min=1)] = DEFAULT_MAX_VOXELS,
    precision: Annotated[str, typer.Option("--precision", help="CPU inference: fp32 (default, the reference arithmetic) | bf16 (opt-in, faster on CPUs with AMX/AVX512-BF16; differs slightly, docs/deviations.md).")] = "fp32",
) -> None:
    """Segment one case: lesion_mask.nii.gz, lesion_prob.nii.gz, report.json, lesions.csv, report.html and preview.png on the DWI grid."""
    from deepisles.api import segment as api_segment

    if skull_strip not in SKULL_STRIP:
        raise DeepIslesError(f"--skull-strip {skull_strip}: expected one of {', '.join(SKULL_STRIP)}")
    with err.status("starting") as status:
        result = api_segment(
            dwi, adc, flair, outdir=outdir, skull_strip=skull_strip, members=members, device=device,
            bval=bval, fast=fast, save_members=save_members, overwrite=overwrite, preview=not no_preview,
            html=not no_html, output_type=output_type, max_voxels=max_voxels, progress=_StatusLine(status),
            flair_registered=flair_registered, precision=precision,
        )
    _warn_lines(result.report["warnings"])
    _print_result(result, outdir)


@app.command()
@_friendly
def evaluate(
    pred: Annotated[Path, typer.Option("--pred", help="Predicted mask file, or folder of masks.")],
    gt: Annotated[Path, typer.Option("--gt", help="Ground-truth mask file, folder (same file names) or ISLES'22 dataset/derivatives folder.")],
    csv: Annotated[Path | None, typer.Option("-o", "--output", help="Per-case CSV to write.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing CSV / strata outputs.")] = False,
    by: Annotated[list[str] | None, typer.Option("--by", help="Stratify (repeatable): volume (reference lesion volume bins), count (reference lesion count bins), or a participants.tsv column / DWI JSON-sidecar field (e.g. Manufacturer). Needs --out-dir.")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out-dir", help="Folder for the stratified evaluation: cases.csv, strata.csv, strata.json, strata_<by>.png box plots, bland_altman.png.")] = None,
    dataset: Annotated[Path | None, typer.Option("--dataset", help="ISLES'22/BIDS dataset holding participants.tsv and the DWI sidecars (default: the dataset of --gt).")] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples for the 95% CI of each stratum's mean (0: none).", min=0)] = 2000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap.")] = 0,
    volume_bins: Annotated[str | None, typer.Option("--volume-bins", help="Reference-volume bin edges in mL, default 1,5,20,70: <1, 1-5, 5-20, 20-70, >=70 mL (empty references apart).")] = None,
    count_bins: Annotated[str | None, typer.Option("--count-bins", help="Reference lesion-count bin ends, default 1,5: 1, 2-5, >5 (empty references apart).")] = None,
) -> None:
    """Score masks with the official ISLES'22 metrics (Dice, absolute volume difference, lesion count difference, lesion F1); --by: per stratum."""
    from rich.progress import Progress

    from deepisles.api import evaluate as api_evaluate
    from deepisles.metrics import METRICS

    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("scoring", total=None)
        rows, summary = api_evaluate(
            pred, gt, csv=csv, overwrite=overwrite,
            progress=_Bar(bar, task), by=tuple(by or ()), out_dir=out_dir, dataset=dataset, bootstrap=bootstrap,
            seed=seed, volume_bins=volume_bins, count_bins=count_bins,
        )
    table = Table(title=f"ISLES'22 metrics over {len(rows)} case(s)")
    for col in ("metric", "mean", "median", "IQR (q1–q3)"):
        table.add_column(col)
    for metric in METRICS:
        s = summary[metric]
        table.add_row(metric, f"{s['mean']:.4f}", f"{s['median']:.4f}", f"{s['q1']:.4f}–{s['q3']:.4f}")
    out.print(table)
    if csv is not None:
        out.print(f"per-case metrics: {csv}")
    if "strata" in summary:
        _print_strata(summary["strata"], out_dir)


def _num(v, fmt: str = ".3f") -> str:
    return "–" if v is None else format(v, fmt)


def _print_strata(report: dict, out_dir: Path) -> None:
    for name, block in report["by"].items():
        table = Table(title=f"by {name} ({block['source']})")
        for col in ("stratum", "n", "Dice median [IQR]", "Dice mean (95% CI)", "F1 median", "|ΔV| median mL"):
            table.add_column(col)
        for s in block["strata"]:
            d, f, v = (s["metrics"][m] for m in ("dice", "lesion_f1", "abs_volume_diff_ml"))
            table.add_row(s["stratum"], str(s["n"]), f"{_num(d['median'])} [{_num(d['q1'])}–{_num(d['q3'])}]",
                          _num(d["mean"]) + (f" ({d['ci_low']:.3f}–{d['ci_high']:.3f})" if d["ci_low"] is not None
                                             else ""), _num(f["median"]),
                          _num(v["median"], ".2f"))  # fmt: skip
        out.print(table)
        if block["n_a"]:
            reasons: dict[str, int] = {}
            for why in block["n_a"].values():
                reasons[why] = reasons.get(why, 0) + 1
            _line("note:", "yellow", f"--by {name}: {len(block['n_a'])} case(s) in n/a: "
                  + "; ".join(f"{n} {why}" for why, n in reasons.items()))  # fmt: skip
    extra = (report.get("attributes") or {}).get("participants_without_case") or []
    if extra:
        _line("note:", "yellow", f"{len(extra)} participant(s) of participants.tsv have no evaluated case: "
              + ", ".join(extra[:5]) + (" …" if len(extra) > 5 else ""))  # fmt: skip
    ba = report["bland_altman"]
    out.print(f"Bland-Altman (predicted - reference volume, {ba['n']} cases): bias {_num(ba['bias_ml'], '.2f')} mL, "
              f"limits of agreement {_num(ba['loa_low_ml'], '.2f')} to {_num(ba['loa_high_ml'], '.2f')} mL")
    out.print(f"strata tables and plots: {out_dir}")


@app.command()
@_friendly
def synth(
    outdir: Annotated[Path, typer.Option("-o", "--output", help="Dataset folder (ISLES'22 layout).")],
    n: Annotated[int, typer.Option("-n", help="Number of cases.", min=1)] = 10,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives the same cases.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a dataset already there.")] = False,
) -> None:
    """Synthesize realistic stroke cases (DWI, ADC, FLAIR, lesion mask) from real anatomy, in the ISLES'22 layout."""
    from rich.progress import Progress

    from deepisles.api import synth as api_synth

    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("synthesizing", total=n)
        ids = api_synth(outdir, n, seed, overwrite=overwrite, progress=_Bar(bar, task))
    out.print(f"wrote {len(ids)} case(s) to {outdir}")


@app.command()
@_friendly
def demo(
    outdir: Annotated[Path, typer.Option("-o", "--output", help="Where the demo case and its results go.")] = Path("demo-output"),
    seed: Annotated[int, typer.Option("--seed", help="Seed of the synthetic demo case.")] = 1,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier demo.")] = False,
) -> None:
    """Synthesize one stroke case and segment it: a check that everything works, no data needed."""
    from deepisles.api import OUTPUT_NAMES
    from deepisles.api import segment as api_segment
    from deepisles.api import synth as api_synth
    from deepisles.io.write import check_output_dir

    check_output_dir(outdir, OUTPUT_NAMES, overwrite)
    with err.status("synthesizing a demo case"):
        (sub,) = api_synth(outdir / "input", 1, seed, overwrite=True)
    raw = outdir / "input" / "rawdata" / sub / "ses-0001"
    gt = outdir / "input" / "derivatives" / sub / "ses-0001" / f"{sub}_ses-0001_msk.nii.gz"
    with err.status("segmenting") as status:
        result = api_segment(
            raw / f"{sub}_ses-0001_dwi.nii.gz", raw / f"{sub}_ses-0001_adc.nii.gz", raw / f"{sub}_ses-0001_flair.nii.gz",
            outdir=outdir, overwrite=True, progress=_StatusLine(status),
        )
    _warn_lines(result.report["warnings"])
    _print_result(result, outdir)
    from deepisles.metrics import evaluate_pair

    m = evaluate_pair(outdir / "lesion_mask.nii.gz", gt)
    out.print(
        f"against the synthetic ground truth: Dice {m['dice']:.3f}, lesion F1 {m['lesion_f1']:.3f}, "
        f"|Δvolume| {m['abs_volume_diff_ml']:.2f} mL"
    )


@app.command()
@_friendly
def train(
    member: Annotated[str, typer.Option("--member", help="seals | nvauto | factorizer")],
    data: Annotated[Path | None, typer.Option("--data", help="ISLES'22-layout dataset (rawdata/… + derivatives/…, or sub-*/ses-*/{dwi,anat}/… + derivatives/…).")] = None,
    synthetic: Annotated[bool, typer.Option("--synthetic", help="Train on synthetic cases generated on the fly (domain-randomised) instead of --data.")] = False,
    run_dir: Annotated[Path | None, typer.Option("-o", "--output", help="Run folder (default runs/<member>); fold K goes to <output>/fold_K.")] = None,
    run_dir_old: Annotated[Path | None, typer.Option("--out", hidden=True, help="Old spelling of --output.")] = None,
    fold: Annotated[int, typer.Option("--fold", help="Fold to train (0-based).", min=0)] = 0,
    folds: Annotated[int, typer.Option("--folds", help="Number of cross-validation folds (by subject); 1 = all cases, no validation.", min=1)] = 5,
    init: Annotated[str, typer.Option("--init", help="none (compact recipe, random weights) | default (packaged default model) | official (imported official weights: fine-tuning).")] = "none",
    arch: Annotated[str, typer.Option("--arch", help="FACTORIZER architecture to train: resunet | swin-factorizer (the latter with --init official).")] = "resunet",
    iterations: Annotated[int, typer.Option("--iterations", help="Training iterations (batches).", min=1)] = 2000,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 2,
    patch: Annotated[str | None, typer.Option("--patch", help="Training patch as X,Y,Z voxels of the network grid (default: the member's inference window).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate (default 1e-3; 1e-4 with --init official/default).")] = None,
    val_every: Annotated[int, typer.Option("--val-every", help="Validate (ISLES'22 metrics on held-out cases) every N iterations; 0 = never.", min=0)] = 250,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", min=1)] = 250,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N (under torchrun each process takes its local GPU).")] = "auto",
    amp: Annotated[bool, typer.Option("--amp/--no-amp", help="Mixed precision: float16 on CUDA, bfloat16 on CPU.")] = True,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in <output>/fold_K from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start the fold again over an earlier run, and replace an installed member of the same name.")] = False,
    install: Annotated[bool, typer.Option("--install/--no-install", help="Install the trained member into the weight store ($DEEPISLES_HOME).")] = True,
) -> None:
    """Train or fine-tune one member (one fold) with the inference preprocessing; the result is a member `segment` uses.

    Multi-GPU: torchrun --nproc_per_node N -m deepisles train ... (DDP; gloo on CPU).
    """
    from deepisles.training.loop import TrainConfig
    from deepisles.training.loop import train as run_training

    if (data is None) == (not synthetic):
        raise DeepIslesError("give either --data DIR or --synthetic")
    if data is not None and not data.is_dir():
        raise DeepIslesError(f"{data}: no such dataset folder")
    if fold >= folds:
        raise DeepIslesError(f"--fold {fold} must be below --folds {folds}")
    if run_dir_old is not None:  # --out: the earlier spelling, kept working (hidden)
        if run_dir is not None and run_dir != run_dir_old:
            raise DeepIslesError(f"-o/--output {run_dir} and --out {run_dir_old} differ; give -o/--output only")
        run_dir = run_dir_old
    patch_size = None
    if patch:
        try:
            patch_size = [int(v) for v in patch.split(",")]
        except ValueError:
            patch_size = []
        if len(patch_size) != 3 or min(patch_size) < 8:
            raise DeepIslesError(f"--patch {patch}: expected three sizes >= 8, e.g. 64,64,64")
    cfg = TrainConfig(member=member.lower(), out=run_dir or Path("runs") / member.lower(), data=data, fold=fold,
                      folds=folds, init=init, arch=arch, iterations=iterations, batch_size=batch_size, lr=lr,
                      patch=patch_size,
                      val_every=val_every, checkpoint_every=checkpoint_every, seed=seed, device=device, amp=amp,
                      resume=resume, overwrite=overwrite, install=install)  # fmt: skip
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err, transient=True) as bar:  # fmt: skip
        task = bar.add_task(escape(f"train {cfg.member} fold {cfg.fold}"), total=cfg.iterations)
        summary = run_training(cfg, progress=_Bar(bar, task, print_steps=True))
    table = Table(title=f"trained {summary['member']} fold {summary['fold']}", show_header=False)
    for key in ("iterations", "seconds", "device", "world_size", "val_dice", "val_f1", "weights", "member_folder",
                "installed"):
        if key in summary:
            v = summary[key]
            table.add_row(key, f"{v:.4f}" if isinstance(v, float) else str(v))
    out.print(table)


@app.command()
@_friendly
def batch(
    dataset: Annotated[Path, typer.Option("-i", "--input", help="BIDS / ISLES'22 dataset: DATASET/rawdata/sub-*/ses-*/... or DATASET/sub-*/..., files *_dwi, *_adc and optionally *_flair .nii/.nii.gz.")],
    outroot: Annotated[Path | None, typer.Option("-o", "--output", help="Derivative dataset root (default DATASET/derivatives/deepisles).")] = None,
    members: Annotated[str, typer.Option("--members", help="As for `segment`: auto, or a comma-separated list of seals, nvauto, factorizer, classical.")] = "auto",
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")] = "auto",
    fast: Annotated[bool, typer.Option("--fast", help="Each member's faster, approximate mode (docs/deviations.md).")] = False,
    shard: Annotated[str | None, typer.Option("--shard", help="K/N: run only shard K of N (every N-th case from the K-th), e.g. $SLURM_ARRAY_TASK_ID/8.")] = None,
    skull_strip: Annotated[str, typer.Option("--skull-strip", help="auto | none | classical | hdbet (as for `segment`).")] = "auto",
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Run again the cases that failed in an earlier run (default: keep them failed).")] = False,
    max_voxels: Annotated[int, typer.Option("--max-voxels", help="Refuse (as a failed case) an image whose header declares more voxels than this.", min=1)] = DEFAULT_MAX_VOXELS,
    flair_registered: Annotated[bool, typer.Option("--flair-registered", help="Every FLAIR is already registered to its DWI: skip the registration (as for `segment`).")] = False,
    precision: Annotated[str, typer.Option("--precision", help="CPU inference: fp32 (default) | bf16 (opt-in; as for `segment`).")] = "fp32",
    engine: Annotated[str, typer.Option("--engine", help="serial | pipelined (reading, registration, biomarkers and writing in worker processes while the members run) | ray (cases on Ray actors, local or a cluster; pip install 'deepisles\\[ray]'). docs/batch.md.")] = "serial",
    workers: Annotated[int, typer.Option("--workers", help="pipelined: worker processes (0: CPU cores - 1, at most 4).", min=0)] = 0,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="ray: the cluster to join (auto, HOST:PORT or ray://...; default: start a local Ray instance with this machine's CPUs and GPUs).")] = None,
    ray_cpus_per_actor: Annotated[int, typer.Option("--ray-cpus-per-actor", help="ray: CPUs per actor when the actors run on CPU (0: 2, or a node's CPUs if fewer); with GPUs one actor per GPU.", min=0)] = 0,
) -> None:
    """Segment every case of a dataset into BIDS derivatives (resumable, kill-safe, shardable; docs/batch.md).

    Exit code 0 when every case of the shard is done, 1 when some failed (see failures.jsonl), 2 on usage errors."""
    import time as _time

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from deepisles.batch import COHORT, FAILURES, parse_shard, run_batch

    if skull_strip not in SKULL_STRIP:
        raise DeepIslesError(f"--skull-strip {skull_strip}: expected one of {', '.join(SKULL_STRIP)}")
    k, n = parse_shard(shard)
    t0 = _time.perf_counter()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("finding cases, loading members", total=None)

        def on_case(o) -> None:
            if o.status == "failed":
                bar.console.print(Text.assemble(("failed", "bold red"), f" {o.case_id}: {o.error or ''}"),
                                  highlight=False, soft_wrap=True)

        summary = run_batch(
            dataset, outroot, members=members, device=device, fast=fast, skull_strip=skull_strip, shard=(k, n),
            retry_failed=retry_failed, max_voxels=max_voxels, progress=_Bar(bar, task), on_case=on_case,
            flair_registered=flair_registered, engine=engine, workers=workers, precision=precision,
            ray_address=ray_address, ray_cpus_per_actor=ray_cpus_per_actor,
        )
    table = Table(title=f"deepisles batch, shard {k}/{n}: {summary.cases} case(s)", show_header=False)
    table.add_row("segmented now", str(summary.count("done")))
    table.add_row("skipped (already done)", str(summary.count("skipped")))
    table.add_row("failed", str(summary.count("failed")))
    if summary.count("failed-before"):
        table.add_row("failed earlier (not retried; --retry-failed)", str(summary.count("failed-before")))
    table.add_row("time", f"{_time.perf_counter() - t0:.1f} s")
    table.add_row("derivatives", str(summary.outroot))
    table.add_row("cohort table", str(summary.outroot / COHORT))
    if not summary.ok:
        table.add_row("failure log", str(summary.outroot / FAILURES))
    out.print(table)
    if not summary.ok:
        raise typer.Exit(1)


@app.command()
@_friendly
def cohort(
    batch_output: Annotated[Path, typer.Argument(help="Output root of a finished `deepisles batch` (holds cohort.tsv and sub-*/…).")],
    participants: Annotated[Path, typer.Option("--participants", help="participants.tsv with participant_id (optionally session_id) and clinical columns.")],
    outdir: Annotated[Path, typer.Option("-o", "--output", help="Folder for the statistics (CSV/JSON), pictures, frequency map and HTML page.")],
    nihss: Annotated[str | None, typer.Option("--nihss", help="Column of the NIHSS at admission (default: the one column whose name contains 'nihss').")] = None,
    mrs: Annotated[str | None, typer.Option("--mrs", help="Column of the mRS at 90 days (default: the one column named like 'mrs', e.g. mRS_90d).")] = None,
    reference: Annotated[Path | None, typer.Option("--reference", help="ISLES'22/BIDS dataset with the expert masks (sub-*[_ses-*]_msk.nii[.gz], e.g. under derivatives/): adds expert volumes and the predicted-vs-expert difference test.")] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples for the 95% CIs.", min=100)] = 2000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace earlier cohort results in the output folder.")] = False,
) -> None:
    """Lesion volume, count and per-lobe volumes of a batch run against NIHSS / mRS: Spearman rho with bootstrap CIs, scatter plots, lesion frequency map in MNI space, HTML + CSV/JSON (docs/validation.md)."""
    from deepisles.validation.cohort import run_cohort

    with err.status("cohort statistics") as status:
        result = run_cohort(batch_output, participants, outdir, nihss=nihss, mrs=mrs, reference=reference,
                            n_boot=bootstrap, seed=seed, overwrite=overwrite, progress=_StatusLine(status))
    table = Table(title=f"Spearman rho, 95% bootstrap CI ({len(result.subjects)} subjects)")
    for col in ("score", "biomarker", "n", "rho [95% CI]", "p"):
        table.add_column(col)
    for r in result.statistics:
        if r["biomarker"] in ("volume_ml", "count") or r["rho"] is not None:
            rho = r["note"] if r["rho"] is None else f"{r['rho']:.3f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
            name = r["biomarker"] if r["source"] == "predicted" else f"{r['biomarker']} (expert)"
            table.add_row(r["score"], name, str(r["n"]), rho, "" if r["p"] is None else f"{r['p']:.3g}")
    out.print(table)
    for d in result.differences:
        if d["diff"] is not None:
            out.print(f"{d['score']} {d['biomarker']}: rho predicted - expert = {d['diff']:.3f} "
                      f"(95% CI {d['ci_low']:.3f} – {d['ci_high']:.3f}, bootstrap p = {d['p_boot']:.3g}, n = {d['n']})")
        else:
            out.print(f"{d['score']} {d['biomarker']}: predicted vs expert not tested ({d['note']})")
    for e in result.exclusions:
        case = e["participant_id"] + (f" {e['session_id']}" if e["session_id"] else "")
        out.print(f"excluded {case} from {e['excluded_from']}: {e['reason']}", highlight=False, soft_wrap=True)
    out.print(f"frequency map: {result.map_n} subject(s) -> {result.files['frequency_nifti']}")
    out.print(f"report: {result.files['html']}")


weights_app = typer.Typer(help="Manage model weights: import the official DeepISLES weights, list, download.",
                          no_args_is_help=True)
app.add_typer(weights_app, name="weights")


@weights_app.command("import")
@_friendly
def weights_import(
    path: Annotated[Path, typer.Argument(help="Unpacked official weight folder (holding weights/) or stroke_ensemble_weights.7z.")],
    members: Annotated[str | None, typer.Option("--members", help="Comma-separated subset of the importable members (default: all of them: seals, nvauto, factorizer).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace members already imported.")] = False,
) -> None:
    """Convert the official weights into deepisles' store (safetensors + JSON) under $DEEPISLES_HOME.

    This is the only step that reads the official checkpoints, with restricted readers (tensors and plain
    containers only; nothing from the files is run); a .7z is unpacked only after every member name is checked."""
    from deepisles.members import registry
    from deepisles.store import weights_dir
    from deepisles.weights.importer import import_weights

    names = registry.importable_members() if members is None else tuple(m.strip() for m in members.split(",") if m.strip())
    for name in names:
        registry.spec(name, registry.importable_members(), "member to import")
    results = import_weights(path, names, overwrite=overwrite, say=lambda m: err.print(m, highlight=False, soft_wrap=True))
    for name, where in results.items():
        out.print(f"{name}: {where}")
    out.print(f"store: {weights_dir()}")


@weights_app.command("list")
@_friendly
def weights_list() -> None:
    """List the members installed in the store, and the packaged default models used where none is installed."""
    from deepisles import store

    table = Table(title=f"weights in {store.weights_dir()}")
    for col in ("member", "models", "source", "size (MB)"):
        table.add_column(col)
    from deepisles.members import DEEP_MEMBERS
    from deepisles.members.base import DEFAULT_MODELS_DIR, DEFAULT_MODELS_NOTE, has_default_model

    installed = store.installed_members()
    rows = [(name, *store.read_member(name)) for name in installed]
    rows += [(f"{name} (default)", *store.read_member_folder(DEFAULT_MODELS_DIR / name))
             for name in DEEP_MEMBERS if name not in installed and has_default_model(name)]
    for name, meta, folder in rows:
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 1e6
        table.add_row(name, str(len(meta.get("files", {}))), str(meta.get("source", "")), f"{size:.1f}")
    out.print(table)
    if any(name.endswith("(default)") for name, _, _ in rows):
        out.print(f"(default): packaged {DEFAULT_MODELS_NOTE}; used when no weights of that member are installed")


@weights_app.command("info")
@_friendly
def weights_info(
    member: Annotated[str, typer.Argument(help="Member name (a member with stored weights: seals, nvauto, factorizer).")],
    verify: Annotated[bool, typer.Option("--verify", help="Re-check every file's SHA-256.")] = False,
) -> None:
    """Show a member's stored description (inputs, preprocessing, architecture, files)."""
    import json

    from deepisles import store
    from deepisles.members import registry

    registry.spec(member, registry.deep_members(), "member with stored weights")
    try:
        meta, folder = store.read_member(member, verify=verify)
    except FileNotFoundError as exc:
        raise DeepIslesError(str(exc)) from None
    out.print_json(json.dumps(meta))
    out.print(f"folder: {folder}" + ("; checksums verified" if verify else ""))


@weights_app.command("download")
@_friendly
def weights_download(
    dest: Annotated[Path, typer.Option("-o", "--output", help="Where to save the archive.")] = Path("stroke_ensemble_weights.7z"),
    url: Annotated[str | None, typer.Option("--url", help="Archive URL (default: from the Zenodo record).")] = None,
    checksum: Annotated[str | None, typer.Option("--checksum", help="md5:<hex> or sha256:<hex> (default: from the Zenodo record).")] = None,
    record: Annotated[str | None, typer.Option("--record", help="Zenodo API record URL.")] = None,
) -> None:
    """Download the official DeepISLES weights (~9.1 GB, resumable, checksum-verified), then run `weights import`."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from deepisles.weights.download import ZENODO_API, download, resolve_archive

    size = None
    if url is None or checksum is None:
        info = resolve_archive(record or ZENODO_API)
        url, checksum, size = url or info["url"], checksum or info["checksum"], info["size"]
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=err) as bar:
        task = bar.add_task("downloading", total=size)
        path = download(url, dest, checksum, size=size, progress=_Bar(bar, task))
    out.print(f"saved {path}; next: deepisles weights import {path}")


reader_app = typer.Typer(help="Blinded reader study: two masks per case side by side in one offline page; unblind the "
                              "ratings (docs/validation.md).", no_args_is_help=True)
app.add_typer(reader_app, name="reader-study")


@reader_app.command("build")
@_friendly
def reader_study_build(
    cases: Annotated[Path, typer.Option("--cases", help="CSV (or .tsv) with the columns case, dwi, adc, mask_a, mask_b; paths relative to its folder.")],
    outdir: Annotated[Path, typer.Option("-o", "--output", help="Study folder: study.html (for the raters) and key.json (keep it: it unblinds).")],
    label_a: Annotated[str, typer.Option("--label-a", help="Name of the source of mask_a (e.g. expert).")] = "A",
    label_b: Annotated[str, typer.Option("--label-b", help="Name of the source of mask_b (e.g. model).")] = "B",
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of case order and sides (default: a random one, recorded in key.json).")] = None,
    slices: Annotated[int, typer.Option("--slices", help="Axial slices shown per case, spread over the lesions of either mask.", min=1)] = 3,
    title: Annotated[str, typer.Option("--title", help="Heading of the page.")] = "Blinded segmentation reader study",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a study already in the folder.")] = False,
) -> None:
    """Build study.html (blinded: random case order and sides, no labels or file names) and its key.json."""
    from rich.progress import Progress

    from deepisles.validation.reader_study import HTML_NAME, KEY_NAME, build_study

    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("rendering cases", total=None)
        summary = build_study(cases, outdir, label_a=label_a, label_b=label_b, seed=seed, slices=slices,
                              title=title, overwrite=overwrite, progress=_Bar(bar, task))
    for note in summary.notes:
        _line("note:", "yellow", note)
    for ex in summary.excluded:
        _line("excluded:", "yellow", f"case {ex['case']}: {ex['reason']}")
    out.print(f"study {summary.study}: {summary.cases} case(s) in {outdir / HTML_NAME} (send to the raters); "
              f"unblinding key {outdir / KEY_NAME} (keep it)")


@reader_app.command("analyze")
@_friendly
def reader_study_analyze(
    ratings: Annotated[list[Path], typer.Argument(help="Ratings CSV file(s) exported from study.html.")],
    key: Annotated[Path, typer.Option("--key", help="The study's key.json.")],
    outdir: Annotated[Path | None, typer.Option("-o", "--output", help="Folder for reader_study.json and reader_study.csv.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace results already in the folder.")] = False,
) -> None:
    """Unblind the ratings: preference shares per rater and overall, binomial test, scores, inter-rater kappa."""
    from deepisles.validation.reader_study_analyze import analyze, table_rows, write_results

    result = analyze(key, ratings)
    rows = table_rows(result)
    table = Table(title=f"reader study {result['study']}: {result['labels']['A']} vs {result['labels']['B']}, "
                        f"{result['cases']} case(s)")
    table.add_column("")
    for r in rows:  # a column per rater (few), a row per measure (many)
        table.add_column(str(r["rater"]), overflow="fold")
    for name in list(rows[0])[1:]:
        table.add_row(name, *("–" if r[name] is None else f"{r[name]:.4g}" if isinstance(r[name], float)
                              else str(r[name]) for r in rows))
    out.print(table)
    ag = result["agreement"]
    kappa = "undefined" if ag["kappa"] is None else f"{ag['kappa']:.3f}"
    out.print(f"agreement: {ag['method'] or '-'} {kappa} over {ag['cases']} case(s) decided by all {ag['raters']} "
              f"rater(s)" + (f" ({ag['note']})" if ag.get("note") else ""))
    out.print(f"test: {result['test']}")
    for note in result["notes"]:
        _line("note:", "yellow", note)
    for ex in result["excluded_at_build"]:
        _line("excluded at build:", "yellow", f"case {ex['case']}: {ex['reason']}")
    if outdir is not None:
        j, c = write_results(result, outdir, overwrite=overwrite)
        out.print(f"wrote {j} and {c}")


@app.command()
def version() -> None:
    """Print the deepisles version."""
    out.print(f"deepisles {__version__}")


def main() -> None:
    try:
        app()
    except SystemExit as exc:
        if exc.code == 130:
            # Ctrl-C was handled (the message says what is left). Leave at once with 130: a KeyboardInterrupt
            # raised inside a C extension's nested evaluation can leave CPython's "unhandled interrupt" flag set,
            # and the interpreter would then kill itself with SIGINT at exit instead of returning 130.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        sys.exit(exc.code)


if __name__ == "__main__":
    main()
