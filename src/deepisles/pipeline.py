"""``segment`` as a pipeline of named steps, each a function with typed input and output:

    validate -> load_members -> prepare_case -> run_members -> combine_members -> measure -> make_report -> write

:func:`run_case` chains the first seven for one case and returns a :class:`SegmentationResult`; writing is
:func:`write_result` with a layout object (:class:`FolderLayout` for ``deepisles segment -o DIR``,
:class:`BidsLayout` for one case of ``deepisles batch``), so every front end (the CLI, the Python API, batch, a
service) runs the same steps and writes through the same writer. Where the files end up and how a result set is
published as one unit (locks, staging, renames) is the caller's business: :mod:`deepisles.io.outdir` for segment,
:mod:`deepisles.batch` for batch.

``Trace`` collects what the report says about the run (the steps' records, warnings, timing) as the steps go.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deepisles.engine.sliding_window import CPU_PRECISIONS, cpu_bf16_support, cpu_precision
from deepisles.errors import DeepIslesError
from deepisles.io.image import Image
from deepisles.io.load import LoadedInputs
from deepisles.io.read import DEFAULT_MAX_VOXELS
from deepisles.progress import Progress, Silent

OUTPUT_NAMES = ("lesion_mask.nii.gz", "lesion_prob.nii.gz", "lesion_agreement.nii.gz", "report.json", "lesions.csv",
                "preview.png", "report.html")
AGREEMENT_NAME = "lesion_agreement.nii.gz"
OUTPUT_TYPES = ("nifti", "dicom-seg")
SKULL_STRIP = ("auto", "none", "classical", "hdbet")
MEMBERS_DIR = "members"


# --- typed values passed between the steps ------------------------------------------------------------------
@dataclass(frozen=True)
class InputFiles:
    """One case's inputs: paths (a DICOM series folder is a path too) or in-memory ``Image`` objects."""

    dwi: object
    adc: object
    flair: object | None = None
    bval: object | None = None


@dataclass(frozen=True)
class RunOptions:
    """How a case is segmented (``device`` already resolved: ``cpu``, ``cuda`` or ``cuda:N``)."""

    members: str | list[str] | None = "auto"
    device: str = "cpu"
    fast: bool = False
    skull_strip: str = "auto"
    flair_registered: bool = False
    max_voxels: int = DEFAULT_MAX_VOXELS
    output_type: str = "nifti"
    precision: str = "fp32"  # CPU inference: fp32 (reference arithmetic) or bf16 (opt-in, CPUs with bf16 units)

    def check(self) -> None:
        """Option errors, before anything is read or loaded (``DeepIslesError``, exit code 2)."""
        from deepisles.members import check_member_spec

        if self.output_type not in OUTPUT_TYPES:
            raise DeepIslesError(f"--output-type {self.output_type}: expected one of {', '.join(OUTPUT_TYPES)}")
        if self.skull_strip not in SKULL_STRIP:
            raise DeepIslesError(f"--skull-strip {self.skull_strip}: expected one of {', '.join(SKULL_STRIP)}")
        check_member_spec(self.members)
        if self.precision not in CPU_PRECISIONS:
            raise DeepIslesError(f"--precision {self.precision}: expected one of {', '.join(CPU_PRECISIONS)}")

    def check_device(self) -> None:
        """Options that depend on the resolved device: ``--precision bf16`` needs a CPU with bfloat16 units."""
        if self.precision != "bf16":
            return
        if self.device != "cpu":
            raise DeepIslesError(f"--precision bf16 is for CPU inference; on {self.device} the members run float16 "
                                 "autocast already")  # fmt: skip
        if cpu_bf16_support() is None:
            raise DeepIslesError("--precision bf16: this CPU has no bfloat16 instructions (AMX-BF16 or AVX512-BF16); "
                                 "bfloat16 would be emulated and slower than the default fp32")  # fmt: skip


@dataclass
class Trace:
    """What the steps record for the report: ``steps`` (preprocessing records), ``warnings``, ``timing``."""

    steps: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timing[name] = time.perf_counter() - t


@dataclass
class MemberSet:
    """The loaded members to run, and the ones that cannot run (``{"member", "reason"}``)."""

    run: list
    skipped: list[dict]


@dataclass
class MemberRuns:
    """Each run member's result (``MemberResult``) and report record; every member that did not run, why."""

    results: list
    records: list[dict]
    skipped: list[dict]


