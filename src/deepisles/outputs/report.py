"""report.json: what was read, what was done, which members ran, and the lesion numbers."""

from __future__ import annotations

import datetime as _dt
import hashlib
import platform
from pathlib import Path

from deepisles import __version__


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, or of a folder's files (sorted by relative path) for a DICOM series."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def build_report(
    *,
    inputs: dict[str, dict],
    preprocessing: dict,
    members_run: list[dict],
    members_skipped: list[dict],
    ensemble_rule: str,
    summary: dict,
    lesions: list[dict],
    outputs: dict[str, str],
    warnings: list[str],
    timing_s: dict[str, float],
    device: str,
    fast: bool = False,
) -> dict:
    return {
        "tool": {"name": "deepisles", "version": __version__, "python": platform.python_version()},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": inputs,
        "preprocessing": preprocessing,
        "members": {"run": members_run, "skipped": members_skipped},
        "ensemble": {"rule": ensemble_rule, "members": [m["name"] for m in members_run]},
        "lesions": {
            "volume_ml": summary["volume_ml"],
            "count": summary["count"],
            "voxels": summary["voxels"],
            "connectivity": 26,
            "table": lesions,
        },
        "outputs": outputs,
        "device": device,
        "fast_mode": fast,
        "warnings": warnings,
        "timing_s": {k: round(v, 3) for k, v in timing_s.items()},
    }
