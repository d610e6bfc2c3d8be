"""`deepisles weights import`: finds each member in an unpacked official DeepISLES weight folder (or the
``.7z`` archive) and converts it into the store. The per-member converters are the modules the member registry
(``deepisles.members.registry``) names as importers (``import_<member>.py``); they are the only code in deepisles
that unpickles, and only here, at import time."""

from __future__ import annotations

import importlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from deepisles import store
from deepisles.errors import DeepIslesError
from deepisles.members.registry import importable_members, spec


def _converter(name: str):
    """The importer module the registry names for member ``name`` (``locate`` + ``import_official``)."""
    return importlib.import_module(spec(name, importable_members(), "member to import").importer)


def unsafe_member(name: str, *, is_link: bool = False) -> str | None:
    """Why an archive member must not be extracted (None when it is a plain relative path).

    Refused: absolute paths (``/x``, ``C:\\x``, ``\\\\server``), any ``..`` component, backslashes (a
    Windows separator in disguise), NUL bytes, empty names, and links of any kind."""
    if is_link:
        return "is a link"
    if not name or "\x00" in name:
        return "has an empty or invalid name"
    if "\\" in name:
        return "contains a backslash"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "is an absolute path"
    if any(part == ".." for part in name.split("/")):
        return "contains '..'"
    return None


def extract_7z(archive: Path, into: Path) -> Path:
    """Unpack a .7z with py7zr (``pip install 'deepisles[import]'``) after checking every member's name:
    nothing is extracted when one member is absolute, holds ``..``, or is a link (:func:`unsafe_member`)."""
    try:
        import py7zr
    except ImportError:
        raise DeepIslesError(
            f"{archive}: unpacking .7z needs py7zr (pip install 'deepisles[import]'), "
            "or unpack it yourself and import the folder"
        ) from None
    try:
        with py7zr.SevenZipFile(archive, mode="r") as z:
            for f in z.files:
                link = bool(getattr(f, "is_symlink", False) or getattr(f, "is_junction", False)
                            or getattr(f, "is_socket", False))
                why = unsafe_member(str(f.filename), is_link=link)
                if why:
                    raise DeepIslesError(f"{archive}: refusing to unpack: member {f.filename!r} {why}")
            z.reset()
            z.extractall(path=into)
    except (py7zr.Bad7zFile, OSError) as exc:
        raise DeepIslesError(f"{archive}: cannot unpack ({exc})") from None
    root = Path(into).resolve()
    for p in Path(into).rglob("*"):  # belt and braces: nothing may point or lie outside the unpack folder
        if p.is_symlink() or root not in p.resolve().parents:
            raise DeepIslesError(f"{archive}: refusing the unpacked member {p.relative_to(into)} (link or outside)")
    return into


def _record_archive_source(member_folder: Path, archive: Path, inside: Path) -> None:
    """Rewrite ``member.json``'s ``source`` (which named the temporary unpack folder) as ``ARCHIVE:PATH``."""
    import json

    from deepisles.io.write import write_json_atomic

    meta_path = member_folder / store.MEMBER_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["source"] = f"{Path(archive).resolve()}:{inside.as_posix()}"
    write_json_atomic(meta_path, meta)


def _archive_root(root: Path, converters: dict) -> Path:
    """``root``, or the single folder an archive wraps everything in (``stroke_ensemble_weights/weights/...``)
    when no member is found at ``root`` itself."""
    if any(conv.locate(root) is not None for conv in converters.values()):
        return root
    subdirs = [p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")]
    return subdirs[0] if len(subdirs) == 1 else root


def import_weights(
    path: Path,
    members: tuple[str, ...] | None = None,
    overwrite: bool = False,
    say: Callable[[str], None] = print,
) -> dict[str, str]:
    """Import every requested member (default: every importable one) found under ``path``; returns member ->
    store folder or reason."""
    members = importable_members() if members is None else tuple(members)
    path = Path(path)
    converters = {name: _converter(name) for name in members}  # unknown names are refused before any work
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
        root = _archive_root(root, converters)
        results: dict[str, str] = {}
        for name, conv in converters.items():
            folder = conv.locate(root)
            if folder is None:
                results[name] = "not found in this folder"
                continue
            say(f"{name}: importing from {folder} (reads the official pickled checkpoints once)")
            results[name] = str(conv.import_official(folder, overwrite=overwrite))
            if tmp is not None:  # the unpack folder is deleted below: record the archive as the source
                _record_archive_source(Path(results[name]), path, folder.relative_to(tmp))
        if all(not Path(v).exists() for v in results.values()):
            raise DeepIslesError(f"{path}: no DeepISLES member weights found (looked for {', '.join(members)})")
        return results
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
