"""deepisles.io.hashing: the one SHA-256 helper (weight store, batch records, report.json input digests)."""

from __future__ import annotations

import hashlib

from deepisles import store
from deepisles.io.hashing import sha256_file, sha256_files, sha256_path
from deepisles.outputs.report import files_sha256


def test_file_digest_is_hashlib_of_the_bytes_across_chunks(tmp_path):
    data = bytes(range(256)) * 9000  # > 2 MiB: several 1 MiB chunks
    p = tmp_path / "w.safetensors"
    p.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert sha256_file(p) == sha256_path(p) == store.sha256_file(p) == want
    assert sha256_file(str(p)) == want
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert sha256_file(empty) == hashlib.sha256(b"").hexdigest()


def test_several_files_in_order(tmp_path):
    a, b = tmp_path / "x.mhd", tmp_path / "x.raw"
    a.write_bytes(b"header")
    b.write_bytes(b"voxels")
    assert sha256_files([a, b]) == hashlib.sha256(b"headervoxels").hexdigest()
    assert sha256_files([b, a]) != sha256_files([a, b])
    assert files_sha256(a, [a, b]) == sha256_files([a, b])  # detached header: the voxels count too
    assert files_sha256(a, [a]) == sha256_file(a)


def test_folder_digest_covers_names_and_bytes(tmp_path):
    d = tmp_path / "series"
    (d / "sub").mkdir(parents=True)
    (d / "b.dcm").write_bytes(b"2")
    (d / "sub" / "a.dcm").write_bytes(b"1")
    want = hashlib.sha256(b"b.dcm2" + b"sub/a.dcm1").hexdigest()  # sorted by relative path
    assert sha256_path(d) == files_sha256(d, []) == want
    (d / "b.dcm").rename(d / "c.dcm")
    assert sha256_path(d) != want
