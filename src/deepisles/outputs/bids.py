"""BIDS-derivative file names, JSON sidecars, dataset_description.json and the cohort table.

Follows BIDS 1.10 "Derivatives": masks ``<source_entities>[_space-<space>][_res-][_label-][_desc-]_mask.nii.gz``
and probabilistic segmentations ``<source_entities>[_space-<space>]...[_label-][_desc-]_probseg.nii.gz`` in
the ``dwi/`` folder of the subject/session; ``space-orig`` because no transformation took place (the native
DWI grid); sidecar fields ``Type`` (masks), ``Sources`` (BIDS URIs), ``SpatialReference``, ``Description``.
The deepisles-specific fields sit under the ``deepisles`` key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from deepisles import __version__

BIDS_VERSION = "1.10.0"
PIPELINE = "deepisles"
RAW = "raw"  # dataset name of the raw dataset in BIDS URIs (bids:raw:sub-X/...) and DatasetLinks
COHORT_COLUMNS = (
    "participant_id", "session_id", "status", "volume_ml", "count", "hemisphere", "lobes", "rsi",
    "likely_within_4_5h", "members", "error",
)  # fmt: skip
BIDSIGNORE = ("cohort.tsv", "failures.jsonl", "*_report.json")


@dataclass(frozen=True)
class CaseNames:
    """File names of one case's derivatives: ``sub-X[/ses-Y]/dwi/sub-X[_ses-Y]_..."""

    subject: str  # "sub-X"
    session: str | None  # "ses-Y" or None

    @property
    def stem(self) -> str:
        return self.subject if self.session is None else f"{self.subject}_{self.session}"

    @property
    def folder(self) -> Path:
        """Relative to the derivative root; holds this case's files and nothing else."""
        base = Path(self.subject) / self.session if self.session else Path(self.subject)
        return base / "dwi"

    @property
    def mask(self) -> str:
        return f"{self.stem}_space-orig_desc-lesion_mask.nii.gz"

    @property
    def mask_json(self) -> str:
        return f"{self.stem}_space-orig_desc-lesion_mask.json"

    @property
    def probseg(self) -> str:
        return f"{self.stem}_space-orig_desc-lesion_probseg.nii.gz"

    @property
    def probseg_json(self) -> str:
        return f"{self.stem}_space-orig_desc-lesion_probseg.json"

    @property
    def agreement(self) -> str:
        """Share of the networks voting lesion per voxel (deepisles' lesion_agreement.nii.gz)."""
        return f"{self.stem}_space-orig_desc-agreement_probseg.nii.gz"

    @property
    def report(self) -> str:
        return f"{self.stem}_desc-deepisles_report.json"


def code_url() -> str | None:
    """The project URL from the installed package metadata (``[project.urls]``), if any."""
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        meta = metadata("deepisles")
    except PackageNotFoundError:  # pragma: no cover - source tree without install
        return None
    for entry in meta.get_all("Project-URL") or []:
        return entry.split(",", 1)[-1].strip()
    return meta.get("Home-page") or None


def raw_link(raw_root: Path, outroot: Path) -> str:
    """Where the raw dataset is, as seen from the derivative root: a relative path, else a file URI."""
    try:
        return Path(os.path.relpath(raw_root.resolve(), outroot.resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return raw_root.resolve().as_uri()


def bids_uri(path: Path, raw_root: Path) -> str:
    """``bids:raw:<path inside the raw dataset>``; a file URI for a file outside it."""
    try:
        return f"bids:{RAW}:{path.resolve().relative_to(raw_root.resolve()).as_posix()}"
    except ValueError:
        return path.resolve().as_uri()


def dataset_description(link: str) -> dict:
    generated: dict = {"Name": PIPELINE, "Version": __version__,
                       "Description": "DeepISLES ensemble acute ischemic stroke lesion segmentation (DWI + ADC "
                                      "[+ FLAIR]), majority vote of the members run"}  # fmt: skip
    url = code_url()
    if url:
        generated["CodeURL"] = url
    return {
        "Name": "deepisles acute ischemic stroke lesion segmentations",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "SourceDatasets": [{"URL": link}],
        "DatasetLinks": {RAW: link},
    }


def _members(report: dict) -> dict:
    return {
        "members_run": [m["name"] for m in report["members"]["run"]],
        "members_skipped": report["members"]["skipped"],
        "ensemble_rule": report["ensemble"]["rule"],
    }


def mask_sidecar(report: dict, sources: list[str], checksums: dict[str, str]) -> dict:
    """Sidecar of the lesion mask; ``checksums`` (file name -> SHA-256) covers the case's other files, so this
    sidecar, written last, is also the record that the case is complete."""
    lz = report["lesions"]
    return {
        "Type": "Lesion",
        "Description": "Acute ischemic lesion (binary, 1 = lesion) on the native DWI grid: DeepISLES ensemble "
                       "majority vote of " + ", ".join(_members(report)["members_run"]),
        "Sources": sources,
        "SpatialReference": "orig",
        "deepisles": {
            "version": report["tool"]["version"],
            **_members(report),
            "volume_ml": lz["volume_ml"],
            "count": lz["count"],
            "connectivity": lz.get("connectivity", 26),
            "device": report.get("device"),
            "fast_mode": report.get("fast_mode"),
            "sha256": checksums,
        },
    }


def probseg_sidecar(report: dict, sources: list[str]) -> dict:
    return {
        "Description": "Acute ischemic lesion probability (0-1, mean of the member probabilities) on the native "
                       "DWI grid",
        "Sources": sources,
        "SpatialReference": "orig",
        "deepisles": {"version": report["tool"]["version"], **_members(report)},
    }


def _cell(value: object) -> str:
    """A TSV cell: ``n/a`` for missing, lists joined by commas, dicts as ``key=value``."""
    if value is None or value == "":
        return "n/a"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return ",".join(f"{k}={_cell(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(_cell(v) for v in value) or "n/a"
    return " ".join(str(value).replace("\t", " ").split())


def cohort_row(
    names: CaseNames, status: str, sidecar: dict | None = None, report: dict | None = None, error: str | None = None
) -> dict[str, str]:
    """One cohort.tsv row; reads the optional report parts (hemisphere, lobes, mismatch) with ``.get``."""
    dz = (sidecar or {}).get("deepisles", {})
    lz = (report or {}).get("lesions", {}) or {}
    mm = (report or {}).get("mismatch", {}) or {}
    values = {
        "participant_id": names.subject,
        "session_id": names.session,
        "status": status,
        "volume_ml": dz.get("volume_ml"),
        "count": dz.get("count"),
        "hemisphere": lz.get("hemisphere"),
        "lobes": lz.get("lobes"),
        "rsi": mm.get("rsi"),
        "likely_within_4_5h": mm.get("likely_within_4_5h"),
        "members": dz.get("members_run"),
        "error": error,
    }
    return {k: _cell(values[k]) for k in COHORT_COLUMNS}


def cohort_tsv(rows: list[dict[str, str]]) -> str:
    lines = ["\t".join(COHORT_COLUMNS)] + ["\t".join(r[c] for c in COHORT_COLUMNS) for r in rows]
    return "\n".join(lines) + "\n"
