"""Python API mirroring the CLI: segment(), evaluate(), synth()."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deepisles.errors import DeepIslesError
from deepisles.io.image import Image
from deepisles.outputs.dicom_seg import SEG_FILENAME as SEG_NAME  # --output-type dicom-seg

OUTPUT_NAMES = ("lesion_mask.nii.gz", "lesion_prob.nii.gz", "report.json", "lesions.csv", "preview.png", "report.html")
OUTPUT_TYPES = ("nifti", "dicom-seg")
MEMBERS_DIR = "members"

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


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'cpu', 'cuda' and 'cuda:N' are checked."""
    device = (device or "auto").strip().lower()
    if device == "cpu":
        return "cpu"
    if device == "auto" or device.startswith("cuda"):
        try:
            import torch

            has_cuda = torch.cuda.is_available()
        except ImportError:  # pragma: no cover - torch is a dependency
            has_cuda = False
        if device == "auto":
            return "cuda" if has_cuda else "cpu"
        if not has_cuda:
            raise DeepIslesError(f"--device {device}: no CUDA GPU is available (use --device cpu or auto)")
        return device
    raise DeepIslesError(f"--device {device}: expected auto, cpu, cuda or cuda:N")


def _input_record(path: object, img: Image | None) -> dict | None:
    from deepisles.outputs.report import file_sha256

    if path is None:
        return None
    rec: dict = {}
    if isinstance(path, (str, Path)):
        rec["path"] = str(Path(path).resolve())
        rec["sha256"] = file_sha256(Path(path))
    else:
        rec["path"] = getattr(path, "source", "") or "<in memory>"
    if img is not None:
        rec["shape"] = list(img.shape)
        rec["spacing_mm"] = [round(s, 4) for s in img.spacing]
    return rec


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
    progress: Progress | None = None,
) -> SegmentationResult:
    """Segment the acute ischemic lesion of one case.

    Reads and validates the inputs (any problem raises ``InputError`` before anything is written), brings
    ADC to the canonical unit and onto the DWI grid, registers FLAIR to DWI, builds the brain mask, runs the
    ensemble members and combines them by majority vote. With ``outdir`` it writes ``lesion_mask.nii.gz``,
    ``lesion_prob.nii.gz``, ``report.json`` and ``preview.png`` there (atomically; refuses an ``outdir`` that
    already holds results unless ``overwrite``). Returns the mask and probability on the native DWI grid
    and the report.

    ``members``: "auto" (every member with installed weights; the classical member when there are none) or a
    comma-separated list. ``fast``: each member's documented faster mode (see docs/deviations.md).
    ``save_members``: also write ``members/<name>_prob.nii.gz``. ``device``: auto, cpu, cuda or cuda:N.
    """
    from deepisles.ensemble import combine
    from deepisles.io.load import load_inputs
    from deepisles.io.write import check_output_dir
    from deepisles.members import MemberUnavailable, resolve_members
    from deepisles.postprocess.biomarkers import compute_biomarkers
    from deepisles.postprocess.lesions import lesion_summary, lesion_table
    from deepisles.preprocess.case import build_case

    say = progress or (lambda _msg: None)
    timing: dict[str, float] = {}
    t_all = time.perf_counter()
    if outdir is not None:
        check_output_dir(Path(outdir), OUTPUT_NAMES + (MEMBERS_DIR, SEG_NAME), overwrite)
    if output_type not in OUTPUT_TYPES:
        raise DeepIslesError(f"--output-type {output_type}: expected one of {', '.join(OUTPUT_TYPES)}")
    device_used = resolve_device(device)
    say("loading members")
    run_members, skipped = resolve_members(members, device_used, fast)

    say("reading and validating inputs")
    t = time.perf_counter()
    loaded = load_inputs(dwi, adc, flair, bval_path=bval)
    timing["load"] = time.perf_counter() - t
    if output_type == "dicom-seg":
        from deepisles.outputs.dicom_seg import require_dicom_dwi

        require_dicom_dwi(loaded.dwi)  # before any work: DICOM SEG needs the DWI's source instances
    warnings = list(loaded.warnings)
    steps = dict(loaded.steps)

    case, case_steps, case_warnings, case_timing = build_case(loaded, skull_strip, device_used, say)
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
        mask_img, prob_img, report, results, Path(outdir) if outdir else None,
        brain=loaded.dwi.with_data(case.brain.astype(np.uint8)),
    )
    if outdir is not None:
        say("writing outputs")
        write_outputs(result, Path(outdir), loaded.dwi, loaded.adc, case.flair, preview=preview,
                      save_members=save_members, html=html, dicom_seg=output_type == "dicom-seg")
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
