"""Per-subject attributes of an ISLES'22 / BIDS dataset, for stratifying an evaluation (``evaluate --by``).

Two sources, looked up per evaluated case:

* ``participants.tsv`` (``ROOT/participants.tsv``, else ``ROOT/rawdata/participants.tsv``): every column but
  ``participant_id``, matched by subject (``sub-X``; ids written without ``sub-`` match too); BIDS' ``n/a`` and
  empty cells are missing values;
* the JSON sidecar of the case's DWI (``sub-X[_ses-Y]_dwi.json`` beside the DWI that
  :func:`deepisles.io.dataset.find_cases` finds): every field holding a single string, number or boolean
  (``Manufacturer``, ``MagneticFieldStrength``, ``InstitutionName``, ...). Sidecars higher up the BIDS
  inheritance chain are not read.

A name in both sources is taken from participants.tsv. A case that a source does not cover (a subject missing from
participants.tsv, a case without a DWI or sidecar) gets no value from it, with the reason recorded: the strata put
it in ``n/a`` and say why, nothing is dropped.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from deepisles.errors import DeepIslesError, InputError
from deepisles.io.dataset import find_cases

MISSING = ("", "n/a")
PARTICIPANTS = "participants.tsv"
_SUB_RE = re.compile(r"(?<![A-Za-z0-9])(sub-[A-Za-z0-9]+)(?![A-Za-z0-9])")
_SES_RE = re.compile(r"(?<![A-Za-z0-9])(ses-[A-Za-z0-9]+)(?![A-Za-z0-9])")


@dataclass
class Attributes:
    """``values[case][name]``: the attributes of each evaluated case; ``missing[name][case]``: why a case has no
    value of ``name``; ``columns[name]``: its source; ``notes``: what was read and what was not used."""

    columns: dict[str, str] = field(default_factory=dict)
    values: dict[str, dict[str, str]] = field(default_factory=dict)
    missing: dict[str, dict[str, str]] = field(default_factory=dict)
    notes: dict[str, object] = field(default_factory=dict)


def dataset_root(path: Path) -> Path | None:
    """The dataset root of an ISLES'22 / BIDS ground truth: ``path`` itself when it holds ``derivatives/``, the
    folder above ``derivatives`` when ``path`` is (inside) it; None otherwise."""
    path = Path(path)
    if path.is_dir() and (path / "derivatives").is_dir():
        return path
    for parent in (path, *path.parents):
        if parent.name == "derivatives":
            return parent.parent
    return None


def _case_keys(case: str) -> tuple[str | None, str | None]:
    sub = _SUB_RE.search(case)
    ses = _SES_RE.search(case)
    return (sub.group(1) if sub else None), (ses.group(1) if ses else None)


def _text(value: object) -> str | None:
    """One attribute value as a stratum label; None when missing."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return f"{value:g}"  # 3 and 3.0 in two sidecars are one stratum
    text = str(value).strip()
    return None if text in MISSING else text


def read_participants(path: Path) -> tuple[list[str], dict[str, dict[str, str]]]:
    """``participants.tsv`` -> (its columns, ``{participant_id: {column: cell}}``); InputError for a file without
    a ``participant_id`` column, a row of the wrong width or a repeated id."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read ({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
    lines = list(csv.reader(text.splitlines(), delimiter="\t"))
    lines = [(i, row) for i, row in enumerate(lines, start=1) if any(c.strip() for c in row)]
    if not lines:
        raise InputError(path, "is empty (expected a header with participant_id)")
    header = [c.strip() for c in lines[0][1]]
    if "participant_id" not in header:
        raise InputError(path, f"has no participant_id column (columns: {', '.join(header)})")
    key = header.index("participant_id")
    rows: dict[str, dict[str, str]] = {}
    for lineno, row in lines[1:]:
        if len(row) != len(header):
            raise InputError(path, f"line {lineno} has {len(row)} fields, the header {len(header)}")
        pid = row[key].strip()
        if pid in rows:
            raise InputError(path, f"participant {pid} is listed twice (line {lineno})")
        rows[pid] = {h: c for h, c in zip(header, row, strict=True) if h != "participant_id"}
    return [h for h in header if h != "participant_id"], rows


def find_participants(root: Path) -> Path | None:
    for p in (root / PARTICIPANTS, root / "rawdata" / PARTICIPANTS):
        if p.is_file():
            return p
    return None


def _sidecar_fields(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(path, f"cannot read this JSON sidecar ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise InputError(path, "is not a JSON object (expected a BIDS sidecar)")
    return {k: v for k, v in data.items() if isinstance(v, (str, int, float, bool))}


def _dwi_sidecars(root: Path) -> dict[tuple[str, str | None], Path | None]:
    """(subject, session) -> the DWI's JSON sidecar (None when the DWI has none)."""
    try:
        cases = find_cases(root, require_mask=False, keep_ambiguous=True)
    except DeepIslesError:  # no images at all: participants.tsv may still be there
        return {}
    out: dict[tuple[str, str | None], Path | None] = {}
    for c in cases:
        name = c.dwi.name
        stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else c.dwi.stem
        side = c.dwi.with_name(stem + ".json")
        out[(c.subject, c.session)] = side if side.is_file() else None
    return out


