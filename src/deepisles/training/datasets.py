"""Training cases of a dataset folder in the ISLES'22 layouts, and loading one case.

Layouts (file names are BIDS-like ``sub-X[_ses-Y][_key-value...]_<suffix>.nii[.gz]``, suffix ``dwi``,
``adc``, ``flair`` or ``msk`` in any letter case; every other file, e.g. JSON sidecars or ``.bval``, is
ignored):

1. ``ROOT/rawdata/sub-X/[ses-Y/][dwi/|anat/]sub-X[_ses-Y]_{dwi,adc,flair}.nii.gz`` - what
   :func:`deepisles.synth.write_dataset` writes (flat) and the official ISLES'22 release (``dwi/``,
   ``anat/`` subfolders, ``_FLAIR``);
2. the same without ``rawdata/``: ``ROOT/sub-X/...``.

Masks ``sub-X[_ses-Y]_msk.nii[.gz]`` are searched recursively under ``ROOT/derivatives`` (any pipeline
subfolder) and, as a fallback, next to the images. Cases are keyed by (subject, session); a case without
DWI, ADC or (unless ``require_mask=False``, e.g. for inference) mask is skipped with a logged warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepisles.errors import DeepIslesError, InputError
from deepisles.io.image import Image
from deepisles.io.load import LoadedInputs, load_inputs
from deepisles.io.read import read_image
from deepisles.io.validate import check_3d

log = logging.getLogger(__name__)

#: file-name suffix (lower case) -> role
_SUFFIX_ROLE = {"dwi": "dwi", "adc": "adc", "flair": "flair", "msk": "mask"}
_NIFTI = (".nii.gz", ".nii")
#: folders never searched for images at the top of the image root
_SKIP_TOP = {"derivatives", "sourcedata", "code"}

LAYOUTS = (
    "expected ROOT/rawdata/sub-*/[ses-*/][dwi/|anat/]sub-*[_ses-*]_{dwi,adc,flair}.nii[.gz] or the same "
    "directly under ROOT (ROOT/sub-*/...), with masks ROOT/derivatives/**/sub-*[_ses-*]_msk.nii[.gz]"
)

_Key = tuple[str, str | None]


@dataclass(frozen=True)
class TrainingCase:
    """One case: DWI, ADC, lesion mask and (optionally) FLAIR files; ``mask`` is None only for cases found
    with ``find_cases(..., require_mask=False)``."""

    case_id: str  # "sub-strokecase0001_ses-0001" (subject + session when there is one)
    subject: str  # "sub-strokecase0001"
    dwi: Path
    adc: Path
    mask: Path | None
    flair: Path | None = None
    problem: str | None = None  # set by find_cases(keep_ambiguous=True) for a case that cannot run as found


def _parse(name: str) -> tuple[_Key, str] | None:
    """``sub-X_ses-Y_acq-Z_DWI.nii.gz`` -> ``(("sub-X", "ses-Y"), "dwi")``; None for any other file."""
    lower = name.lower()
    base = next((name[: -len(s)] for s in _NIFTI if lower.endswith(s)), None)
    if base is None:
        return None
    parts = base.split("_")
    role = _SUFFIX_ROLE.get(parts[-1].lower())
    if role is None or len(parts) < 2:
        return None
    entities: dict[str, str] = {}
    for token in parts[:-1]:
        key, sep, value = token.partition("-")
        if not sep or not key or not value or key.lower() in entities:
            return None  # not a BIDS-like name
        entities[key.lower()] = token
    if not parts[0].lower().startswith("sub-"):
        return None
    return (entities["sub"], entities.get("ses")), role


def _walk(top: Path, skip_top: set[str]) -> Iterator[Path]:
    """NIfTI-looking files under ``top`` (sorted, hidden entries skipped, ``skip_top`` folders pruned)."""
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and not (here == top and d.lower() in skip_top)
        )
        for f in sorted(filenames):
            if not f.startswith(".") and f.lower().endswith(_NIFTI):
                yield here / f


def _case_id(key: _Key) -> str:
    return key[0] if key[1] is None else f"{key[0]}_{key[1]}"


def _single(key: _Key, role: str, paths: list[Path]) -> Path | None:
    if not paths:
        return None
    if len(paths) > 1:
        names = ", ".join(str(p) for p in sorted(paths))
        raise DeepIslesError(f"case {_case_id(key)} has {len(paths)} {role} files, expected one: {names}")
    return paths[0]


def _first(paths: list[Path]) -> Path | None:
    return sorted(paths)[0] if paths else None


def find_cases(
    root: str | Path, require_flair: bool = False, require_mask: bool = True, keep_ambiguous: bool = False
) -> list[TrainingCase]:
    """All usable training cases under ``root`` (layouts in the module docstring), sorted by case_id.

    Cases without DWI, ADC or mask (and without FLAIR when ``require_flair``) are skipped with a logged
    warning; with ``require_mask=False`` cases without a mask are kept (``mask=None``), for inference.
    Raises :class:`DeepIslesError` when none is usable or a case has two files of one role; with
    ``keep_ambiguous`` (``deepisles batch``) such a case is returned with its ``problem`` set instead, so that
    one ambiguous case is logged as failed and does not stop the others.
    """
    root = Path(root)
    if not root.is_dir():
        raise DeepIslesError(f"dataset folder not found: {root}")
    image_root = root / "rawdata" if (root / "rawdata").is_dir() else root

    images: dict[_Key, dict[str, list[Path]]] = {}
    masks: dict[_Key, list[Path]] = {}
    near_masks: dict[_Key, list[Path]] = {}
    for path in _walk(image_root, _SKIP_TOP):
        parsed = _parse(path.name)
        if parsed is None:
            continue
        key, role = parsed
        if role == "mask":
            near_masks.setdefault(key, []).append(path)
        else:
            images.setdefault(key, {}).setdefault(role, []).append(path)
    derivatives = root / "derivatives"
    if derivatives.is_dir():
        for path in _walk(derivatives, set()):
            parsed = _parse(path.name)
            if parsed is not None and parsed[1] == "mask":
                masks.setdefault(parsed[0], []).append(path)

    cases: list[TrainingCase] = []
    skipped = {"no DWI/ADC": 0, "no mask": 0, "no FLAIR": 0}
    for key in sorted(images, key=_case_id):
        cid = _case_id(key)
        roles = images[key]
        found = {"DWI": roles.get("dwi", []), "ADC": roles.get("adc", []), "FLAIR": roles.get("flair", []),
                 "mask": masks.get(key) or near_masks.get(key, [])}
        try:
            dwi, adc, flair, mask = (_single(key, role, paths) for role, paths in found.items())
        except DeepIslesError as exc:
            if not keep_ambiguous:
                raise
            dwi, adc, flair, mask = (_first(paths) for paths in found.values())
            if dwi is not None and adc is not None:
                cases.append(TrainingCase(cid, key[0], dwi, adc, mask, flair, problem=str(exc)))
                continue
        if dwi is None or adc is None:
            missing = " and ".join(r for r, p in (("DWI", dwi), ("ADC", adc)) if p is None)
            log.warning("skipping case %s: no %s file", cid, missing)
            skipped["no DWI/ADC"] += 1
            continue
        if mask is None and require_mask:
            log.warning("skipping case %s: no mask %s_msk.nii[.gz] under %s", cid, cid, derivatives)
            skipped["no mask"] += 1
            continue
        if require_flair and flair is None:
            log.warning("skipping case %s: no FLAIR file (FLAIR required)", cid)
            skipped["no FLAIR"] += 1
            continue
        cases.append(TrainingCase(cid, key[0], dwi, adc, mask, flair))

    if not cases:
        why = ", ".join(f"{n} {reason}" for reason, n in skipped.items() if n)
        found = (
            f"{len(images)} case(s) with images found but none usable ({why})" if images else "no cases found"
        )
        what = "training cases" if require_mask else "cases"
        raise DeepIslesError(f"no {what} in {root}: {found}; {LAYOUTS}")
    return sorted(cases, key=lambda c: c.case_id)


def _check_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise DeepIslesError(f"{name} must be an integer, got {value!r}")
    return int(value)


def split_folds(
    cases: list[TrainingCase], folds: int, fold: int, seed: int = 12345
) -> tuple[list[TrainingCase], list[TrainingCase]]:
    """``(train, val)`` of fold ``fold`` of a K-fold split by subject (all sessions of a subject together).

    Subjects are shuffled with ``numpy.random.default_rng(seed)`` and cut into ``folds`` near-equal groups;
    the same inputs always give the same split. ``folds=1`` -> ``(all cases, [])``. Both lists keep the
    order of ``cases``.
    """
    folds = _check_int(folds, "folds")
    fold = _check_int(fold, "fold")
    if folds < 1:
        raise DeepIslesError(f"folds must be at least 1, got {folds}")
    if not 0 <= fold < folds:
        raise DeepIslesError(f"fold must be in 0..{folds - 1} for {folds} folds, got {fold}")
    subjects = sorted({c.subject for c in cases})
    if len(subjects) < folds:
        raise DeepIslesError(
            f"cannot split {len(subjects)} subject(s) into {folds} folds: need at least one subject per fold"
        )
    if folds == 1:
        return list(cases), []
    order = np.random.default_rng(seed).permutation(len(subjects))
    val_idx = np.array_split(order, folds)[fold]
    val_subjects = {subjects[i] for i in val_idx}
    train = [c for c in cases if c.subject not in val_subjects]
    val = [c for c in cases if c.subject in val_subjects]
    return train, val


def load_case(case: TrainingCase, with_flair: bool = True) -> tuple[LoadedInputs, Image]:
    """Load a case with :func:`deepisles.io.load.load_inputs` plus its mask (uint8 0/1 on the DWI grid).

    Raises :class:`InputError` when the mask is not on the DWI grid (shape and affine).
    """
    if case.mask is None:
        raise DeepIslesError(f"case {case.case_id} has no lesion mask")
    flair = case.flair if with_flair else None
    loaded = load_inputs(case.dwi, case.adc, flair)
    mask = check_3d(read_image(case.mask, "mask"), "mask")
    dwi = loaded.dwi
    if not mask.same_grid(dwi):
        if mask.shape[:3] != dwi.shape[:3]:
            detail = f"mask shape {mask.shape[:3]}, DWI shape {dwi.shape[:3]}"
        else:
            shift = float(np.abs(mask.affine - dwi.affine).max())
            detail = f"same shape {dwi.shape[:3]} but the affines differ by up to {shift:.3g}"
        raise InputError(case.mask, f"mask is not on the DWI grid ({detail}; DWI file {case.dwi})")
    data = np.asarray(mask.data)
    binary = np.where(np.isfinite(data), data, 0) > 0.5
    return loaded, mask.with_data(binary.astype(np.uint8))
