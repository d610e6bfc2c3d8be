"""`deepisles weights import`: finds each member in an unpacked official DeepISLES weight folder (or the
``.7z`` archive) and converts it into the store. The per-member converters (``import_<member>.py``) are the
only code in deepisles that unpickles, and only here, at import time."""

from __future__ import annotations

import importlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from deepisles.errors import DeepIslesError
from deepisles.weights import store

MEMBERS = ("seals", "nvauto", "factorizer")


def _converter(name: str):
    return importlib.import_module(f"deepisles.weights.import_{name}")


def extract_7z(archive: Path, into: Path) -> Path:
    """Unpack a .7z with py7zr (``pip install 'deepisles[import]'``)."""
    try:
        import py7zr
    except ImportError:
        raise DeepIslesError(
            f"{archive}: unpacking .7z needs py7zr (pip install 'deepisles[import]'), "
            "or unpack it yourself and import the folder"
        ) from None
    try:
        with py7zr.SevenZipFile(archive, mode="r") as z:
            z.extractall(path=into)
    except (py7zr.Bad7zFile, OSError) as exc:
        raise DeepIslesError(f"{archive}: cannot unpack ({exc})") from None
    return into


def import_weights(
    path: Path,
    members: tuple[str, ...] = MEMBERS,
    overwrite: bool = False,
    say: Callable[[str], None] = print,
) -> dict[str, str]:
    """Import every requested member found under ``path``; returns member -> store folder or reason."""
    path = Path(path)
    if not path.exists():
        raise DeepIslesError(f"{path}: no such file or folder")
    tmp = None
    try:
        if path.is_file():
            if path.suffix != ".7z":
                raise DeepIslesError(f"{path}: expected the official .7z archive or its unpacked folder")
            store.weights_dir().mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".unpack.", dir=store.weights_dir()))
            say(f"unpacking {path.name} …")
            root = extract_7z(path, tmp)
        else:
            root = path
        results: dict[str, str] = {}
        for name in members:
            conv = _converter(name)
            folder = conv.locate(root)
            if folder is None:
                results[name] = "not found in this folder"
                continue
            say(f"{name}: importing from {folder} (reads the official pickled checkpoints once)")
            results[name] = str(conv.import_official(folder, overwrite=overwrite))
        if all(not Path(v).exists() for v in results.values()):
            raise DeepIslesError(f"{path}: no DeepISLES member weights found (looked for {', '.join(members)})")
        return results
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
