"""Weight download against a local HTTP server: Zenodo-style metadata, Range resume, checksum."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deepisles.errors import DeepIslesError
from deepisles.weights.download import ARCHIVE_NAME, download, resolve_archive

PAYLOAD = bytes(range(256)) * 4096 + b"tail"  # ~1 MB


class _Handler(BaseHTTPRequestHandler):
    ranges: list[str] = []

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):  # noqa: N802
        port = self.server.server_address[1]
        if self.path.startswith("/api/records/"):
            body = json.dumps({
                "files": [{
                    "key": ARCHIVE_NAME,
                    "size": len(PAYLOAD),
                    "checksum": "md5:" + hashlib.md5(PAYLOAD).hexdigest(),
                    "links": {"self": f"http://127.0.0.1:{port}/files/{ARCHIVE_NAME}"},
                }]
            }).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        rng = self.headers.get("Range")
        _Handler.ranges.append(rng)
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        body = PAYLOAD[start:]
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture()
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    _Handler.ranges = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_resolve_reads_zenodo_metadata(server):
    info = resolve_archive(f"{server}/api/records/14026715")
    assert info["url"].endswith(ARCHIVE_NAME)
    assert info["size"] == len(PAYLOAD)
    assert info["checksum"] == "md5:" + hashlib.md5(PAYLOAD).hexdigest()


def test_download_resumes_from_partial_file(server, tmp_path):
    info = resolve_archive(f"{server}/api/records/14026715")
    dest = tmp_path / ARCHIVE_NAME
    (tmp_path / (ARCHIVE_NAME + ".part")).write_bytes(PAYLOAD[:300_000])
    from deepisles.progress import Recorder

    rec = Recorder()
    out = download(info["url"], dest, info["checksum"], size=info["size"], progress=rec)
    assert out.read_bytes() == PAYLOAD
    assert _Handler.ranges == ["bytes=300000-"]
    assert rec.advances[-1][0] == len(PAYLOAD)
    assert not (tmp_path / (ARCHIVE_NAME + ".part")).exists()


def test_download_rejects_bad_checksum_and_leaves_no_file(server, tmp_path):
    dest = tmp_path / ARCHIVE_NAME
    with pytest.raises(DeepIslesError, match="checksum mismatch"):
        download(f"{server}/files/{ARCHIVE_NAME}", dest, "md5:" + "0" * 32)
    assert not dest.exists() and not (tmp_path / (ARCHIVE_NAME + ".part")).exists()


def test_download_sha256_and_refuses_existing(server, tmp_path):
    dest = tmp_path / "w.7z"
    download(f"{server}/files/x", dest, "sha256:" + hashlib.sha256(PAYLOAD).hexdigest())
    assert dest.stat().st_size == len(PAYLOAD)
    with pytest.raises(DeepIslesError, match="already exists"):
        download(f"{server}/files/x", dest, "sha256:" + hashlib.sha256(PAYLOAD).hexdigest())


def test_unreachable_server_is_a_clear_error(tmp_path):
    with pytest.raises(DeepIslesError, match="cannot read"):
        resolve_archive("http://127.0.0.1:9/api/records/1", timeout=2)
