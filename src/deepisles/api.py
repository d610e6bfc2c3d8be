"""Python API mirroring the CLI: segment(), evaluate(), synth()."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deepisles.core import resolve_device  # moved to core; still importable from here
from deepisles.errors import DeepIslesError, Interrupted, OutputWriteError
from deepisles.io.image import Image
from deepisles.io.read import DEFAULT_MAX_VOXELS
from deepisles.outputs.dicom_seg import SEG_FILENAME as SEG_NAME  # --output-type dicom-seg

OUTPUT_NAMES = ("lesion_mask.nii.gz", "lesion_prob.nii.gz", "report.json", "lesions.csv", "preview.png", "report.html")
OUTPUT_TYPES = ("nifti", "dicom-seg")
SKULL_STRIP = ("auto", "none", "classical", "hdbet")
MEMBERS_DIR = "members"


def owned_outputs() -> tuple[str, ...]:
    """Every file `segment` may write into its output folder (relative paths): what --overwrite replaces or
    removes, and nothing else."""
    from deepisles.members import KNOWN_MEMBERS

    return (*OUTPUT_NAMES, SEG_NAME, *(f"{MEMBERS_DIR}/{m}_prob.nii.gz" for m in KNOWN_MEMBERS))

Progress = Callable[[str], None]


@dataclass
class SegmentationResult:
    """What segment() returns: ensemble mask and probability on the native DWI grid, and the report."""

    mask: Image
    probability: Image
    report: dict
    members: list = field(default_factory=list)
    outdir: Path | None = None
    brain: Image | None = None  # the brain mask the members saw, on the DWI grid

    @property
    def volume_ml(self) -> float:
        return self.report["lesions"]["volume_ml"]

    @property
    def count(self) -> int:
        return self.report["lesions"]["count"]


def _input_record(path: object, img: Image | None) -> dict | None:
    from deepisles.io.read import image_files
    from deepisles.outputs.report import files_sha256

    if path is None:
        return None
    rec: dict = {}
    if isinstance(path, (str, Path)):
        rec["path"] = str(Path(path).resolve())
        files = image_files(Path(path)) if img is not None else [Path(path)]
        rec["sha256"] = files_sha256(Path(path), files)  # header + detached data file(s)
        if len(files) > 1 and not Path(path).is_dir():
            rec["files"] = [str(f.resolve()) for f in files]
    else:
        rec["path"] = getattr(path, "source", "") or "<in memory>"
    if img is not None:
        rec["shape"] = list(img.shape)
        rec["spacing_mm"] = [round(s, 4) for s in img.spacing]
    return rec


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
    progress: Progress | None = None,
    flair_registered: bool = False,
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
    """
    from deepisles.io.outdir import OutputFolder

    if output_type not in OUTPUT_TYPES:
        raise DeepIslesError(f"--output-type {output_type}: expected one of {', '.join(OUTPUT_TYPES)}")
    if skull_strip not in SKULL_STRIP:
        raise DeepIslesError(f"--skull-strip {skull_strip}: expected one of {', '.join(SKULL_STRIP)}")
    from deepisles.members import check_member_spec

    check_member_spec(members)
    device_used = resolve_device(device)
    if outdir is not None:
        refuse_outputs_over_inputs(Path(outdir), {"dwi": dwi, "adc": adc, "flair": flair, "bval": bval})
    folder = OutputFolder(outdir, owned_outputs(), overwrite, owned_dirs=(MEMBERS_DIR,)) if outdir else None
    try:
        with folder if folder is not None else contextlib.nullcontext():
            return _segment_in(
                dwi, adc, flair, folder=folder, skull_strip=skull_strip, members=members, device_used=device_used,
                bval=bval, fast=fast, save_members=save_members, preview=preview, html=html,
                output_type=output_type, max_voxels=max_voxels, say=progress or (lambda _msg: None),
                flair_registered=flair_registered,
            )
    except KeyboardInterrupt:
        note = folder.remaining_note() if folder is not None else "nothing was written"
        raise Interrupted(f"interrupted: {note}") from None


