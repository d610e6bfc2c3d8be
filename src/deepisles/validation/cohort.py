"""``deepisles cohort``: lesion biomarkers of a finished ``deepisles batch`` against clinical scores.

Inputs: the batch output root (``cohort.tsv`` + ``sub-X[/ses-Y]/dwi/*`` from :mod:`deepisles.batch`), a
``participants.tsv`` with NIHSS (admission) and/or mRS (90 days) columns, optionally the dataset with the expert
(reference) masks. For every score: Spearman's rho of lesion volume, lesion count and the per-lobe volumes with
a seeded percentile-bootstrap 95 % CI; with reference masks the same for the expert volume and count, and a
paired bootstrap of the difference between the two dependent correlations. Also: scatter plots, the lesion
frequency map in MNI space (:mod:`deepisles.validation.cohort_mni`), a self-contained HTML page
(:mod:`deepisles.validation.cohort_report`), CSV/JSON statistics and the exclusions table (subject, what, reason).
Definitions and choices: docs/validation.md, "Cohort statistics".
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import stats

from deepisles import __version__
from deepisles.errors import DeepIslesError, InputError
from deepisles.io.dataset import CaseKey, case_id, find_masks
from deepisles.io.write import check_output_dir, write_json_atomic, write_nifti_atomic, write_text_atomic
from deepisles.outputs.bids import CaseNames
from deepisles.postprocess.atlas import LOBES
from deepisles.progress import Progress, as_progress
from deepisles.validation.attributes import read_participants
from deepisles.validation.cohort_mni import OUTSIDE, frequency_map, lobe_volumes, map_grid, warp_to_mni

#: clinical scores: key -> (label, valid range, column-name pattern used when no column is named)
SCORES = {
    "nihss": ("NIHSS at admission", (0.0, 42.0), re.compile(r"nihss", re.IGNORECASE)),
    "mrs": ("mRS at 90 days", (0.0, 6.0), re.compile(r"(?<![a-z])mrs(?![a-z])", re.IGNORECASE)),
}
MISSING = {"", "n/a", "na", "nan", "none", "null", "."}
MIN_N = 5  # fewer subjects: no correlation
LEVEL = 0.95
COHORT_TSV = "cohort.tsv"

FILES = {
    "statistics_csv": "cohort_statistics.csv",
    "statistics_json": "cohort_statistics.json",
    "subjects_csv": "cohort_subjects.csv",
    "exclusions_csv": "cohort_exclusions.csv",
    "frequency_nifti": "lesion_frequency_mni.nii.gz",
    "frequency_png": "lesion_frequency_mni.png",
    "html": "cohort_report.html",
}


# --- subjects ------------------------------------------------------------------------------------------------
@dataclass
class Subject:
    """One matched case: its biomarkers (None when unavailable) and clinical scores."""

    participant_id: str
    session_id: str | None
    volume_ml: float | None = None
    count: float | None = None
    lobe_ml: dict[str, float] | None = None
    expert_volume_ml: float | None = None
    expert_count: float | None = None
    scores: dict[str, float | None] = field(default_factory=dict)
    in_map: bool = False

    @property
    def case_id(self) -> str:
        return case_id((self.participant_id, self.session_id))


@dataclass
class Exclusions:
    rows: list[dict] = field(default_factory=list)

    def add(self, pid: str, ses: str | None, what: str, reason: str) -> None:
        self.rows.append({"participant_id": pid, "session_id": ses or "", "excluded_from": what, "reason": reason})


def _norm_id(pid: str) -> str:
    pid = pid.strip()
    return pid if pid.startswith("sub-") else f"sub-{pid}"


def _na(cell: str | None) -> str | None:
    return None if cell is None or cell.strip() in ("", "n/a") else cell.strip()


def read_batch_cohort(root: Path) -> list[dict]:
    """The rows of ``ROOT/cohort.tsv`` (what ``deepisles batch`` writes); InputError when it is not there."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "no such folder (expected the output root of `deepisles batch`)")
    path = root / COHORT_TSV
    if not path.is_file():
        raise InputError(root, f"no {COHORT_TSV}: not a finished `deepisles batch` output (running `deepisles batch` "
                               "again with the same output root rebuilds it)")  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")), delimiter="\t"))
    need = {"participant_id", "session_id", "status"}
    if not rows or not need <= set(rows[0]):
        raise InputError(path, f"expected a deepisles batch cohort table with columns {', '.join(sorted(need))}")
    return rows


