"""report.json: what was read, what was done, which members ran, and the lesion numbers; lesions.csv."""

from __future__ import annotations

import csv
import datetime as _dt
import io
import platform
from pathlib import Path

from deepisles import __version__
from deepisles.io.hashing import sha256_files, sha256_path


def files_sha256(path: Path, files: list[Path]) -> str:
    """SHA-256 of an input image: its file or, for a detached header (``.mhd`` with its data file), of the bytes
    of every file in order, header first - so the digest covers the voxels too. A DICOM folder is hashed as by
    :func:`deepisles.io.hashing.sha256_path` (relative names and bytes of its files)."""
    path = Path(path)
    if path.is_dir() or len(files) <= 1:
        return sha256_path(path)
    return sha256_files(files)


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
    precision: str = "fp32",
    fast: bool = False,
    lesion_location: dict | None = None,
    location: dict | None = None,
    mismatch: dict | None = None,
    uncertainty: dict | None = None,
    classical_check: dict | None = None,
) -> dict:
    """The report. ``lesion_location`` (case-level ``hemisphere``, ``lobes``, ``regions``), ``location`` and
    ``mismatch`` come from :func:`deepisles.postprocess.biomarkers.compute_biomarkers`, ``uncertainty`` (network
    agreement, review flag) from :func:`deepisles.postprocess.uncertainty.uncertainty_summary`."""
    loc = lesion_location or {}
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
            "hemisphere": loc.get("hemisphere"),
            "lobes": loc.get("lobes", []),
            "regions": loc.get("regions", []),
            "table": lesions,
        },
        "location": location,
        "mismatch": mismatch,
        "uncertainty": uncertainty,
        "classical_check": classical_check,
        "outputs": outputs,
        "device": device,
        "precision": precision,
        "fast_mode": fast,
        "warnings": warnings,
        "timing_s": {k: round(v, 3) for k, v in timing_s.items()},
    }


#: lesions.csv columns, in order (docs/biomarkers.md).
CSV_COLUMNS = (
    "id", "voxels", "volume_ml", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm", "max_extent_mm",
    "mean_adc_1e-3_mm2_s", "min_adc_1e-3_mm2_s", "hemisphere", "lobes", "regions", "atlas_unlabelled_fraction",
    "centroid_mni_x", "centroid_mni_y", "centroid_mni_z", "agreement_mean", "agreement_min",
)  # fmt: skip


def lesions_csv(table: list[dict]) -> str:
    """The per-lesion table as CSV text: one row per lesion, lists joined with ";" (regions as name:fraction);
    fields a row lacks (e.g. location when registration failed) are empty."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in table:
        out = {k: row.get(k, "") for k in CSV_COLUMNS}
        for i, axis in enumerate("xyz"):
            out[f"centroid_{axis}_mm"] = row["centroid_mm"][i] if "centroid_mm" in row else ""
            out[f"centroid_mni_{axis}"] = row["centroid_mni"][i] if row.get("centroid_mni") else ""
        out["lobes"] = ";".join(row.get("lobes") or [])
        out["regions"] = ";".join(f"{r['name']}:{r['fraction']}" for r in row.get("regions") or [])
        out["hemisphere"] = row.get("hemisphere") or ""
        writer.writerow(out)
    return buf.getvalue()
