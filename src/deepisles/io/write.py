"""Atomic writing (temp file + rename) and the guard that never overwrites results unasked."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import nibabel as nib

from deepisles.errors import OutputExistsError


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return (stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH) & ~umask


_FILE_MODE = _default_mode()


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a temp file in the target folder, fsync it, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # keep the real suffixes so libraries that look at them (nibabel: .nii.gz) write the right format
    suffix = "".join(path.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; results are ordinary files
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    return _atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_nifti_atomic(path: Path, img: nib.Nifti1Image) -> Path:
    return _atomic(path, lambda tmp: nib.save(img, str(tmp)))


def write_with_atomic(path: Path, writer: Callable[[Path], None]) -> Path:
    """Atomic write through any writer taking a path (matplotlib ``savefig``, csv, ...)."""
    return _atomic(path, writer)


def _json_default(o):
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def check_output_dir(outdir: Path, names: Iterable[str], overwrite: bool) -> None:
    """Refuse an output folder that already holds any of ``names`` unless ``overwrite``."""
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise OutputExistsError(f"{outdir}: exists and is not a folder")
    if overwrite or not outdir.exists():
        return
    existing = sorted(n for n in names if (outdir / n).exists())
    if existing:
        raise OutputExistsError(
            f"{outdir}: already holds results ({', '.join(existing)}); pass --overwrite to replace them"
        )


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames into it) to disk; a no-op where folders cannot be opened or synced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