def resolve_score_columns(columns: list[str], given: dict[str, str | None], path: Path) -> dict[str, str]:
    """score key -> participants.tsv column: the named one (DeepIslesError naming the columns when absent), else
    the one column whose name matches the score's pattern (``nihss``, ``mrs``); at least one score is needed."""
    out: dict[str, str] = {}
    listed = ", ".join(columns) or "(none besides participant_id)"
    for key, (label, _, pattern) in SCORES.items():
        name = given.get(key)
        if name is not None:
            if name in columns:
                out[key] = name
                continue
            folded = [c for c in columns if c.lower() == name.lower()]
            if len(folded) != 1:
                raise DeepIslesError(f"--{key} {name}: no such column in {path}; its columns: {listed}")
            out[key] = folded[0]
            continue
        found = [c for c in columns if pattern.search(c)]
        if len(found) > 1:
            raise DeepIslesError(f"{path}: several columns look like {label} ({', '.join(found)}); choose one with "
                                 f"--{key}")  # fmt: skip
        if found:
            out[key] = found[0]
    if not out:
        raise DeepIslesError(f"{path}: no NIHSS or mRS column found; name them with --nihss/--mrs; its columns: "
                             f"{listed}")  # fmt: skip
    return out


def parse_score(cell: str | None, key: str) -> tuple[float | None, str | None]:
    """(value, None) or (None, why it cannot be used)."""
    text = "" if cell is None else cell.strip()
    if text.lower() in MISSING:
        return None, "missing value"
    try:
        value = float(text)
    except ValueError:
        return None, f"non-numeric value {text!r}"
    if not math.isfinite(value):
        return None, f"non-numeric value {text!r}"
    lo, hi = SCORES[key][1]
    if not lo <= value <= hi:
        return None, f"value {text} outside {lo:g}-{hi:g}"
    return value, None


