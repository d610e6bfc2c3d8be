"""SHA-256 digests of files and folders, read in 1 MiB chunks: the one hashing helper of deepisles
(weight store, batch completion records, report.json input digests)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

_CHUNK = 1 << 20


def _update(h, path: Path) -> None:  # h: a hashlib object
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)


def sha256_files(files: Iterable[str | Path]) -> str:
    """Hex SHA-256 of the bytes of ``files`` one after the other, in the order given."""
    h = hashlib.sha256()
    for f in files:
        _update(h, Path(f))
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of one file's bytes."""
    return sha256_files([path])


def sha256_path(path: str | Path) -> str:
    """:func:`sha256_file` of a file; of a folder (e.g. a DICOM series): every file below it, sorted by relative
    path, each hashed as its relative path followed by its bytes."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        _update(h, f)
    return h.hexdigest()
