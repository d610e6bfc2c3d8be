"""Python API mirroring the CLI: segment(), evaluate(), synth()."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from deepisles.core import resolve_device  # moved to core; still importable from here
from deepisles.errors import Interrupted, OutputWriteError
from deepisles.io.read import DEFAULT_MAX_VOXELS
from deepisles.outputs.dicom_seg import SEG_FILENAME as SEG_NAME  # --output-type dicom-seg
from deepisles.pipeline import (  # noqa: F401 - the public names of segment's results and options
    MEMBERS_DIR,
    OUTPUT_NAMES,
    OUTPUT_TYPES,
    SKULL_STRIP,
    FolderLayout,
    InputFiles,
    RunOptions,
    SegmentationResult,
    Trace,
    run_case,
    write_result,
)
from deepisles.progress import Progress, as_progress

__all__ = ["segment", "evaluate", "synth", "resolve_device", "SegmentationResult", "owned_outputs"]


def owned_outputs() -> tuple[str, ...]:
    """Every file `segment` may write into its output folder (relative paths): what --overwrite replaces or
    removes, and nothing else."""
    from deepisles.members import KNOWN_MEMBERS

    return (*OUTPUT_NAMES, SEG_NAME, *(f"{MEMBERS_DIR}/{m}_prob.nii.gz" for m in KNOWN_MEMBERS))


def refuse_outputs_over_inputs(outdir: Path, inputs: dict[str, object]) -> None:
    """An output path that is an input file (``-o`` holding an input named ``lesion_prob.nii.gz``) is refused:
    --overwrite must never replace an input."""
    from deepisles.errors import InputError
    from deepisles.io.read import image_files

    outputs = {os.path.normcase(os.path.realpath(outdir / n)): n for n in owned_outputs()}
    for role, p in inputs.items():
        if not isinstance(p, (str, Path)) or not Path(p).exists():
            continue
        files = [Path(p)] if role == "bval" else image_files(Path(p))
        if Path(p).is_dir():
            files = [Path(p), *files]
        for f in files:
            key = os.path.normcase(os.path.realpath(f))
            if key in outputs:
                raise InputError(f, f"the {role.upper() if role != 'flair' else 'FLAIR'} input is also the output "
                                    f"file {outputs[key]} of -o {outdir}; choose another output folder")
            for out_key, name in outputs.items():
                if out_key.startswith(key + os.sep):  # a DICOM input folder holding an output path
                    raise InputError(f, f"the output file {name} of -o {outdir} would be written inside this "
                                        "input folder; choose another output folder")


def segment(
    dwi: str | Path,
    adc: str | Path,
    flair: str | Path | None = None,
    *,
    outdir: str | Path | None = None,
    skull_strip: str = "auto",
    members: str | list[str] | None = "auto",
    device: str = "auto",
    bval: str | Path | None = None,
    fast: bool = False,
    save_members: bool = False,
    overwrite: bool = False,
    preview: bool = True,
    html: bool = True,
    output_type: str = "nifti",
    max_voxels: int = DEFAULT_MAX_VOXELS,
    progress: Progress | Callable[[str], None] | None = None,
    flair_registered: bool = False,
    precision: str = "fp32",
) -> SegmentationResult:
    """Segment the acute ischemic lesion of one case.

    Order of work: options, the output folder (locked for the whole run, refused when it holds results unless
    ``overwrite``, created and checked writable) and every input (read and validated; any problem raises
    ``InputError``) come first, before any model is loaded; nothing is written when they fail. Then ADC is
    brought to the canonical unit and onto the DWI grid, FLAIR registered to DWI, the brain mask built, the
    ensemble members run and combined by majority vote. With ``outdir`` the results (``lesion_mask.nii.gz``,
    ``lesion_prob.nii.gz``, ``report.json``, ``lesions.csv``, ``preview.png``, ``report.html``, ...) are written
    into a private staging folder and published as one set: the earlier results this tool owns are removed
    (other files stay), report.json is renamed into place last (see :mod:`deepisles.io.outdir`). Returns the
    mask and probability on the native DWI grid and the report.

    ``members``: "auto" (every member with installed weights; the packaged default models when there are none)
    or a comma-separated list. ``fast``: each member's documented faster mode (see docs/deviations.md).
    ``save_members``: also write ``members/<name>_prob.nii.gz``. ``device``: auto, cpu, cuda or cuda:N.
    ``max_voxels``: refuse inputs declaring more voxels than this (checked before their data is read).
    ``flair_registered``: the FLAIR is already registered to the DWI: no registration (on the DWI grid it is
    used unchanged, on another grid resampled onto it in physical space); without it a FLAIR already on the DWI
    grid and aligned is used unchanged too (report.json ``preprocessing.flair_registration`` says what was done).
    ``precision``: CPU inference in ``fp32`` (default) or ``bf16`` (opt-in, refused on CPUs without bfloat16
    units and on CUDA; docs/deviations.md gives its measured speed and agreement).
    """
    from deepisles.io.outdir import OutputFolder

    opts = RunOptions(members=members, fast=fast, skull_strip=skull_strip, flair_registered=flair_registered,
                      max_voxels=max_voxels, output_type=output_type, precision=precision)  # fmt: skip
    opts.check()
    opts = dataclasses.replace(opts, device=resolve_device(device))
    opts.check_device()
    files = InputFiles(dwi, adc, flair, bval)
    if outdir is not None:
        refuse_outputs_over_inputs(Path(outdir), {"dwi": dwi, "adc": adc, "flair": flair, "bval": bval})
    layout = FolderLayout(preview=preview, html=html, save_members=save_members, dicom_seg=output_type == "dicom-seg")
    folder = OutputFolder(outdir, owned_outputs(), overwrite, owned_dirs=(MEMBERS_DIR,)) if outdir else None
    progress = as_progress(progress)
    try:
        with folder if folder is not None else contextlib.nullcontext():
            trace = Trace()
            if folder is not None:
                if folder.lock_warning:
                    trace.warnings.append(folder.lock_warning)
                if folder.swept:
                    trace.warnings.append(f"removed leftovers of an interrupted earlier run in {folder.path}: "
                                          f"{', '.join(folder.swept)}")  # fmt: skip
            result = run_case(files, opts, layout=layout if folder is not None else None, progress=progress,
                              trace=trace, outdir=folder.path if folder is not None else None)  # fmt: skip
            if folder is not None:
                progress.step("writing outputs")
                try:
                    write_result(result, folder.stage(), layout)
                except OSError as exc:
                    raise OutputWriteError(
                        f"{folder.path}: writing the results failed ({exc.strerror or type(exc).__name__}); "
                        "nothing was published, the output folder is as it was"
                    ) from None
                folder.publish(layout.marker)
            return result
    except KeyboardInterrupt:
        note = folder.remaining_note() if folder is not None else "nothing was written"
        raise Interrupted(f"interrupted: {note}") from None


def evaluate(
    pred: str | Path,
    gt: str | Path,
    *,
    csv: str | Path | None = None,
    overwrite: bool = False,
    progress=None,
    by: tuple[str, ...] | list[str] = (),
    out_dir: str | Path | None = None,
    dataset: str | Path | None = None,
    bootstrap: int = 2000,
    seed: int = 0,
    volume_bins: str | list[float] | None = None,
    count_bins: str | list[int] | None = None,
) -> tuple[list[dict], dict]:
    """ISLES'22 metrics per case (rows) and their summary; optionally writes the per-case CSV.

    With ``out_dir`` (required by ``by``) also the stratified evaluation (:mod:`deepisles.validation.strata`):
    per stratum of each ``by`` ("volume", "count", a participants.tsv column or DWI sidecar field of ``dataset``,
    by default the dataset of ``gt``) the metrics with ``bootstrap`` resamples (seeded by ``seed``), box plots and
    a Bland-Altman plot, written to ``out_dir``; the rows then also hold the reference / predicted volumes and
    counts, and ``summary["strata"]`` is what strata.json holds. Options, output folder and ``by`` names are
    checked before any case is scored.
    """
    from deepisles import metrics
    from deepisles.errors import DeepIslesError, OutputExistsError

    if by and out_dir is None:
        raise DeepIslesError("--by needs --out-dir DIR (where the strata tables and plots go)")
    if csv is not None and Path(csv).exists() and not overwrite:
        raise OutputExistsError(f"{csv}: already exists; pass --overwrite to replace it")
    plan = None
    if out_dir is not None:
        from deepisles.validation import strata

        plan = strata.prepare(Path(pred), Path(gt), by=by, out_dir=Path(out_dir), dataset=dataset,
                              resamples=bootstrap, seed=seed, volume_bins=volume_bins, count_bins=count_bins,
                              overwrite=overwrite, progress=progress)  # fmt: skip
    rows = metrics.evaluate_paths(Path(pred), Path(gt), progress=progress, volumes=plan is not None)
    summary = metrics.summarize(rows)
    if csv is not None:
        metrics.write_metrics_csv(Path(csv), rows)
    if plan is not None:
        summary["strata"] = plan.run(rows, progress=progress)
    return rows, summary


def synth(outdir: str | Path, n: int = 1, seed: int = 0, *, overwrite: bool = False, progress=None) -> list[str]:
    """Write ``n`` synthetic stroke cases in the ISLES'22 layout; returns the subject ids."""
    from deepisles.synth import write_dataset

    return write_dataset(Path(outdir), n, seed, overwrite=overwrite, progress=progress)
