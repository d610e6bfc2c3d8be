"""The `deepisles` command: parses arguments, calls deepisles.api, prints. Errors -> one line, exit 2."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from deepisles import __version__
from deepisles.errors import DeepIslesError

app = typer.Typer(
    name="deepisles",
    help="Find and measure acute ischemic stroke lesions on brain MRI (DWI + ADC, optional FLAIR).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

SKULL_STRIP = ("auto", "none", "classical", "hdbet")


def _friendly(fn):
    """Turn every DeepIslesError into `error: ...` on one line and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DeepIslesError as exc:
            msg = " ".join(str(exc).split())
            err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[bold red]interrupted[/]: no partial output files are left behind", highlight=False)
            raise typer.Exit(130) from None

    return wrapper


def _warn_lines(warnings: list[str]) -> None:
    for w in warnings:
        err.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)


def _print_result(result, outdir: Path | None) -> None:
    rep = result.report
    table = Table(title="deepisles result", show_header=False)
    table.add_row("lesion volume", f"{rep['lesions']['volume_ml']:.3f} mL")
    table.add_row("lesion count", f"{rep['lesions']['count']} (26-connectivity)")
    table.add_row("members run", ", ".join(m["name"] for m in rep["members"]["run"]))
    if rep["members"]["skipped"]:
        table.add_row("members skipped", "; ".join(f"{s['member']}: {s['reason']}" for s in rep["members"]["skipped"]))
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
    flair: Annotated[str | None, typer.Option("--flair", help="Optional FLAIR; registered to the DWI.")] = None,
    bval: Annotated[str | None, typer.Option("--bval", help="b-values of a 4D DWI (default: a .bval/.json beside it).")] = None,
    skull_strip: Annotated[str, typer.Option("--skull-strip", help="auto (use zero background if skull-stripped, else classical) | none | classical | hdbet (needs deepisles[hdbet]).")] = "auto",
    members: Annotated[str, typer.Option("--members", help="Comma-separated members, or auto (installed weights; classical when none).")] = "auto",
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace results already in the output folder.")] = False,
    no_preview: Annotated[bool, typer.Option("--no-preview", help="Do not write preview.png.")] = False,
) -> None:
    """Segment one case: writes lesion_mask.nii.gz, lesion_prob.nii.gz, report.json and preview.png on the DWI grid."""
    from deepisles.api import segment as api_segment

    if skull_strip not in SKULL_STRIP:
        raise DeepIslesError(f"--skull-strip {skull_strip}: expected one of {', '.join(SKULL_STRIP)}")
    with err.status("starting") as status:
        result = api_segment(
            dwi, adc, flair, outdir=outdir, skull_strip=skull_strip, members=members, device=device,
            bval=bval, overwrite=overwrite, preview=not no_preview, progress=lambda m: status.update(m),
        )
    _warn_lines(result.report["warnings"])
    _print_result(result, outdir)


@app.command()
@_friendly
def evaluate(
    pred: Annotated[Path, typer.Option("--pred", help="Predicted mask file, or folder of masks.")],
    gt: Annotated[Path, typer.Option("--gt", help="Ground-truth mask file, folder (same file names) or ISLES'22 dataset/derivatives folder.")],
    csv: Annotated[Path | None, typer.Option("-o", "--output", help="Per-case CSV to write.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing CSV.")] = False,
) -> None:
    """Score masks with the official ISLES'22 metrics (Dice, absolute volume difference, lesion count difference, lesion F1)."""
    from deepisles.api import evaluate as api_evaluate

    rows, summary = api_evaluate(pred, gt, csv=csv, overwrite=overwrite)
    table = Table(title=f"ISLES'22 metrics over {len(rows)} case(s)")
    for col in ("metric", "mean", "median", "IQR (q1–q3)"):
        table.add_column(col)
    for metric, s in summary.items():
        table.add_row(metric, f"{s['mean']:.4f}", f"{s['median']:.4f}", f"{s['q1']:.4f}–{s['q3']:.4f}")
    out.print(table)
    if csv is not None:
        out.print(f"per-case metrics: {csv}")


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
        ids = api_synth(outdir, n, seed, overwrite=overwrite, progress=lambda i, total: bar.update(task, completed=i + 1))
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
            outdir=outdir, overwrite=True, progress=lambda m: status.update(m),
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
def version() -> None:
    """Print the deepisles version."""
    out.print(f"deepisles {__version__}")


def main() -> None:
    try:
        app()
    except SystemExit as exc:
        sys.exit(exc.code)


if __name__ == "__main__":
    main()