def _load_mask(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # any reader failure is a problem with that file
        raise InputError(path, f"cannot read as a NIfTI mask ({type(exc).__name__})") from exc
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(path, f"expected a 3D mask, got shape {data.shape}")
    return data != 0, np.asarray(img.affine, np.float64)


def _registration(report: dict) -> tuple[np.ndarray | None, str | None]:
    """(case -> MNI matrix, None), (None, None) when skipped for an empty mask, or (None, why it is unusable)."""
    reg = (report.get("location") or {}).get("registration")
    if not isinstance(reg, dict):
        return None, "the report has no MNI registration"
    if "skipped" in reg:
        return None, None
    if reg.get("error"):
        return None, f"no usable MNI registration: {reg['error']}"
    matrix = reg.get("matrix_ras_to_mni")
    if matrix is None:
        return None, "the report has no MNI registration matrix"
    if not reg.get("ok", False):
        quality = f"brain Dice {reg.get('brain_dice')}, scales {reg.get('scales')}"
        return None, f"no usable MNI registration: flagged poor ({quality})"
    return np.asarray(matrix, np.float64), None


def _components(mask: np.ndarray) -> int:
    import cc3d

    return int(cc3d.connected_components(mask.astype(np.uint8), connectivity=26, return_N=True)[1])


def collect(
    batch_root: Path,
    participants: Path,
    columns: dict[str, str | None],
    reference: Path | None,
    excl: Exclusions,
    progress: Progress,
) -> tuple[list[Subject], dict[str, str], list[np.ndarray], dict]:
    """Match batch cases to participants, read their biomarkers and scores; every subject left out gets an
    exclusion row. Returns (subjects, score columns, warped masks of the frequency map, notes)."""
    batch_root = Path(batch_root)
    rows = read_batch_cohort(batch_root)
    p_columns, p_rows = read_participants(Path(participants))
    score_cols = resolve_score_columns(p_columns, columns, Path(participants))
    by_session = "session_id" in p_columns
    clinical: dict[CaseKey, dict[str, str]] = {}
    for pid, row in p_rows.items():
        key = (_norm_id(pid), _na(row.get("session_id")) if by_session else None)
        if key in clinical:
            raise InputError(participants, f"{case_id(key)} is listed twice")
        clinical[key] = row

    cases: dict[CaseKey, dict] = {}
    for r in rows:
        cases[(r["participant_id"], _na(r["session_id"]))] = r
    subjects_sessions: dict[str, list[CaseKey]] = {}
    for key in cases:
        subjects_sessions.setdefault(key[0], []).append(key)

    def clinical_key(key: CaseKey) -> CaseKey:
        return key if by_session else (key[0], None)

    matched = [k for k in sorted(cases, key=case_id) if clinical_key(k) in clinical]
    if not matched:
        ours = ", ".join(case_id(k) for k in sorted(cases, key=case_id)[:5]) or "none"
        theirs = ", ".join(case_id(k) for k in sorted(clinical, key=case_id)[:5]) or "none"
        how = "subject and session_id" if by_session else "participant_id"
        raise DeepIslesError(f"no subject of {participants} is in the batch output {batch_root} (matched by {how}; "
                             f"batch: {ours}{', ...' if len(cases) > 5 else ''}; participants.tsv: {theirs}"
                             f"{', ...' if len(clinical) > 5 else ''})")  # fmt: skip
    used_clinical = {clinical_key(k) for k in matched}
    for key in sorted(set(clinical) - used_clinical, key=case_id):
        excl.add(key[0], key[1], "all", "not in the batch output")
    for key in sorted(set(cases) - set(matched), key=case_id):
        excl.add(key[0], key[1], "all", "not in participants.tsv")

    ref_masks: dict[CaseKey, list[Path]] = {}
    if reference is not None:
        reference = Path(reference)
        if not reference.is_dir():
            raise InputError(reference, "no such folder (expected the dataset with the reference masks)")
        ref_masks = find_masks(reference / "derivatives")
        for key, paths in find_masks(reference).items():
            ref_masks.setdefault(key, paths)
        if not ref_masks:
            raise InputError(reference, "holds no reference masks sub-*[_ses-*]_msk.nii[.gz]")

    from deepisles.batch import finished_sidecar

    subjects: list[Subject] = []
    warped: list[np.ndarray] = []
    notes = {"no_lesion": 0, "matched": len(matched), "by_session": by_session}
    for i, key in enumerate(matched, start=1):
        progress.advance(i - 1, len(matched), case_id(key))
        pid, ses = key
        row = cases[key]
        if not by_session and len(subjects_sessions[pid]) > 1:
            excl.add(pid, ses, "all", f"{pid} has {len(subjects_sessions[pid])} sessions in the batch output and "
                                      "participants.tsv has no session_id column")  # fmt: skip
            continue
        status = row["status"]
        if status == "failed":
            excl.add(pid, ses, "all", f"segmentation failed: {_na(row.get('error')) or 'see failures.jsonl'}")
            continue
        if status != "ok":
            excl.add(pid, ses, "all", f"no segmentation (batch status {status})")
            continue
        names = CaseNames(pid, ses)
        if finished_sidecar(batch_root, names) is None:
            excl.add(pid, ses, "all", "segmentation files missing or changed since the batch run")
            continue
        folder = batch_root / names.folder
        report = json.loads((folder / names.report).read_text(encoding="utf-8"))
        mask, affine = _load_mask(folder / names.mask)
        lz = report.get("lesions") or {}
        subject = Subject(pid, ses, volume_ml=float(lz["volume_ml"]), count=float(lz["count"]))
        row_clinical = clinical[clinical_key(key)]
        for skey, col in score_cols.items():
            value, why = parse_score(row_clinical.get(col), skey)
            subject.scores[skey] = value
            if why:
                excl.add(pid, ses, skey, f"{col}: {why}")
        if not mask.any():
            notes["no_lesion"] += 1
        matrix, why = _registration(report)
        if why is not None and mask.any():
            excl.add(pid, ses, "lobe volumes, frequency map", why)
        else:
            subject.lobe_ml = lobe_volumes(mask, affine, matrix)
            if matrix is not None:
                warped.append(warp_to_mni(mask, affine, matrix))
            else:  # empty mask: nothing to warp, an all-zero map
                shape, _ = map_grid()
                warped.append(np.zeros(shape, bool))
            subject.in_map = True
        if reference is not None:
            paths = ref_masks.get(key, [])
            if not paths:
                excl.add(pid, ses, "expert volume", f"no reference mask {case_id(key)}_msk.nii[.gz] under {reference}")
            elif len(paths) > 1:
                excl.add(pid, ses, "expert volume", "several reference masks: " + ", ".join(str(p) for p in paths))
            else:
                try:
                    ref, ref_affine = _load_mask(paths[0])
                except InputError as exc:
                    excl.add(pid, ses, "expert volume", str(exc))
                else:
                    voxel_ml = abs(float(np.linalg.det(ref_affine[:3, :3]))) / 1000.0
                    subject.expert_volume_ml = float(ref.sum()) * voxel_ml
                    subject.expert_count = float(_components(ref))
        subjects.append(subject)
    progress.advance(len(matched), len(matched))
    return subjects, score_cols, warped, notes


# --- statistics ----------------------------------------------------------------------------------------------
def _rank_rows(a: np.ndarray) -> np.ndarray:
    return stats.rankdata(a, axis=1)


def _row_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row pair; NaN where a row is constant."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=1) / den
    return np.where(den > 0, r, np.nan)


def _resample_idx(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_spearman(x: np.ndarray, y: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Spearman's rho of ``n_boot`` paired resamples of the subjects (NaN for a resample where x or y is
    constant): Spearman = Pearson of the mid-ranks, ranked within each resample."""
    idx = _resample_idx(len(x), n_boot, seed)
    return _row_corr(_rank_rows(np.asarray(x, float)[idx]), _rank_rows(np.asarray(y, float)[idx]))


def _percentile_ci(dist: np.ndarray) -> tuple[float | None, float | None, int]:
    ok = dist[np.isfinite(dist)]
    if len(ok) == 0:
        return None, None, 0
    a = (1 - LEVEL) / 2
    lo, hi = np.quantile(ok, [a, 1 - a])
    return float(lo), float(hi), int(len(ok))


def spearman_with_ci(x, y, n_boot: int, seed: int) -> dict:
    """n, rho and p (scipy.stats.spearmanr), percentile-bootstrap CI; rho None with ``note`` when n < MIN_N or a
    variable is constant."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    out: dict = {"n": int(len(x)), "rho": None, "p": None, "ci_low": None, "ci_high": None, "boot_valid": 0,
                 "note": ""}  # fmt: skip
    if len(x) < MIN_N:
        return {**out, "note": f"fewer than {MIN_N} subjects"}
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return {**out, "note": "constant " + ("biomarker" if np.ptp(x) == 0 else "score")}
    res = stats.spearmanr(x, y)
    lo, hi, valid = _percentile_ci(bootstrap_spearman(x, y, n_boot, seed))
    note = "" if valid == n_boot else f"{n_boot - valid} resamples with a constant variable left out"
    return {**out, "rho": float(res.statistic), "p": float(res.pvalue), "ci_low": lo, "ci_high": hi,
            "boot_valid": valid, "note": note}  # fmt: skip


def dependent_difference(pred, expert, y, n_boot: int, seed: int) -> dict:
    """rho(pred, y) - rho(expert, y) on the same subjects (two dependent correlations sharing y): the
    observed difference, a paired percentile-bootstrap CI (subjects resampled, both rhos on each resample) and a
    two-sided bootstrap p-value, 2 x the smaller share of resampled differences on either side of 0."""
    pred, expert, y = (np.asarray(v, float) for v in (pred, expert, y))
    out: dict = {"n": int(len(y)), "rho_pred": None, "rho_expert": None, "diff": None, "ci_low": None,
                 "ci_high": None, "p_boot": None, "boot_valid": 0, "note": ""}  # fmt: skip
    if len(y) < MIN_N:
        return {**out, "note": f"fewer than {MIN_N} subjects"}
    if min(np.ptp(pred), np.ptp(expert), np.ptp(y)) == 0:
        return {**out, "note": "a constant variable"}
    r1 = float(stats.spearmanr(pred, y).statistic)
    r2 = float(stats.spearmanr(expert, y).statistic)
    idx = _resample_idx(len(y), n_boot, seed)
    ry = _rank_rows(y[idx])
    d = _row_corr(_rank_rows(pred[idx]), ry) - _row_corr(_rank_rows(expert[idx]), ry)
    lo, hi, valid = _percentile_ci(d)
    ok = d[np.isfinite(d)]
    p = min(1.0, 2.0 * min(float(np.mean(ok <= 0)), float(np.mean(ok >= 0)))) if valid else None
    return {**out, "rho_pred": r1, "rho_expert": r2, "diff": r1 - r2, "ci_low": lo, "ci_high": hi, "p_boot": p,
            "boot_valid": valid}  # fmt: skip


def biomarkers(subjects: list[Subject]) -> list[tuple[str, str, callable]]:
    """(source, biomarker, getter) of every analysed biomarker."""
    out = [("predicted", "volume_ml", lambda s: s.volume_ml), ("predicted", "count", lambda s: s.count)]
    for lobe in LOBES:
        out.append(("predicted", f"{lobe}_ml", lambda s, lobe=lobe: None if s.lobe_ml is None else s.lobe_ml[lobe]))
    if any(s.expert_volume_ml is not None for s in subjects):
        out += [("expert", "volume_ml", lambda s: s.expert_volume_ml), ("expert", "count", lambda s: s.expert_count)]
    return out


def analyse(subjects: list[Subject], score_cols: dict[str, str], n_boot: int, seed: int) -> tuple[list, list]:
    """(correlation rows, difference rows) for every score and biomarker."""
    rows, diffs = [], []
    for skey in score_cols:
        for source, name, get in biomarkers(subjects):
            pairs = [(get(s), s.scores[skey]) for s in subjects if get(s) is not None and s.scores[skey] is not None]
            x, y = (np.array([p[i] for p in pairs], float) for i in (0, 1)) if pairs else (np.array([]),) * 2
            rows.append({"score": skey, "source": source, "biomarker": name,
                         **spearman_with_ci(x, y, n_boot, seed)})  # fmt: skip
        if any(s.expert_volume_ml is not None for s in subjects):
            for name, gp, ge in (("volume_ml", "volume_ml", "expert_volume_ml"), ("count", "count", "expert_count")):
                both = [s for s in subjects
                        if s.scores[skey] is not None and getattr(s, ge) is not None and getattr(s, gp) is not None]
                cols = [np.array([getattr(s, a) for s in both], float) for a in (gp, ge)]
                y = np.array([s.scores[skey] for s in both], float)
                diffs.append({"score": skey, "biomarker": name, **dependent_difference(*cols, y, n_boot, seed)})
    return rows, diffs


# --- outputs -------------------------------------------------------------------------------------------------
def _csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]))
                    for k in columns})  # fmt: skip
    return buf.getvalue()