@dataclass
class Ensemble:
    mask: Image  # uint8 0/1 on the native DWI grid
    probability: Image  # float32 mean of the member probabilities
    rule: str
    agreement: Image | None = None  # float32 share of the members' networks voting lesion (ensemble.agreement)
    networks: dict[str, int] = field(default_factory=dict)  # networks counted per member


@dataclass
class Measurements:
    """Lesion numbers of the ensemble mask: ``summary`` (volume, count, voxels), the per-lesion ``table`` (with
    location), and the biomarker sections (case-level ``lesions`` location, ``location``, ``mismatch``)."""

    summary: dict
    table: list[dict]
    lesion_location: dict | None
    location: dict | None
    mismatch: dict | None
    uncertainty: dict | None = None  # report.json's "uncertainty" (postprocess/uncertainty.py)
    classical_check: dict | None = None  # report.json's "classical_check" (postprocess/classical_check.py)


@dataclass
class SegmentationResult:
    """What a run returns: ensemble mask and probability on the native DWI grid, the report, the members' results
    and the images the members saw (for the writers)."""

    mask: Image
    probability: Image
    report: dict
    members: list = field(default_factory=list)
    outdir: Path | None = None
    brain: Image | None = None  # the brain mask the members saw, on the DWI grid
    dwi: Image | None = None
    adc: Image | None = None  # canonical unit, on the DWI grid
    flair: Image | None = None  # on the DWI grid (registered or passed through)
    measurements: Measurements | None = None
    agreement: Image | None = None  # float32 0-1 share of the networks voting lesion, on the DWI grid

    @property
    def volume_ml(self) -> float:
        return self.report["lesions"]["volume_ml"]

    @property
    def count(self) -> int:
        return self.report["lesions"]["count"]


# --- the steps ---------------------------------------------------------------------------------------------
def validate(files: InputFiles, opts: RunOptions, trace: Trace, progress: Progress) -> LoadedInputs:
    """Step 1: read and validate every input, ADC to the canonical unit on the DWI grid (``InputError``)."""
    from deepisles.io.load import read_inputs
    from deepisles.preprocess.inputs import harmonise_inputs

    progress.step("reading and validating inputs")
    with trace.timed("load"):
        loaded = harmonise_inputs(read_inputs(files.dwi, files.adc, files.flair, bval_path=files.bval,
                                              max_voxels=opts.max_voxels))  # fmt: skip
    if opts.output_type == "dicom-seg":
        from deepisles.outputs.dicom_seg import require_dicom_dwi

        require_dicom_dwi(loaded.dwi)  # before any work: DICOM SEG needs the DWI's source instances
    trace.warnings.extend(loaded.warnings)
    trace.steps.update(loaded.steps)
    return loaded


def load_members(opts: RunOptions, progress: Progress) -> MemberSet:
    """Step 2: the members ``opts.members`` asks for, loaded (cached across cases), and the ones that cannot run."""
    from deepisles.members import resolve_members

    progress.step("loading members")
    run, skipped = resolve_members(opts.members, opts.device, opts.fast)
    return MemberSet(run, skipped)


def prepare_case(loaded: LoadedInputs, opts: RunOptions, trace: Trace, progress: Progress):
    """Step 3: FLAIR onto the DWI grid, brain mask, skull strip -> the members' ``Case``."""
    from deepisles.preprocess.case import build_case

    case, steps, warnings, timing = build_case(loaded, opts.skull_strip, opts.device, progress.step,
                                               flair_registered=opts.flair_registered)  # fmt: skip
    trace.steps.update(steps)
    trace.warnings.extend(warnings)
    trace.timing.update(timing)
    return case


def run_members(members: MemberSet, case, trace: Trace, progress: Progress, precision: str = "fp32") -> MemberRuns:
    """Step 4: every member on the case; a member that turns out unavailable is skipped with its reason.
    ``precision``: CPU inference precision (:func:`deepisles.engine.sliding_window.cpu_precision`)."""
    with cpu_precision(precision):
        return _run_members(members, case, trace, progress)


