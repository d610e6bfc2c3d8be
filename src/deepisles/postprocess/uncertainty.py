"""Voxel-wise network agreement as numbers a user can act on: report.json's ``uncertainty`` section and the
per-case "review recommended" flag (docs/validation.md, "Uncertainty").

Agreement is the share of the run members' networks voting lesion per voxel (:func:`deepisles.ensemble.agreement`).
The flag is a heuristic to triage cases for a closer look, not a calibrated error estimate: its thresholds were
chosen from the geometry of the agreement map (see the docs), not fitted to expert labels.
"""

from __future__ import annotations

import numpy as np

from deepisles.io.image import Image

#: thresholds of the review rule (docs/validation.md explains each)
DISAGREEMENT_RATIO = 1.5  # disagreement volume above this multiple of the ensemble lesion volume ...
DISAGREEMENT_MIN_ML = 1.0  # ... and above this many mL
MEAN_AGREEMENT_MIN = 0.7  # mean agreement inside the ensemble mask below this
LESION_MIN_ML = 1.0  # a lesion of at least this volume ...
LESION_AGREEMENT_MIN = 0.5  # ... whose mean agreement is below this (a minority of the networks)

DEFINITION = (
    "agreement = share of the run members' networks voting lesion per voxel (lesion_agreement.nii.gz, 0-1)"
)
RULE = (
    f"review recommended when any of: (a) the disagreement volume (0 < agreement < 1) exceeds "
    f"{DISAGREEMENT_RATIO:g} x the lesion volume and {DISAGREEMENT_MIN_ML:g} mL; (b) the mean agreement inside "
    f"the lesion mask is below {MEAN_AGREEMENT_MIN:g}; (c) a lesion of >= {LESION_MIN_ML:g} mL has a mean "
    f"agreement below {LESION_AGREEMENT_MIN:g}; not assessed with fewer than 2 networks"
)


def uncertainty_summary(agreement: Image, mask: Image, networks: dict[str, int], table: list[dict]) -> dict:
    """report.json's ``uncertainty`` section from the agreement map, the ensemble mask (same grid), the networks
    counted per member and the lesion table (rows with ``volume_ml`` and ``agreement_mean``)."""
    a = np.asarray(agreement.data, dtype=np.float64)
    m = np.asarray(mask.data) > 0
    if a.shape != m.shape:
        raise ValueError(f"agreement map of shape {a.shape}, lesion mask {m.shape}")
    vox_ml = mask.voxel_volume_ml
    total = int(sum(networks.values()))
    disagreement_ml = float(np.count_nonzero((a > 0) & (a < 1)) * vox_ml)
    lesion_ml = float(np.count_nonzero(m) * vox_ml)
    mean_in_mask = float(a[m].mean()) if m.any() else None
    out = {
        "definition": DEFINITION,
        "networks": dict(networks),
        "networks_total": total,
        "disagreement_volume_ml": round(disagreement_ml, 6),
        "mean_agreement_in_mask": None if mean_in_mask is None else round(mean_in_mask, 4),
        "rule": RULE,
        "thresholds": {
            "disagreement_ratio": DISAGREEMENT_RATIO,
            "disagreement_min_ml": DISAGREEMENT_MIN_ML,
            "mean_agreement_min": MEAN_AGREEMENT_MIN,
            "lesion_min_ml": LESION_MIN_ML,
            "lesion_agreement_min": LESION_AGREEMENT_MIN,
        },
    }
    if total < 2:
        out.update(review_recommended=None, reasons=[],
                   note="one network: agreement is 0 or 1 everywhere and says nothing about uncertainty")  # fmt: skip
        return out
    reasons = []
    if disagreement_ml > max(DISAGREEMENT_RATIO * lesion_ml, DISAGREEMENT_MIN_ML):
        reasons.append(f"disagreement volume {disagreement_ml:.2f} mL exceeds {DISAGREEMENT_RATIO:g} x the lesion "
                       f"volume ({lesion_ml:.2f} mL) and {DISAGREEMENT_MIN_ML:g} mL")  # fmt: skip
    if mean_in_mask is not None and mean_in_mask < MEAN_AGREEMENT_MIN:
        reasons.append(f"mean agreement inside the lesion mask {mean_in_mask:.2f} < {MEAN_AGREEMENT_MIN:g}")
    for row in table:
        mean = row.get("agreement_mean")
        if mean is not None and row["volume_ml"] >= LESION_MIN_ML and mean < LESION_AGREEMENT_MIN:
            reasons.append(f"lesion {row['id']} ({row['volume_ml']:.2f} mL) has mean agreement {mean:.2f} "
                           f"< {LESION_AGREEMENT_MIN:g}")  # fmt: skip
    out.update(review_recommended=bool(reasons), reasons=reasons)
    return out
