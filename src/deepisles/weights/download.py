"""Download of the official DeepISLES weight archive: resumable (HTTP Range), checksum-verified.

The archive is Zenodo record 14026715, file ``stroke_ensemble_weights.7z`` (about 9.1 GB). Its checksum is
taken from the record's metadata (Zenodo API) unless given explicitly. Data goes to ``<dest>.part`` first;
an interrupted download resumes from there; the file is renamed to its final name only once its checksum
matches.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from deepisles.errors import DeepIslesError
from deepisles.progress import Progress, as_progress

ZENODO_API = "https://zenodo.org/api/records/14026715"
ARCHIVE_NAME = "stroke_ensemble_weights.7z"
CHUNK = 1 << 20


def resolve_archive(api_url: str = ZENODO_API, name: str = ARCHIVE_NAME, timeout: float = 30) -> dict:
    """URL, size and checksum ('md5:…') of ``name`` in a Zenodo record's metadata."""
    try:
        with urllib.request.urlopen(api_url, timeout=timeout) as r:
            record = json.load(r)
    except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
        raise DeepIslesError(f"cannot read the weight record {api_url}: {exc}") from None
    for f in record.get("files", []):
        if f.get("key") == name:
            url = f.get("links", {}).get("self") or f.get("links", {}).get("download")
            return {"url": url, "size": f.get("size"), "checksum": f.get("checksum")}
    raise DeepIslesError(f"{api_url}: the record has no file named {name}")


def _hasher(checksum: str):
    algo, _, digest = checksum.partition(":")
    if not digest or algo not in ("md5", "sha256"):
        raise DeepIslesError(f"checksum {checksum!r}: expected 'md5:<hex>' or 'sha256:<hex>'")
    return hashlib.new(algo), digest.lower()


def download(
    url: str,
    dest: Path,
    checksum: str,
    *,
    size: int | None = None,
    progress: Progress | None = None,
    timeout: float = 60,
) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``) and verify ``checksum``; returns ``dest``."""
    progress = as_progress(progress)
    dest = Path(dest)
    if dest.exists():
        raise DeepIslesError(f"{dest}: already exists; remove it or choose another destination")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    hasher, expected = _hasher(checksum)
    have = part.stat().st_size if part.exists() else 0
    if have:  # hash what is already there
        with open(part, "rb") as fh:
            for chunk in iter(lambda: fh.read(CHUNK), b""):
                hasher.update(chunk)
    if size is None or have < size:
        req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            resp = urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # nothing left to fetch
                resp = None
            else:
                raise DeepIslesError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise DeepIslesError(f"download of {url} failed: {exc}") from None
        if resp is not None:
            with resp:
                if have and resp.status != 206:  # server ignored Range: start over
                    have, hasher = 0, _hasher(checksum)[0]
                    mode = "wb"
                else:
                    mode = "ab"
                total = size
                if total is None and resp.headers.get("Content-Length"):
                    total = have + int(resp.headers["Content-Length"])
                with open(part, mode) as fh:
                    while True:
                        chunk = resp.read(CHUNK)
                        if not chunk:
                            break
                        fh.write(chunk)
                        hasher.update(chunk)
                        have += len(chunk)
                        progress.advance(have, total)
                    fh.flush()
                    os.fsync(fh.fileno())
    if hasher.hexdigest() != expected:
        part.unlink(missing_ok=True)
        raise DeepIslesError(
            f"{url}: checksum mismatch ({checksum.split(':')[0]} {hasher.hexdigest()} != {expected}); "
            "the partial file was removed, run the download again"
        )
    os.replace(part, dest)
    return dest