def _run_members(members: MemberSet, case, trace: Trace, progress: Progress) -> MemberRuns:
    from deepisles.members import MemberUnavailable

    results, records, skipped = [], [], list(members.skipped)
    voxel_ml = case.dwi.voxel_volume_ml
    for member in members.run:
        progress.step(f"member {member.name}")
        t = time.perf_counter()
        try:
            res = member.run(case)
        except MemberUnavailable as exc:
            skipped.append({"member": exc.member, "reason": exc.reason})
            trace.warnings.append(f"member {exc.member} skipped: {exc.reason}")
            continue
        trace.timing[f"member_{member.name}"] = time.perf_counter() - t
        results.append(res)
        records.append({"name": res.name, **res.info,
                        "lesion_volume_ml": round(float(res.mask.sum()) * voxel_ml, 6)})  # fmt: skip
    if not results:
        reasons = "; ".join(f"{s['member']}: {s['reason']}" for s in skipped)
        raise DeepIslesError(f"no ensemble member could run ({reasons})")
    if any(getattr(m, "fallback", False) for m in members.run):
        trace.warnings.append(
            "no deep-learning weights installed (" + ", ".join(s["member"] for s in skipped) + "): ran the "
            "classical threshold member instead, which is not a validated model; see `deepisles weights --help`"
        )
    else:
        for s in skipped:
            if not any(w.startswith(f"member {s['member']} ") for w in trace.warnings):
                trace.warnings.append(f"member {s['member']} not run: {s['reason']}")
    return MemberRuns(results, records, skipped)


def combine_members(runs: MemberRuns, grid: Image) -> Ensemble:
    """Step 5: the DeepISLES majority vote (:mod:`deepisles.ensemble`) on the DWI grid."""
    from deepisles.ensemble import agreement, combine

    mask, prob, rule = combine(runs.results)
    agree, networks = agreement(runs.results)
    return Ensemble(grid.with_data(mask.astype(np.uint8)), grid.with_data(prob.astype(np.float32)), rule,
                    grid.with_data(agree), networks)  # fmt: skip


def measure(ensemble: Ensemble, loaded: LoadedInputs, case, trace: Trace, progress: Progress,
            runs: MemberRuns | None = None) -> Measurements:  # fmt: skip
    """Step 6: lesion count and volumes, per-lesion table, location (MNI/AAL3), DWI-FLAIR mismatch, network
    agreement, and (with ``runs``) the comparison with the classical threshold member."""
    from deepisles.postprocess.biomarkers import compute_biomarkers
    from deepisles.postprocess.lesions import lesion_summary, lesion_table

    summary = lesion_summary(ensemble.mask)
    table = lesion_table(ensemble.mask, loaded.adc, ensemble.agreement)
    progress.step("lesion location and biomarkers")
    with trace.timed("biomarkers"):
        rows, bio = compute_biomarkers(ensemble.mask, loaded.dwi, case.brain, case.flair)
    by_id = {r["id"]: r for r in rows}
    for row in table:
        row.update({k: v for k, v in by_id.get(row["id"], {}).items() if k != "id"})
    trace.warnings.extend(bio["warnings"])
    uncertainty = None
    if ensemble.agreement is not None:
        from deepisles.postprocess.uncertainty import uncertainty_summary

        uncertainty = uncertainty_summary(ensemble.agreement, ensemble.mask, ensemble.networks, table)
    check = _classical_check(ensemble, case, runs, trace) if runs is not None else None
    return Measurements(summary, table, bio["lesions"], bio["location"], bio["mismatch"], uncertainty, check)


def _classical_check(ensemble: Ensemble, case, runs: MemberRuns, trace: Trace) -> dict | None:
    """The ensemble against the classical member's mask (run here for the comparison when it was not a member);
    None when the classical member is the only member. A strong disagreement is a warning."""
    from deepisles.members.classical import ClassicalMember
    from deepisles.postprocess.classical_check import compare_with_classical, warning_text

    names = [r.name for r in runs.results]
    if names == ["classical"]:
        return None
    classical = next((r for r in runs.results if r.name == "classical"), None)
    if classical is None:
        with trace.timed("classical_check"):
            try:
                classical = ClassicalMember().run(case)
            except Exception as exc:  # the check is advice: it never fails a run, the report says why it is absent
                trace.warnings.append(f"comparison with the classical member not done: {exc}")
                return None
    check = compare_with_classical(ensemble.mask.data, classical.mask, case.dwi.voxel_volume_ml)
    if check["disagree"]:
        trace.warnings.append(warning_text(check))
    return check


def input_record(path: object, img: Image | None) -> dict | None:
    """report.json's record of one input: path, SHA-256 (header and detached data file), grid."""
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