STAT_COLUMNS = ["score", "source", "biomarker", "n", "rho", "ci_low", "ci_high", "p", "boot_valid", "note"]
DIFF_COLUMNS = ["score", "biomarker", "n", "rho_pred", "rho_expert", "diff", "ci_low", "ci_high", "p_boot",
                "boot_valid", "note"]  # fmt: skip
EXCL_COLUMNS = ["participant_id", "session_id", "excluded_from", "reason"]


def subject_rows(subjects: list[Subject], score_cols: dict[str, str]) -> tuple[list[dict], list[str]]:
    cols = ["participant_id", "session_id", "volume_ml", "count", *(f"{lobe}_ml" for lobe in (*LOBES, OUTSIDE)),
            "expert_volume_ml", "expert_count", *score_cols, "in_frequency_map"]  # fmt: skip
    rows = []
    for s in subjects:
        r = {"participant_id": s.participant_id, "session_id": s.session_id or "", "volume_ml": s.volume_ml,
             "count": s.count, "expert_volume_ml": s.expert_volume_ml, "expert_count": s.expert_count,
             "in_frequency_map": "yes" if s.in_map else "no", **s.scores}  # fmt: skip
        for lobe in (*LOBES, OUTSIDE):
            r[f"{lobe}_ml"] = None if s.lobe_ml is None else s.lobe_ml[lobe]
        rows.append(r)
    return rows, cols


