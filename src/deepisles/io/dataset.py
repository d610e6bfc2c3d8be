"""Cases of a dataset folder in the ISLES'22 / BIDS layouts: the one case finder of deepisles.

Used by ``deepisles train`` (:mod:`deepisles.training.datasets`), ``deepisles batch`` (:mod:`deepisles.batch`)
and the ground truth of ``deepisles evaluate`` (:mod:`deepisles.metrics`).

Layouts (file names are BIDS-like ``sub-X[_ses-Y][_key-value...]_<suffix>.nii[.gz]``, suffix ``dwi``,
``adc``, ``flair`` or ``msk`` in any letter case; every other file, e.g. JSON sidecars or ``.bval``, is
ignored):

1. ``ROOT/rawdata/sub-X/[ses-Y/][dwi/|anat/]sub-X[_ses-Y]_{dwi,adc,flair}.nii.gz`` - what
   :func:`deepisles.synth.write_dataset` writes (flat) and the official ISLES'22 release (``dwi/``,
   ``anat/`` subfolders, ``_FLAIR``);
2. the same without ``rawdata/``: ``ROOT/sub-X/...``.

Reference (lesion) masks ``sub-X[_ses-Y]_msk.nii[.gz]`` are searched recursively under ``ROOT/derivatives``
(any pipeline subfolder; :func:`find_masks`) and, as a fallback, next to the images. Cases are keyed by
(subject, session); a case without DWI, ADC or (unless ``require_mask=False``, e.g. for inference) mask is
skipped with a logged warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from deepisles.errors import DeepIslesError

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

#: (subject, session): ("sub-strokecase0001", "ses-0001") or ("sub-01", None)
CaseKey = tuple[str, str | None]


def case_id(key: CaseKey) -> str:
    """``"sub-X_ses-Y"``, or ``"sub-X"`` without a session."""
    return key[0] if key[1] is None else f"{key[0]}_{key[1]}"


@dataclass(frozen=True)
class DatasetCase:
    """The files of one case of a dataset; ``mask`` (the reference lesion mask) is None when none was found
    (only with ``find_cases(..., require_mask=False)``), ``problem`` is set for a case that cannot run as found
    (``find_cases(..., keep_ambiguous=True)``)."""

    subject: str  # "sub-strokecase0001"
    session: str | None  # "ses-0001", or None when the dataset has no sessions
    dwi: Path
    adc: Path
    flair: Path | None = None
    mask: Path | None = None
    problem: str | None = None

    @property
    def case_id(self) -> str:
        """``"sub-strokecase0001_ses-0001"`` (subject + session when there is one)."""
        return case_id((self.subject, self.session))


def parse_name(name: str) -> tuple[CaseKey, str] | None:
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


def find_masks(folder: str | Path) -> dict[CaseKey, list[Path]]:
    """Reference masks ``sub-X[_ses-Y][_...]_msk.nii[.gz]`` anywhere under ``folder`` (hidden entries skipped),
    by (subject, session), each list sorted; ``{}`` when ``folder`` is not a folder."""
    folder = Path(folder)
    masks: dict[CaseKey, list[Path]] = {}
    if folder.is_dir():
        for path in _walk(folder, set()):
            parsed = parse_name(path.name)
            if parsed is not None and parsed[1] == "mask":
                masks.setdefault(parsed[0], []).append(path)
    return masks


def _single(key: CaseKey, role: str, paths: list[Path]) -> Path | None:
    if not paths:
        return None
    if len(paths) > 1:
        names = ", ".join(str(p) for p in sorted(paths))
        raise DeepIslesError(f"case {case_id(key)} has {len(paths)} {role} files, expected one: {names}")
    return paths[0]


def _first(paths: list[Path]) -> Path | None:
    return sorted(paths)[0] if paths else None


def find_cases(
    root: str | Path, require_flair: bool = False, require_mask: bool = True, keep_ambiguous: bool = False
) -> list[DatasetCase]:
    """All usable cases under ``root`` (layouts in the module docstring), sorted by case_id.

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

    images: dict[CaseKey, dict[str, list[Path]]] = {}
    near_masks: dict[CaseKey, list[Path]] = {}
    for path in _walk(image_root, _SKIP_TOP):
        parsed = parse_name(path.name)
        if parsed is None:
            continue
        key, role = parsed
        if role == "mask":
            near_masks.setdefault(key, []).append(path)
        else:
            images.setdefault(key, {}).setdefault(role, []).append(path)
    derivatives = root / "derivatives"
    masks = find_masks(derivatives)

    cases: list[DatasetCase] = []
    skipped = {"no DWI/ADC": 0, "no mask": 0, "no FLAIR": 0}
    for key in sorted(images, key=case_id):
        cid = case_id(key)
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
                cases.append(DatasetCase(key[0], key[1], dwi, adc, flair, mask, problem=str(exc)))
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
        cases.append(DatasetCase(key[0], key[1], dwi, adc, flair, mask))

    if not cases:
        why = ", ".join(f"{n} {reason}" for reason, n in skipped.items() if n)
        found = (
            f"{len(images)} case(s) with images found but none usable ({why})" if images else "no cases found"
        )
        what = "training cases" if require_mask else "cases"
        raise DeepIslesError(f"no {what} in {root}: {found}; {LAYOUTS}")
    return sorted(cases, key=lambda c: c.case_id)