def make_report(files: InputFiles, loaded: LoadedInputs, runs: MemberRuns, ensemble: Ensemble,
                measurements: Measurements, trace: Trace, opts: RunOptions, outputs: dict[str, str]) -> dict:  # fmt: skip
    """Step 7: report.json's content, from the typed results of the steps; ``outputs`` names the files a layout
    writes (:meth:`FolderLayout.report_outputs`, :meth:`BidsLayout.report_outputs`; empty when nothing is written)."""
    from deepisles.outputs.report import build_report

    inputs = {"dwi": input_record(files.dwi, loaded.dwi), "adc": input_record(files.adc, loaded.adc),
              "flair": input_record(files.flair, loaded.flair)}  # fmt: skip
    if files.bval is not None:
        inputs["bval"] = input_record(files.bval, None)
    return build_report(
        inputs={k: v for k, v in inputs.items() if v is not None},
        preprocessing=trace.steps,
        members_run=runs.records,
        members_skipped=runs.skipped,
        ensemble_rule=ensemble.rule,
        summary=measurements.summary,
        lesions=measurements.table,
        outputs=outputs,
        warnings=trace.warnings,
        timing_s=trace.timing,
        device=opts.device,
        precision=opts.precision,
        fast=opts.fast,
        lesion_location=measurements.lesion_location,
        location=measurements.location,
        mismatch=measurements.mismatch,
        uncertainty=measurements.uncertainty,
        classical_check=measurements.classical_check,
    )


def run_case(files: InputFiles, opts: RunOptions, *, layout=None, members: MemberSet | None = None,
             progress: Progress | None = None, trace: Trace | None = None,
             outdir: Path | None = None) -> SegmentationResult:  # fmt: skip
    """Steps 1-7 for one case. ``members``: already loaded (batch loads them once); ``layout``: what
    :func:`write_result` will write (it names the outputs in the report); ``trace``: may carry warnings from
    the caller (e.g. the output folder's). Nothing is written here."""
    progress = progress or Silent()
    trace = trace or Trace()
    t_all = time.perf_counter()
    loaded = validate(files, opts, trace, progress)
    members = members if members is not None else load_members(opts, progress)
    case = prepare_case(loaded, opts, trace, progress)
    runs = run_members(members, case, trace, progress, opts.precision)
    return finish_case(files, loaded, case, runs, opts, trace, progress, layout=layout, outdir=outdir,
                       elapsed=time.perf_counter() - t_all)  # fmt: skip


def finish_case(files: InputFiles, loaded: LoadedInputs, case, runs: MemberRuns, opts: RunOptions, trace: Trace,
                progress: Progress, *, layout=None, outdir: Path | None = None,
                elapsed: float = 0.0) -> SegmentationResult:  # fmt: skip
    """Steps 5-7 of :func:`run_case`, after the members: combine, measure, report. A pipelined batch runs steps
    1-3, step 4 and this in different processes (:mod:`deepisles.engines`); ``elapsed``: seconds the case took
    before this call (the report's ``timing_s.total`` adds this call's time)."""
    t_all = time.perf_counter() - elapsed
    ensemble = combine_members(runs, loaded.dwi)
    measurements = measure(ensemble, loaded, case, trace, progress, runs=runs)
    outputs = layout.report_outputs([r.name for r in runs.results]) if layout is not None else {}
    trace.timing["total"] = time.perf_counter() - t_all
    report = make_report(files, loaded, runs, ensemble, measurements, trace, opts, outputs)
    return SegmentationResult(
        ensemble.mask, ensemble.probability, report, runs.results, outdir,
        brain=loaded.dwi.with_data(case.brain.astype(np.uint8)), dwi=loaded.dwi, adc=loaded.adc, flair=case.flair,
        measurements=measurements, agreement=ensemble.agreement,
    )


