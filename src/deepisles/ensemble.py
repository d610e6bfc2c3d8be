"""Combining member outputs: the DeepISLES majority vote.

Rule (DeepISLES, de la Rosa et al. 2025): a voxel is lesion when a strict majority of the members' binary
masks say so (>= 2 of 3). One member alone: its own mask. With an even number of members a tie (exactly
half) is broken by the mean of the members' probabilities (lesion when >= 0.5); for two members that
means: lesion where both agree, and where they disagree, where their mean probability is >= 0.5.
The ensemble probability written to ``lesion_prob.nii.gz`` is the mean of the member probabilities.
"""

from __future__ import annotations

import numpy as np

from deepisles.members.base import MemberResult

RULE = (
    "voxel-wise strict majority of the member masks; one member: its own mask; "
    "ties (even member count) broken by mean probability >= 0.5"
)


def combine(results: list[MemberResult]) -> tuple[np.ndarray, np.ndarray, str]:
    """Ensemble (mask uint8, probability float32, rule description) from the members' results."""
    if not results:
        raise ValueError("no member results to combine")
    probs = np.stack([r.probability for r in results]).astype(np.float32)
    prob = probs.mean(axis=0)
    if len(results) == 1:
        return results[0].mask.astype(np.uint8), prob, "single member: its own mask"
    votes = np.sum([r.mask.astype(np.uint8) for r in results], axis=0)
    n = len(results)
    mask = 2 * votes > n
    if n % 2 == 0:
        mask |= (2 * votes == n) & (prob >= 0.5)
    return mask.astype(np.uint8), prob, RULE