def _pick_session(keys: dict, sub: str | None, ses: str | None):
    if sub is None:
        return None, "names no subject (sub-X)"
    if ses is not None:
        return ((sub, ses), None) if (sub, ses) in keys else (None, f"no DWI of {sub} {ses} in the dataset")
    mine = [k for k in keys if k[0] == sub]
    if len(mine) == 1:
        return mine[0], None
    return None, (f"no DWI of {sub} in the dataset" if not mine else f"{sub} has {len(mine)} sessions in the "
                  "dataset; the case names none")


def collect(cases: list[str], root: Path, names: list[str]) -> Attributes:
    """The attributes ``names`` of each case from the dataset at ``root``; DeepIslesError naming the available
    columns when one of ``names`` is in neither source."""
    attrs = Attributes()
    participants = find_participants(root)
    p_columns: list[str] = []
    p_rows: dict[str, dict[str, str]] = {}
    if participants is not None:
        p_columns, p_rows = read_participants(participants)
    sidecars = _dwi_sidecars(root)
    side_fields = {k: _sidecar_fields(p) for k, p in sidecars.items() if p is not None}
    s_columns = sorted({f for fields in side_fields.values() for f in fields} - set(p_columns))
    attrs.columns = {**{c: "participants.tsv" for c in p_columns}, **{c: "DWI sidecar" for c in s_columns}}
    unknown = [n for n in names if n not in attrs.columns]
    if unknown:
        avail = ", ".join(["volume", "count", *attrs.columns]) or "volume, count"
        where = f"{participants}" if participants else f"no {PARTICIPANTS} in {root} or {root / 'rawdata'}"
        raise DeepIslesError(
            f"--by {', '.join(unknown)}: no such column ({where}; {len(side_fields)} DWI sidecar(s)); "
            f"available: {avail}"
        )
    index = {}
    for pid in p_rows:
        index[pid] = pid
        index.setdefault(pid if pid.startswith("sub-") else f"sub-{pid}", pid)
    used: set[str] = set()
    for case in cases:
        sub, ses = _case_keys(case)
        pid = next((index[k] for k in (sub, case) if k is not None and k in index), None)
        key, why_side = _pick_session(sidecars, sub, ses)
        if key is not None and sidecars[key] is None:
            why_side = f"the DWI of {case} has no JSON sidecar"
        row = p_rows.get(pid, {}) if pid is not None else {}
        if pid is not None:
            used.add(pid)
        values: dict[str, str] = {}
        for name in names:
            if attrs.columns[name] == "participants.tsv":
                value = _text(row.get(name)) if pid is not None else None
                why = f"not in {PARTICIPANTS}" if pid is None else f"missing value (n/a) in {PARTICIPANTS}"
            else:
                value = _text(side_fields[key].get(name)) if key is not None and key in side_fields else None
                why = why_side or f"no {name} in its DWI sidecar"
            if value is None:
                attrs.missing.setdefault(name, {})[case] = why
            else:
                values[name] = value
        attrs.values[case] = values
    attrs.notes = {
        "dataset": str(root),
        "participants_tsv": str(participants) if participants else None,
        "dwi_sidecars": len(side_fields),
        "participants_without_case": sorted(set(p_rows) - used),
    }
    return attrs