# --- step 8: the writer and its layouts ------------------------------------------------------------------------
@dataclass(frozen=True)
class FolderLayout:
    """``deepisles segment -o DIR``: fixed file names in one folder; report.json is written last."""

    preview: bool = True
    html: bool = True
    save_members: bool = False
    dicom_seg: bool = False
    marker = "report.json"

    def report_outputs(self, members: list[str]) -> dict[str, str]:
        from deepisles.outputs.dicom_seg import SEG_FILENAME

        skip = ({"preview.png"} if not self.preview else set()) | ({"report.html"} if not self.html else set())
        out = {name: name for name in OUTPUT_NAMES if name not in skip}
        if self.dicom_seg:
            out["dicom_seg"] = SEG_FILENAME
        if self.save_members:
            out.update({f"member_{m}": f"{MEMBERS_DIR}/{m}_prob.nii.gz" for m in members})
        return out

    def write(self, result: SegmentationResult, folder: Path) -> None:
        from deepisles.io.write import write_json_atomic, write_text_atomic
        from deepisles.outputs.report import lesions_csv

        _write_images(result, folder, "lesion_mask.nii.gz", "lesion_prob.nii.gz")
        if result.agreement is not None:
            _write_nifti(folder / AGREEMENT_NAME, result.agreement, np.float32)
        if self.save_members:
            for r in result.members:
                img = result.mask.with_data(np.asarray(r.probability, dtype=np.float32))
                _write_nifti(folder / MEMBERS_DIR / f"{r.name}_prob.nii.gz", img, np.float32)
        if self.preview:
            from deepisles.outputs.preview import render_preview

            images = {"DWI": result.dwi, "ADC": result.adc, **({"FLAIR": result.flair} if result.flair else {})}
            title = f"deepisles: lesion {result.volume_ml:.2f} mL in {result.count} component(s)"
            render_preview(folder / "preview.png", images, result.mask, title=title, brain=result.brain)
        write_text_atomic(folder / "lesions.csv", lesions_csv(result.measurements.table))
        if self.dicom_seg:
            from deepisles.outputs.dicom_seg import write_result_seg

            write_result_seg(result.mask, result.dwi, folder, members=[r.name for r in result.members])
        if self.html:
            from deepisles.outputs.html_report import write_html_report

            write_html_report(folder, result.report, dwi=result.dwi, adc=result.adc, mask=result.mask,
                              flair=result.flair, preview_png=folder / "preview.png" if self.preview else None,
                              agreement=result.agreement, overwrite=True)  # fmt: skip
        write_json_atomic(folder / self.marker, result.report)


@dataclass(frozen=True)
class BidsLayout:
    """One case of ``deepisles batch``: BIDS-derivative names in ``sub-X[/ses-Y]/dwi``; the mask sidecar, written
    last, records the SHA-256 of the case's other files and so marks the case complete (docs/batch.md)."""

    names: object  # deepisles.outputs.bids.CaseNames
    sources: tuple[str, ...] = ()

    @property
    def marker(self) -> str:
        return self.names.mask_json

    def report_outputs(self, members: list[str]) -> dict[str, str]:
        n = self.names
        return {"mask": n.mask, "mask_sidecar": n.mask_json, "probseg": n.probseg, "probseg_sidecar": n.probseg_json,
                "agreement": n.agreement, "report": n.report}  # fmt: skip

    def write(self, result: SegmentationResult, folder: Path) -> None:
        from deepisles.io.hashing import sha256_file
        from deepisles.io.write import write_json_atomic
        from deepisles.outputs.bids import mask_sidecar, probseg_sidecar

        n, sources = self.names, list(self.sources)
        _write_images(result, folder, n.mask, n.probseg)
        _write_nifti(folder / n.agreement, result.agreement, np.float32)
        write_json_atomic(folder / n.probseg_json, probseg_sidecar(result.report, sources))
        write_json_atomic(folder / n.report, result.report)
        sums = {name: sha256_file(folder / name) for name in (n.mask, n.probseg, n.agreement, n.probseg_json, n.report)}
        write_json_atomic(folder / n.mask_json, mask_sidecar(result.report, sources, sums))


def write_result(result: SegmentationResult, folder: Path, layout) -> None:
    """Step 8: write ``result`` into ``folder`` as ``layout`` says, each file atomically, the layout's completion
    marker last. ``folder`` is a private staging folder; publishing it is the caller's step."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    layout.write(result, Path(folder))


def _write_nifti(path: Path, img: Image, dtype) -> None:
    from deepisles.io.write import write_nifti_atomic

    write_nifti_atomic(path, img.to_nifti(dtype))


def _write_images(result: SegmentationResult, folder: Path, mask_name: str, prob_name: str) -> None:
    _write_nifti(folder / mask_name, result.mask, np.uint8)
    _write_nifti(folder / prob_name, result.probability, np.float32)
