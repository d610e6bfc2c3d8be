"""`weights import` of a .7z: every member name is checked before anything is unpacked (issue 9, item 3)."""

from __future__ import annotations

import os

import pytest

py7zr = pytest.importorskip("py7zr")

from deepisles.errors import DeepIslesError  # noqa: E402
from deepisles.weights.importer import extract_7z, import_weights, unsafe_member  # noqa: E402


@pytest.mark.parametrize(
    "name, why",
    [
        ("weights/SEALS/plans.pkl", None),
        ("../evil.txt", "'..'"),
        ("weights/../../evil.txt", "'..'"),
        ("/etc/cron.d/evil", "absolute"),
        ("C:/evil", "absolute"),
        ("weights\\..\\evil", "backslash"),
        ("", "empty"),
    ],
)
def test_unsafe_member_names(name, why):
    got = unsafe_member(name)
    assert (got is None) if why is None else (why in got), got


def test_links_are_refused():
    assert "link" in unsafe_member("weights/x", is_link=True)


def _archive_with(path, members: dict[str, bytes]):
    with py7zr.SevenZipFile(path, "w") as z:
        for name, data in members.items():
            z._writestr(data, name)  # the private writer: the public one (rightly) refuses these names
    return path


def test_dot_dot_member_is_refused_and_nothing_is_written_outside(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPISLES_HOME", str(tmp_path / "home"))
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    archive = _archive_with(work / "stroke_ensemble_weights.7z",
                            {"weights/NVAUTO/readme.txt": b"ok", "../../evil.txt": b"evil"})
    with pytest.raises(DeepIslesError, match=r"refusing to unpack: member '\.\./\.\./evil\.txt' contains '\.\.'"):
        import_weights(archive, ("nvauto",), say=lambda _m: None)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "a" / "evil.txt").exists()
    assert not list((tmp_path / "home").rglob("readme.txt"))  # nothing unpacked at all, temp folder removed


def test_absolute_member_is_refused(tmp_path):
    target = tmp_path / "abs-evil.txt"
    archive = _archive_with(tmp_path / "w.7z", {str(target): b"evil"})
    with pytest.raises(DeepIslesError, match="absolute path"):
        extract_7z(archive, tmp_path / "into")
    assert not target.exists()


def test_symlink_member_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    os.symlink("/etc/passwd", src / "link")
    archive = tmp_path / "w.7z"
    with py7zr.SevenZipFile(archive, "w") as z:
        z.write(src / "link", "weights/link")
    with pytest.raises(DeepIslesError, match="is a link"):
        extract_7z(archive, tmp_path / "into")
    assert not (tmp_path / "into" / "weights" / "link").exists()


def test_a_plain_archive_still_unpacks(tmp_path):
    archive = _archive_with(tmp_path / "w.7z", {"weights/x/a.txt": b"a"})
    root = extract_7z(archive, tmp_path / "into")
    assert (root / "weights" / "x" / "a.txt").read_bytes() == b"a"