@dataclass
class CohortResult:
    outdir: Path
    statistics: list[dict]
    differences: list[dict]
    exclusions: list[dict]
    subjects: list[Subject]
    score_columns: dict[str, str]
    map_n: int
    files: dict[str, Path]
    notes: dict


def run_cohort(
    batch_root: str | Path,
    participants: str | Path,
    outdir: str | Path,
    *,
    nihss: str | None = None,
    mrs: str | None = None,
    reference: str | Path | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    overwrite: bool = False,
    progress=None,
) -> CohortResult:
    """The whole ``deepisles cohort`` command: statistics, pictures, HTML, CSV/JSON into ``outdir``."""
    from deepisles.validation import cohort_report

    if n_boot < 100:
        raise DeepIslesError(f"--bootstrap {n_boot}: use at least 100 resamples")
    outdir = Path(outdir)
    participants = Path(participants)
    if not participants.is_file():
        raise InputError(participants, "no such file (expected a participants.tsv with clinical columns)")
    check_output_dir(outdir, [*FILES.values(), *(f"scatter_{k}.png" for k in SCORES)], overwrite)
    prog = as_progress(progress)
    excl = Exclusions()
    prog.step("reading the batch output")
    subjects, score_cols, warped, notes = collect(Path(batch_root), participants, {"nihss": nihss, "mrs": mrs},
                                                  Path(reference) if reference else None, excl, prog)  # fmt: skip
    prog.step("statistics")
    rows, diffs = analyse(subjects, score_cols, n_boot, seed)
    freq = frequency_map(warped)
    _, grid = map_grid()

    files = {k: outdir / v for k, v in FILES.items()}
    outdir.mkdir(parents=True, exist_ok=True)
    prog.step("writing")
    img = nib.Nifti1Image(freq, grid)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = b"deepisles lesion frequency (share of subjects), MNI152 2009a"
    write_nifti_atomic(files["frequency_nifti"], img)
    s_rows, s_cols = subject_rows(subjects, score_cols)
    write_text_atomic(files["statistics_csv"], _csv(rows, STAT_COLUMNS))
    write_text_atomic(files["subjects_csv"], _csv(s_rows, s_cols))
    write_text_atomic(files["exclusions_csv"], _csv(excl.rows, EXCL_COLUMNS))
    settings = {"bootstrap": n_boot, "seed": seed, "level": LEVEL, "min_n": MIN_N,
                "ci": "percentile bootstrap (subjects resampled with replacement)",
                "difference_test": "paired percentile bootstrap of rho_pred - rho_expert",
                "frequency_map": "nearest-neighbour warp through each report's case->MNI affine onto the 2 mm MNI152 "
                                 "2009a grid; voxel-wise mean"}  # fmt: skip
    summary = {
        "tool": {"name": "deepisles cohort", "version": __version__},
        "inputs": {"batch_output": str(batch_root), "participants": str(participants),
                   "reference": str(reference) if reference else None},  # fmt: skip
        "score_columns": {k: {"column": c, "label": SCORES[k][0], "range": SCORES[k][1]}
                          for k, c in score_cols.items()},  # fmt: skip
        "settings": settings,
        "subjects": {"analysed": len(subjects), "no_lesion": notes["no_lesion"], "in_frequency_map": len(warped)},
        "correlations": rows,
        "differences": diffs,
        "exclusions": excl.rows,
        "files": {k: v.name for k, v in files.items()},
    }
    write_json_atomic(files["statistics_json"], summary)
    result = CohortResult(outdir, rows, diffs, excl.rows, subjects, score_cols, len(warped), files, notes)
    cohort_report.write_figures_and_html(result, freq, summary)
    return result
