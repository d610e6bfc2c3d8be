"""The weight store: one folder per member under ``$DEEPISLES_HOME/weights/<member>/``.

Each member folder holds ``member.json`` and its weight files: ``*.safetensors`` (tensors only, no pickles;
stores written before the restricted NVAUTO import may hold a TorchScript ``*.ts``, which is never loaded:
re-import). ``member.json`` follows one schema for every member (``deepisles.members.config``: format version,
member name, source, inputs in network order, network, models, the member's typed settings) plus the SHA-256
of every weight file, which this module adds. This module knows the folder layout and the checksums, not the
members: it reads any format in ``READABLE_FORMATS`` as stored, and the members' configuration code migrates
older formats on read. Folders are written to a temporary sibling and renamed into place, so an interrupted
import leaves no half-written member. Nothing here unpickles.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from deepisles.errors import DeepIslesError
from deepisles.io.hashing import sha256_file

STORE_FORMAT = 2  # what write_member stamps (deepisles.members.config.FORMAT)
READABLE_FORMATS = (1, 2)  # format 1 (older deepisles) is migrated by deepisles.members.config on read
MEMBER_FILE = "member.json"


def home() -> Path:
    """``$DEEPISLES_HOME`` if set, else ``~/.deepisles``."""
    env = os.environ.get("DEEPISLES_HOME")
    return Path(env).expanduser() if env else Path.home() / ".deepisles"


def weights_dir() -> Path:
    return home() / "weights"


def member_dir(name: str) -> Path:
    return weights_dir() / name


def installed_members() -> list[str]:
    root = weights_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / MEMBER_FILE).is_file())


def read_member(name: str, verify: bool = False) -> tuple[dict, Path]:
    """The member's config and folder; ``verify`` re-checks every file's SHA-256."""
    folder = member_dir(name)
    if not (folder / MEMBER_FILE).is_file():
        raise FileNotFoundError(f"no weights for member {name} in {weights_dir()}")
    return read_member_folder(folder, verify)


def read_member_folder(folder: Path, verify: bool = False) -> tuple[dict, Path]:
    """``member.json`` of a member folder in the store format (the store's, a packaged or an exported one)."""
    folder = Path(folder)
    meta_path = folder / MEMBER_FILE
    name = folder.name
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: no such member description")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise DeepIslesError(f"{meta_path}: corrupt member description ({exc.msg})") from None
    if not isinstance(meta, dict) or meta.get("format") not in READABLE_FORMATS:
        version = meta.get("format") if isinstance(meta, dict) else None
        raise DeepIslesError(f"{meta_path}: store format {version} is not one this deepisles reads "
                             f"({', '.join(map(str, READABLE_FORMATS))}); re-import")
    for fname, digest in (meta.get("files") or {}).items():
        f = folder / fname
        if not f.is_file():
            raise DeepIslesError(f"{f}: weight file missing; re-import member {name}")
        if verify and sha256_file(f) != digest:
            raise DeepIslesError(f"{f}: checksum mismatch; re-import member {name}")
    return meta, folder


def write_member(name: str, meta: dict, files: dict[str, callable], overwrite: bool = False) -> Path:
    """Create ``weights/<name>/`` atomically.

    ``files`` maps each file name to a function writing that file to a given path. Checksums are computed
    after writing and recorded in ``member.json``.
    """
    return write_member_folder(member_dir(name), name, meta, files, overwrite)


def write_member_folder(dest: Path, name: str, meta: dict, files: dict[str, callable], overwrite: bool = False) -> Path:
    """A member folder in the store format at ``dest`` (the store's or any other), written atomically."""
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise DeepIslesError(f"{dest}: member {name} is already installed; pass --overwrite to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=dest.parent))
    try:
        digests = {}
        for fname, writer in files.items():
            writer(tmp / fname)
            digests[fname] = sha256_file(tmp / fname)
        full = {"format": STORE_FORMAT, "member": name, **meta, "files": digests}
        (tmp / MEMBER_FILE).write_text(json.dumps(full, indent=2) + "\n")
        if dest.exists():
            old = dest.with_name(f".{name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
