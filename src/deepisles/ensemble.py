"""Combining member outputs: the DeepISLES majority vote.

Rule (DeepISLES, de la Rosa et al. 2025): a voxel is lesion when a strict majority of the members' binary
masks say so (>= 2 of 3). One member alone: its own mask. With an even number of members a tie (exactly
half) is broken by the mean of the members' probabilities (lesion when >= 0.5); for two members that
means: lesion where both agree, and where they disagree, where their mean probability is >= 0.5.
The ensemble probability written to ``lesion_prob.nii.gz`` is the mean of the member probabilities.

Each member's mask is its probability >= its decision threshold (``MemberResult.threshold``): 0.5 for the
official models and the classical member. A model may set another (the packaged default SEALS and NVAUTO,
``settings.decision_threshold``); the tie-break then uses the mean of the members' thresholds, so that for two
members at the same threshold ``t`` the rule is exactly "mean probability >= t". With every threshold at 0.5
the rule is DeepISLES' unchanged.

Agreement (``lesion_agreement.nii.gz``): per voxel, the share of all networks of the run members that vote lesion
(each network decided by its member's rule on its own; a member without several networks is one vote), pooled
over the members: with the official weights 5 SEALS folds + 15 NVAUTO models + 10 FACTORIZER models = 30.
"""

from __future__ import annotations

import numpy as np

from deepisles.members.base import MemberResult

RULE = (
    "voxel-wise strict majority of the member masks; one member: its own mask; "
    "ties (even member count) broken by mean probability >= 0.5"
)


def tie_threshold(results: list[MemberResult]) -> float:
    """The mean probability that breaks a tie: the mean of the members' decision thresholds (0.5 for DeepISLES)."""
    return float(np.mean([r.threshold for r in results]))


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
    tie = tie_threshold(results)
    if n % 2 == 0:
        mask |= (2 * votes == n) & (prob >= np.float32(tie))
    if all(r.threshold == 0.5 for r in results):
        return mask.astype(np.uint8), prob, RULE
    each = ", ".join(f"{r.name} >= {r.threshold:g}" for r in results)
    ties = f"; ties broken by mean probability >= {tie:g}" if n % 2 == 0 else ""
    return mask.astype(np.uint8), prob, f"voxel-wise strict majority of the member masks ({each}){ties}"


def agreement(results: list[MemberResult]) -> tuple[np.ndarray, dict[str, int]]:
    """(float32 share in [0, 1] of the members' networks voting lesion per voxel, networks counted per member)."""
    if not results:
        raise ValueError("no member results to combine")
    shape = results[0].mask.shape
    total = np.zeros(shape, dtype=np.uint16)
    networks: dict[str, int] = {}
    for r in results:
        votes = np.asarray(r.votes)
        if votes.shape != shape:
            raise ValueError(f"member {r.name}: votes of shape {votes.shape}, the other members' {shape}")
        if r.networks < 1 or int(votes.max(initial=0)) > r.networks:
            raise ValueError(f"member {r.name}: vote count above its {r.networks} network(s)")
        total += votes
        networks[r.name] = int(r.networks)
    return (total / np.float64(sum(networks.values()))).astype(np.float32), networks
