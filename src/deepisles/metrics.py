"""Official ISLES'22 evaluation metrics, pairing of prediction / ground-truth files, CSV and summary.

The four per-case metrics follow the definitions of the ISLES'22 challenge evaluation
(github.com/ezequieldlrosa/isles22, ``utils/eval_utils.py``; the grand-challenge container
github.com/ezequieldlrosa/isles22_docker_evaluation uses the same definitions):

* every mask is binarised as "value != 0" (float masks too: 0.3, -1, 2.0 and NaN all count as lesion);
* Dice = 2|G∩P| / (|G| + |P|), and 1.0 when both masks are empty (0.0 when exactly one is empty);
* absolute volume difference in mL = | |G|·v − |P|·v |, with the voxel volume ``v`` taken from the header
  voxel size (product of the NIfTI zooms, or of the MetaImage spacing) / 1000, as the official notebook does;
* absolute lesion count difference = |N(G) − N(P)|, lesions being 26-connected components;
* lesion-wise F1 = TP / (TP + (FP + FN)/2), where a ground-truth component overlapping the prediction by
  at least one voxel is a TP (else a FN) and a predicted component with no voxel on the ground truth is a FP;
  1.0 when both masks are empty (so an empty ground truth with a non-empty prediction scores 0.0).

How tests/fixtures/metrics was produced with the official code: scripts/make_metrics_fixtures.md.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cc3d
import numpy as np

from deepisles.errors import InputError
from deepisles.io.dataset import CaseKey, case_id, find_masks
from deepisles.io.write import write_text_atomic
from deepisles.progress import Progress, as_progress

COLUMNS = ("case", "dice", "abs_volume_diff_ml", "abs_lesion_count_diff", "lesion_f1")
METRICS = COLUMNS[1:]
#: extra per-case keys with ``volumes=True``: reference / predicted volume (mL) and lesion count (26-connected)
VOLUME_COLUMNS = ("ref_volume_ml", "pred_volume_ml", "ref_lesion_count", "pred_lesion_count")
CONNECTIVITY = 26

#: file endings read as masks (NIfTI through nibabel, MetaImage / NRRD through SimpleITK)
MASK_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
_NIFTI_SUFFIXES = (".nii.gz", ".nii")

# BIDS entity labels are alphanumeric: "sub-strokecase0001" never matches inside "sub-strokecase00010"
_SUB_RE = re.compile(r"(?<![A-Za-z0-9])(sub-[A-Za-z0-9]+)(?![A-Za-z0-9])")
_SES_RE = re.compile(r"(?<![A-Za-z0-9])(ses-[A-Za-z0-9]+)(?![A-Za-z0-9])")
_MASKY_RE = re.compile(r"msk|mask|seg|label|lesion|pred", re.IGNORECASE)
_NOT_A_MASK_RE = re.compile(r"prob|agreement", re.IGNORECASE)


# ------------------------------------------------------------------------------------------------- metrics
def _binary(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    b = a if a.dtype == np.bool_ else a != 0  # NaN != 0 is True, as astype(bool) in the official code
    while b.ndim < 3:
        b = b[..., np.newaxis]
    while b.ndim > 3 and b.shape[-1] == 1:
        b = b[..., 0]
    if b.ndim != 3:
        raise ValueError(f"expected a 3D mask, got shape {a.shape}")
    return b


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    labels, n = cc3d.connected_components(mask.view(np.uint8), connectivity=CONNECTIVITY, return_N=True)
    return labels, int(n)


def case_metrics(pred: np.ndarray, gt: np.ndarray, voxel_volume_ml: float, volumes: bool = False) -> dict:
    """The four ISLES'22 metrics of one case (keys ``COLUMNS[1:]``); ``pred`` and ``gt`` share one grid.

    ``volumes``: also the keys of :data:`VOLUME_COLUMNS` (reference and predicted volume in mL and lesion count),
    what the stratified evaluation (:mod:`deepisles.validation.strata`) bins and compares.
    """
    p = _binary(pred)
    g = _binary(gt)
    if p.shape != g.shape:
        raise ValueError(f"shape mismatch: prediction {p.shape} vs ground truth {g.shape}")
    both = np.logical_and(p, g)
    n_p = int(np.count_nonzero(p))
    n_g = int(np.count_nonzero(g))
    n_both = int(np.count_nonzero(both))

    dice = 1.0 if n_p + n_g == 0 else 2.0 * n_both / (n_p + n_g)

    v = float(voxel_volume_ml)
    abs_volume_diff_ml = abs(n_g * v - n_p * v)

    labels_g, comps_g = _components(g)
    labels_p, comps_p = _components(p)
    abs_lesion_count_diff = abs(comps_g - comps_p)

    # gt components holding at least one predicted voxel are detected; predicted components holding
    # at least one gt voxel are not false positives (the overlap voxels are exactly where both are set)
    tp = int(np.unique(labels_g[both]).size)
    fn = comps_g - tp
    fp = comps_p - int(np.unique(labels_p[both]).size)
    lesion_f1 = 1.0 if tp + fp + fn == 0 else tp / (tp + (fp + fn) / 2.0)

    out = {
        "dice": float(dice),
        "abs_volume_diff_ml": float(abs_volume_diff_ml),
        "abs_lesion_count_diff": int(abs_lesion_count_diff),
        "lesion_f1": float(lesion_f1),
    }
    if volumes:
        out.update(ref_volume_ml=n_g * v, pred_volume_ml=n_p * v, ref_lesion_count=comps_g, pred_lesion_count=comps_p)
    return out


# ------------------------------------------------------------------------------------------------- reading
@dataclass
class _Mask:
    path: Path
    data: np.ndarray
    affine: np.ndarray
    zooms: tuple[float, float, float]

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.zooms)) / 1000.0


def _has_suffix(path: Path, suffixes: Sequence[str]) -> bool:
    return path.name.lower().endswith(tuple(suffixes))


def _stem(path: Path) -> str:
    name = path.name
    for suf in MASK_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return path.stem


def _load_mask(path: Path) -> _Mask:
    path = Path(path)
    if not path.exists():
        raise InputError(path, "does not exist")
    if not path.is_file():
        raise InputError(path, "is not a file")
    try:
        if _has_suffix(path, _NIFTI_SUFFIXES):
            import nibabel as nib

            img = nib.load(str(path))
            data = np.asanyarray(img.dataobj)  # scaled like get_fdata(), without forcing float64
            zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
            affine = np.asarray(img.affine, dtype=np.float64)
        else:
            import SimpleITK as sitk

            from deepisles.io.image import Image

            s = sitk.ReadImage(str(path))
            im = Image.from_sitk(s, str(path))
            data, affine = im.data, im.affine
            zooms = tuple(float(z) for z in s.GetSpacing()[:3])
    except Exception as exc:  # any reader failure is a problem with the user's file
        msg = str(exc).strip().splitlines()
        raise InputError(path, f"cannot read as an image ({msg[0] if msg else type(exc).__name__})") from exc
    shape = data.shape
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3 or len(zooms) != 3:
        raise InputError(path, f"expected a 3D mask, got an image of shape {tuple(shape)}")
    return _Mask(path, data, affine, zooms)


def _fmt(values: Iterable[float]) -> str:
    return "x".join(f"{v:.4g}" for v in values)


def evaluate_pair(pred_path: Path, gt_path: Path, volumes: bool = False) -> dict:
    """Read a prediction and its ground truth, check they share one grid, return :func:`case_metrics`.

    The voxel volume is the ground truth's header voxel size (the grids are equal within 1e-3 mm).
    """
    gt = _load_mask(Path(gt_path))
    pred = _load_mask(Path(pred_path))
    same_shape = pred.data.shape == gt.data.shape
    if not (same_shape and np.allclose(pred.affine, gt.affine, rtol=0.0, atol=1e-3)):
        sp_p = np.linalg.norm(pred.affine[:3, :3], axis=0)
        sp_g = np.linalg.norm(gt.affine[:3, :3], axis=0)
        detail = (
            f"shape {_fmt(pred.data.shape)} vs {_fmt(gt.data.shape)}, spacing {_fmt(sp_p)} vs {_fmt(sp_g)} mm"
        )
        if same_shape and np.allclose(sp_p, sp_g, rtol=0.0, atol=1e-3):
            d = float(np.abs(pred.affine - gt.affine).max())
            detail += f", but origin/orientation differ (affines differ by up to {d:.4g} mm)"
        raise InputError(
            pred.path,
            f"not on the grid of the ground truth {gt.path} ({detail}); resample the prediction onto it first",
        )
    return case_metrics(pred.data, gt.data, gt.voxel_volume_ml, volumes=volumes)


# ------------------------------------------------------------------------------------------------- pairing
def _list_names(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" … ({len(items) - limit} more)" if len(items) > limit else "")


def _is_mask_file(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and _has_suffix(p, MASK_SUFFIXES)


def _mask_files(folder: Path, recursive: bool) -> list[Path]:
    it = folder.rglob("*") if recursive else folder.iterdir()
    out = []
    for p in it:
        rel = p.relative_to(folder).parts
        if any(part.startswith(".") for part in rel):
            continue
        if _is_mask_file(p):
            out.append(p)
    return sorted(out)


def _isles_gt(gt_dir: Path) -> dict[str, Path] | None:
    """Reference masks of an ISLES'22 / BIDS dataset, keyed by case; None if ``gt_dir`` is not such a dataset.

    ``gt_dir`` may be the dataset root (holding ``derivatives/``) or the derivatives folder itself. The masks are
    those :func:`deepisles.io.dataset.find_masks` finds there (``sub-X[_ses-Y]_msk.nii[.gz]``, the finder ``train``
    and ``batch`` use) inside subfolders (``derivatives/sub-X/ses-Y/``, also below a pipeline folder); a flat
    folder of masks is paired by file name instead. The case is the subject id, or ``sub-X_ses-Y`` for subjects
    with masks in several sessions.
    """
    root = gt_dir / "derivatives" if (gt_dir / "derivatives").is_dir() else gt_dir
    found: dict[CaseKey, list[Path]] = {}
    for key, paths in find_masks(root).items():
        nested = [p for p in paths if p.parent != root]
        if nested:
            found[key] = nested
    if not found:
        return None
    sessions: dict[str, int] = {}
    for sub, _ses in found:
        sessions[sub] = sessions.get(sub, 0) + 1
    cases: dict[str, Path] = {}
    for (sub, ses), masks in sorted(found.items(), key=lambda kv: case_id(kv[0])):
        if len(masks) > 1:
            names = _list_names([str(m.relative_to(root)) for m in masks])
            raise InputError(
                Path(os.path.commonpath(masks)), f"holds several masks for {case_id((sub, ses))} ({names}); keep "
                "one *_msk file per session"
            )
        cases[sub if sessions[sub] == 1 else case_id((sub, ses))] = masks[0]
    return cases


def _pick_one(case: str, candidates: list[Path], pred_dir: Path) -> Path:
    if len(candidates) == 1:
        return candidates[0]
    # deepisles' own output folders also hold lesion_prob and lesion_agreement maps: never the mask
    pool = [p for p in candidates if not _NOT_A_MASK_RE.search(p.name)] or candidates
    if len(pool) > 1:
        pool = [p for p in pool if _MASKY_RE.search(p.name)] or pool
    if len(pool) == 1:
        return pool[0]
    names = [str(p.relative_to(pred_dir)) for p in candidates]
    raise InputError(
        pred_dir, f"several predictions for {case} ({_list_names(names)}); keep one mask per case"
    )


def _case_ids(path: Path, base: Path) -> tuple[str | None, str | None]:
    """Subject and session named by a prediction file: from its file name first, else from its folders."""
    parts = list(path.relative_to(base).parts)
    sub = ses = None
    for part in reversed(parts):
        if sub is None:
            m = _SUB_RE.search(part)
            sub = m.group(1) if m else None
        if ses is None:
            m = _SES_RE.search(part)
            ses = m.group(1) if m else None
    return sub, ses


def _pair_by_subject(gt_cases: dict[str, Path], pred_dir: Path) -> list[tuple[str, Path, Path]]:
    preds = _mask_files(pred_dir, recursive=True)
    by_case: dict[str, list[Path]] = {c: [] for c in gt_cases}
    unpaired: list[str] = []
    for p in preds:
        sub, ses = _case_ids(p, pred_dir)
        keys = [k for k in (f"{sub}_{ses}" if ses else None, sub) if k is not None and k in by_case]
        if keys:
            by_case[keys[0]].append(p)
        elif sub is not None and ses is None and any(k.startswith(f"{sub}_ses-") for k in by_case):
            # a subject with masks in several sessions: its predictions must name the session
            unpaired.append(f"{p.relative_to(pred_dir)} (names no session)")
        else:
            unpaired.append(str(p.relative_to(pred_dir)))
    missing = sorted(c for c, c_preds in by_case.items() if not c_preds)
    if missing:
        raise InputError(
            pred_dir,
            f"no prediction for {len(missing)} of {len(by_case)} ground-truth case(s): {_list_names(missing)} "
            "(expected a file whose name holds the subject id, or a sub-X folder holding one mask)",
        )
    if unpaired:
        raise InputError(
            pred_dir, f"{len(unpaired)} prediction(s) without a ground-truth case: {_list_names(unpaired)}"
        )
    return [(case, _pick_one(case, by_case[case], pred_dir), gt_cases[case]) for case in sorted(by_case)]


def _pair_by_name(pred_dir: Path, gt_dir: Path) -> list[tuple[str, Path, Path]]:
    gts = _mask_files(gt_dir, recursive=False)
    if not gts:
        raise InputError(gt_dir, f"no ground-truth masks ({', '.join(MASK_SUFFIXES)}) in this folder")
    preds = _mask_files(pred_dir, recursive=False)
    pred_names = {p.name: p for p in preds}
    pairs: list[tuple[Path, Path]] = []
    used: set[Path] = set()
    missing: list[str] = []
    for g in gts:
        p = pred_names.get(g.name)
        if p is None:
            # fall back on the subject id when the ground-truth name carries one
            sub = _SUB_RE.search(g.name)
            cands = [q for q in preds if q not in used and sub and _case_ids(q, pred_dir)[0] == sub.group(1)]
            sub_dir = pred_dir / sub.group(1) if sub else None
            if not cands and sub_dir is not None and sub_dir.is_dir():
                cands = _mask_files(sub_dir, recursive=True)
            if not cands:
                missing.append(g.name)
                continue
            p = _pick_one(_stem(g), cands, pred_dir)
        pairs.append((p, g))
        used.add(p)
    if missing:
        raise InputError(
            pred_dir,
            f"no prediction for {len(missing)} of {len(gts)} ground-truth file(s): {_list_names(missing)}",
        )
    unpaired = sorted(p.name for p in preds if p not in used)
    if unpaired:
        raise InputError(
            pred_dir, f"{len(unpaired)} prediction(s) without a ground-truth file: {_list_names(unpaired)}"
        )
    stems = [_stem(g) for _, g in pairs]
    out = [(s if stems.count(s) == 1 else g.name, p, g) for s, (p, g) in zip(stems, pairs, strict=True)]
    return sorted(out, key=lambda t: t[0])


def pair_cases(pred: Path, gt: Path) -> list[tuple[str, Path, Path]]:
    """Pair predictions with ground truths: ``[(case, pred_file, gt_file), ...]`` sorted by case.

    * two files: one case named after the ground-truth file (without its .nii/.nii.gz/.mha ending);
    * two folders, ground truth in the ISLES'22 layout (``[root/]derivatives/sub-X/ses-Y/sub-X_ses-Y_msk.nii.gz``):
      one case per subject; its prediction is the file whose name (or whose ``sub-X`` folder) holds the subject id;
    * two folders otherwise: files with identical names (falling back on the subject id when the ground-truth
      file name holds one).

    Every ground-truth case needs a prediction and every prediction a ground truth, else ``InputError``.
    """
    pred, gt = Path(pred), Path(gt)
    for path, what in ((gt, "ground truth"), (pred, "prediction")):
        if not path.exists():
            raise InputError(path, f"{what} not found")
    if gt.is_file() and pred.is_file():
        return [(_stem(gt), pred, gt)]
    if gt.is_dir() != pred.is_dir():
        kind = lambda p: "a folder" if p.is_dir() else "a file"  # noqa: E731
        raise InputError(
            pred,
            f"prediction is {kind(pred)} but the ground truth {gt} is {kind(gt)}; give two files or two folders",
        )
    isles = _isles_gt(gt)
    pairs = _pair_by_subject(isles, pred) if isles is not None else _pair_by_name(pred, gt)
    if not pairs:
        raise InputError(gt, "no case could be paired with a prediction")
    return pairs


# ------------------------------------------------------------------------------------------------- batch
def evaluate_paths(
    pred: Path, gt: Path, progress: Progress | None = None, volumes: bool = False
) -> list[dict]:
    """Metrics of every paired case: rows ``{"case": ..., <metrics>}`` sorted by case (``volumes``: also
    :data:`VOLUME_COLUMNS`).

    ``progress.advance(done, total, case)`` after each case (:mod:`deepisles.progress`).
    """
    progress = as_progress(progress)
    pairs = pair_cases(pred, gt)
    rows = []
    for i, (case, p, g) in enumerate(pairs, start=1):
        rows.append({"case": case, **evaluate_pair(p, g, volumes=volumes)})
        progress.advance(i, len(pairs), case)
    return sorted(rows, key=lambda r: r["case"])


def summarize(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Per metric: mean, median, q1, q3 (quartiles by linear interpolation, as numpy/pandas) and n."""
    out: dict[str, dict[str, float]] = {}
    for m in METRICS:
        vals = np.array([float(r[m]) for r in rows if r.get(m) is not None], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        if vals.size == 0:
            out[m] = {
                "mean": float("nan"),
                "median": float("nan"),
                "q1": float("nan"),
                "q3": float("nan"),
                "n": 0,
            }
            continue
        q1, med, q3 = (float(v) for v in np.percentile(vals, [25, 50, 75]))
        out[m] = {"mean": float(vals.mean()), "median": med, "q1": q1, "q3": q3, "n": int(vals.size)}
    return out


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return str(int(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    return str(v)


def write_metrics_csv(path: Path, rows: Sequence[dict]) -> Path:
    """Write ``rows`` as CSV with exactly the columns :data:`COLUMNS` (header first), atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([_cell(r.get(c)) for c in COLUMNS])
    return write_text_atomic(Path(path), buf.getvalue())