def _segment_in(dwi, adc, flair, *, folder, skull_strip, members, device_used, bval, fast, save_members, preview,
                html, output_type, max_voxels, say, flair_registered=False) -> SegmentationResult:  # fmt: skip
    from deepisles.ensemble import combine
    from deepisles.io.load import read_inputs
    from deepisles.members import MemberUnavailable, resolve_members
    from deepisles.postprocess.biomarkers import compute_biomarkers
    from deepisles.postprocess.lesions import lesion_summary, lesion_table
    from deepisles.preprocess.case import build_case
    from deepisles.preprocess.inputs import harmonise_inputs

    timing: dict[str, float] = {}
    t_all = time.perf_counter()
    outdir = folder.path if folder is not None else None

    say("reading and validating inputs")
    t = time.perf_counter()
    loaded = harmonise_inputs(read_inputs(dwi, adc, flair, bval_path=bval, max_voxels=max_voxels))
    timing["load"] = time.perf_counter() - t
    if output_type == "dicom-seg":
        from deepisles.outputs.dicom_seg import require_dicom_dwi

        require_dicom_dwi(loaded.dwi)  # before any work: DICOM SEG needs the DWI's source instances
    warnings = list(loaded.warnings)
    if folder is not None:
        if folder.lock_warning:
            warnings.append(folder.lock_warning)
        if folder.swept:
            warnings.append(f"removed leftovers of an interrupted earlier run in {outdir}: {', '.join(folder.swept)}")
    steps = dict(loaded.steps)

    say("loading members")
    run_members, skipped = resolve_members(members, device_used, fast)

    case, case_steps, case_warnings, case_timing = build_case(loaded, skull_strip, device_used, say,
                                                              flair_registered=flair_registered)
    steps.update(case_steps)
    warnings.extend(case_warnings)
    timing.update(case_timing)
    results, run_records = [], []
    for member in run_members:
        say(f"member {member.name}")
        t = time.perf_counter()
        try:
            res = member.run(case)
        except MemberUnavailable as exc:
            skipped.append({"member": exc.member, "reason": exc.reason})
            warnings.append(f"member {exc.member} skipped: {exc.reason}")
            continue
        timing[f"member_{member.name}"] = time.perf_counter() - t
        results.append(res)
        run_records.append(
            {
                "name": res.name,
                **res.info,
                "lesion_volume_ml": round(float(res.mask.sum()) * loaded.dwi.voxel_volume_ml, 6),
            }
        )
    if not results:
        reasons = "; ".join(f"{s['member']}: {s['reason']}" for s in skipped)
        raise DeepIslesError(f"no ensemble member could run ({reasons})")
    if any(getattr(m, "fallback", False) for m in run_members):
        warnings.append(
            "no deep-learning weights installed (" + ", ".join(s["member"] for s in skipped) + "): ran the "
            "classical threshold member instead, which is not a validated model; see `deepisles weights --help`"
        )
    else:
        for s in skipped:
            msg = f"member {s['member']} not run: {s['reason']}"
            if not any(w.startswith(f"member {s['member']} ") for w in warnings):
                warnings.append(msg)

    mask_arr, prob_arr, rule = combine(results)
    mask_img = loaded.dwi.with_data(mask_arr.astype(np.uint8))
    prob_img = loaded.dwi.with_data(prob_arr.astype(np.float32))
    summary = lesion_summary(mask_img)
    table = lesion_table(mask_img, loaded.adc)
    say("lesion location and biomarkers")
    t = time.perf_counter()
    location_rows, bio = compute_biomarkers(mask_img, loaded.dwi, case.brain, case.flair)
    by_id = {r["id"]: r for r in location_rows}
    for row in table:
        row.update({k: v for k, v in by_id.get(row["id"], {}).items() if k != "id"})
    warnings.extend(bio["warnings"])
    timing["biomarkers"] = time.perf_counter() - t

    inputs = {
        "dwi": _input_record(dwi, loaded.dwi),
        "adc": _input_record(adc, loaded.adc),
        "flair": _input_record(flair, loaded.flair),
    }
    if bval is not None:
        inputs["bval"] = _input_record(bval, None)
    skip = {"preview.png"} if not preview else set()
    skip |= {"report.html"} if not html else set()
    outputs = {name: name for name in OUTPUT_NAMES if name not in skip} if outdir else {}
    if outdir and output_type == "dicom-seg":
        outputs["dicom_seg"] = SEG_NAME
    if outdir and save_members:
        outputs.update({f"member_{r.name}": f"{MEMBERS_DIR}/{r.name}_prob.nii.gz" for r in results})
    timing["total"] = time.perf_counter() - t_all

    from deepisles.outputs.report import build_report

    report = build_report(
        inputs={k: v for k, v in inputs.items() if v is not None},
        preprocessing=steps,
        members_run=run_records,
        members_skipped=skipped,
        ensemble_rule=rule,
        summary=summary,
        lesions=table,
        outputs=outputs,
        warnings=warnings,
        timing_s=timing,
        device=device_used,
        fast=fast,
        lesion_location=bio["lesions"],
        location=bio["location"],
        mismatch=bio["mismatch"],
    )
    result = SegmentationResult(
        mask_img, prob_img, report, results, outdir,
        brain=loaded.dwi.with_data(case.brain.astype(np.uint8)),
    )
    if folder is not None:
        say("writing outputs")
        try:
            write_outputs(result, folder.stage(), loaded.dwi, loaded.adc, case.flair, preview=preview,
                          save_members=save_members, html=html, dicom_seg=output_type == "dicom-seg")
        except OSError as exc:
            raise OutputWriteError(
                f"{outdir}: writing the results failed ({exc.strerror or type(exc).__name__}); nothing was "
                "published, the output folder is as it was"
            ) from None
        folder.publish("report.json")
    return result


