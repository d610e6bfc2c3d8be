"""A guard against a network ensemble that is worse than a threshold: on every case the ensemble mask is compared
with the classical threshold member's mask (docs/classical-member.md), and a strong disagreement is a warning.

The classical member needs no weights and is cheap (about a second per case); when it is not one of the members
that ran, it is run here on the same ``Case`` for the comparison only (it never enters the vote). The report's
``classical_check`` section holds both volumes, their Dice and whether the rule fired.

Rule (stated in the report and docs/validation.md): *strong disagreement* when the Dice of the two masks is below
``DICE_BELOW`` while at least one of them holds ``MIN_VOLUME_ML`` or more, or when one volume is more than
``RATIO_ABOVE`` times the other and the larger is ``MIN_VOLUME_ML`` or more. The thresholds are set by reasoning,
not calibrated: the classical member itself scores Dice ~0.2-0.4 on real ISLES'22 scans, so only a near-total
disagreement is flagged; it tells the user that the default is unsure, it does not say which mask is right.
"""

from __future__ import annotations

import numpy as np

DICE_BELOW = 0.1
RATIO_ABOVE = 5.0
MIN_VOLUME_ML = 1.0
RULE = (
    f"strong disagreement when Dice(ensemble, classical) < {DICE_BELOW} with either volume >= {MIN_VOLUME_ML:g} mL, "
    f"or when one volume is more than {RATIO_ABOVE:g}x the other and the larger is >= {MIN_VOLUME_ML:g} mL"
)


def compare_with_classical(ensemble_mask: np.ndarray, classical_mask: np.ndarray, voxel_ml: float) -> dict:
    """The report's ``classical_check``: volumes (mL), Dice (1.0 when both are empty), ``disagree`` and why."""
    a = np.asarray(ensemble_mask) > 0
    b = np.asarray(classical_mask) > 0
    va, vb = float(a.sum()) * voxel_ml, float(b.sum()) * voxel_ml
    total = int(a.sum() + b.sum())
    dice = 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total
    big = max(va, vb)
    reasons = []
    if dice < DICE_BELOW and big >= MIN_VOLUME_ML:
        reasons.append(f"Dice {dice:.2f} < {DICE_BELOW}")
    small = min(va, vb)
    if big >= MIN_VOLUME_ML and big > RATIO_ABOVE * small:
        reasons.append(f"volumes {va:.2f} vs {vb:.2f} mL differ more than {RATIO_ABOVE:g}x")
    return {
        "ensemble_volume_ml": round(va, 4),
        "classical_volume_ml": round(vb, 4),
        "dice": round(dice, 4),
        "disagree": bool(reasons),
        "reasons": reasons,
        "rule": RULE,
    }


def warning_text(check: dict) -> str:
    return (
        "the ensemble and the classical threshold member disagree strongly ("
        + "; ".join(check["reasons"])
        + "): the result is uncertain, check the mask against the DWI/ADC (report.json classical_check)"
    )