def write_outputs(
    result: SegmentationResult,
    outdir: Path,
    dwi: Image,
    adc: Image,
    flair: Image | None,
    preview: bool = True,
    save_members: bool = False,
    html: bool = True,
    dicom_seg: bool = False,
) -> None:
    """Write mask, probability, member probabilities, preview, lesions.csv, report.html, the DICOM SEG (when
    asked) and (last, as the completion marker) report.json, each atomically."""
    from deepisles.io.write import write_json_atomic, write_nifti_atomic, write_text_atomic
    from deepisles.outputs.preview import render_preview
    from deepisles.outputs.report import lesions_csv

    outdir.mkdir(parents=True, exist_ok=True)
    write_nifti_atomic(outdir / "lesion_mask.nii.gz", result.mask.to_nifti(np.uint8))
    write_nifti_atomic(outdir / "lesion_prob.nii.gz", result.probability.to_nifti(np.float32))
    if save_members:
        for r in result.members:
            img = result.mask.with_data(np.asarray(r.probability, dtype=np.float32))
            write_nifti_atomic(outdir / MEMBERS_DIR / f"{r.name}_prob.nii.gz", img.to_nifti(np.float32))
    if preview:
        images = {"DWI": dwi, "ADC": adc}
        if flair is not None:
            images["FLAIR"] = flair
        lz = result.report["lesions"]
        title = f"deepisles: lesion {lz['volume_ml']:.2f} mL in {lz['count']} component(s)"
        render_preview(outdir / "preview.png", images, result.mask, title=title, brain=result.brain)
    write_text_atomic(outdir / "lesions.csv", lesions_csv(result.report["lesions"]["table"]))
    if dicom_seg:
        from deepisles.outputs.dicom_seg import write_result_seg

        write_result_seg(result.mask, dwi, outdir, members=[r.name for r in result.members])
    if html:
        from deepisles.outputs.html_report import write_html_report

        write_html_report(outdir, result.report, dwi=dwi, adc=adc, mask=result.mask, flair=flair,
                          preview_png=outdir / "preview.png" if preview else None, overwrite=True)
    write_json_atomic(outdir / "report.json", result.report)


def evaluate(
    pred: str | Path,
    gt: str | Path,
    *,
    csv: str | Path | None = None,
    overwrite: bool = False,
    progress=None,
) -> tuple[list[dict], dict]:
    """ISLES'22 metrics per case (rows) and their summary; optionally writes the per-case CSV."""
    from deepisles import metrics
    from deepisles.errors import OutputExistsError

    if csv is not None and Path(csv).exists() and not overwrite:
        raise OutputExistsError(f"{csv}: already exists; pass --overwrite to replace it")
    rows = metrics.evaluate_paths(Path(pred), Path(gt), progress=progress)
    summary = metrics.summarize(rows)
    if csv is not None:
        metrics.write_metrics_csv(Path(csv), rows)
    return rows, summary


def synth(outdir: str | Path, n: int = 1, seed: int = 0, *, overwrite: bool = False, progress=None) -> list[str]:
    """Write ``n`` synthetic stroke cases in the ISLES'22 layout; returns the subject ids."""
    from deepisles.synth import write_dataset

    return write_dataset(Path(outdir), n, seed, overwrite=overwrite, progress=progress)
