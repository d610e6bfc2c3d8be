"""DeepISLES majority vote and the member interface."""

from __future__ import annotations

import numpy as np
import pytest

from deepisles.ensemble import combine
from deepisles.errors import DeepIslesError
from deepisles.io.image import Image
from deepisles.members import Case, Member, MemberResult, MemberUnavailable, resolve_members


def _res(name, mask, prob=None):
    mask = np.asarray(mask, dtype=np.uint8)
    prob = mask.astype(np.float32) if prob is None else np.asarray(prob, dtype=np.float32)
    return MemberResult(name, prob, mask)


def test_three_members_need_two_votes():
    a = _res("a", [1, 1, 0, 0, 1])
    b = _res("b", [1, 0, 1, 0, 0])
    c = _res("c", [0, 1, 1, 0, 0])
    mask, prob, rule = combine([a, b, c])
    assert mask.tolist() == [1, 1, 1, 0, 0]
    np.testing.assert_allclose(prob, [2 / 3, 2 / 3, 2 / 3, 0, 1 / 3])
    assert "majority" in rule


def test_single_member_is_its_own_mask():
    a = _res("a", [0, 1, 1], prob=[0.2, 0.9, 0.6])
    mask, prob, _ = combine([a])
    assert mask.tolist() == [0, 1, 1]
    np.testing.assert_allclose(prob, [0.2, 0.9, 0.6])


def test_two_members_tie_broken_by_mean_probability():
    a = _res("a", [1, 1, 0, 1], prob=[0.9, 0.95, 0.1, 0.55])
    b = _res("b", [1, 0, 0, 0], prob=[0.8, 0.2, 0.3, 0.1])
    mask, _, _ = combine([a, b])
    # agree -> 1; disagree: (0.95+0.2)/2=0.575 -> 1, (0.55+0.1)/2=0.325 -> 0
    assert mask.tolist() == [1, 1, 0, 0]


def test_combine_needs_results():
    with pytest.raises(ValueError):
        combine([])


class _NeedsFlair(Member):
    name = "needsflair"
    modalities = ("dwi", "adc", "flair")
    required = ("dwi", "adc", "flair")

    def preprocess(self, case, label=None):  # pragma: no cover - never reached without FLAIR
        raise AssertionError("preprocess ran without the required FLAIR")

    def infer(self, x):  # pragma: no cover
        raise AssertionError

    def export(self, output, context):  # pragma: no cover
        raise AssertionError


def test_member_without_required_modality_is_unavailable():
    img = Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    case = Case(dwi=img, adc=img, brain=np.ones((4, 4, 4), bool))
    with pytest.raises(MemberUnavailable, match="FLAIR"):
        _NeedsFlair().run(case)


def test_resolve_members_auto_falls_back_to_classical_and_says_why():
    members, skipped = resolve_members("auto")
    assert [m.name for m in members] == ["classical"]
    assert "no trained weights" in members[0].description
    assert {s["member"] for s in skipped} == {"seals", "nvauto", "factorizer"}
    assert all(s["reason"] for s in skipped)


def test_resolve_members_rejects_unknown_and_unavailable():
    with pytest.raises(DeepIslesError, match="unknown member"):
        resolve_members("classical,bogus")
    with pytest.raises(DeepIslesError, match="none of the requested members"):
        resolve_members("seals")
    members, skipped = resolve_members("classical,seals")
    assert [m.name for m in members] == ["classical"] and skipped[0]["member"] == "seals"


def _at(name, prob, t):
    prob = np.asarray(prob, dtype=np.float32)
    return MemberResult(name, prob, (prob >= t).astype(np.uint8), threshold=t)


def test_member_thresholds_two_members_at_t_is_mean_probability_at_t():
    """The ensemble docstring: two members at the same decision threshold t vote exactly 'mean probability >= t'."""
    rng = np.random.default_rng(0)
    for t in (0.3, 0.5, 0.7):
        p1, p2 = rng.random(2000).astype(np.float32), rng.random(2000).astype(np.float32)
        mask, prob, rule = combine([_at("seals", p1, t), _at("nvauto", p2, t)])
        assert np.array_equal(mask > 0, prob >= np.float32(t))
        assert (f"seals >= {t:g}" in rule and f"ties broken by mean probability >= {t:g}" in rule) == (t != 0.5)


def test_member_thresholds_three_members_majority_of_own_decisions():
    p = np.array([[0.35, 0.35, 0.2, 0.6], [0.35, 0.1, 0.45, 0.45], [0.9, 0.1, 0.45, 0.1]], dtype=np.float32)
    res = [_at("a", p[0], 0.3), _at("b", p[1], 0.3), _at("c", p[2], 0.5)]
    mask, _, rule = combine(res)
    assert mask.tolist() == [1, 0, 0, 1]  # votes: 3; 1 (a); 1 (b: 0.45 >= 0.3, c: 0.45 < 0.5); 2 (a, b)
    assert "c >= 0.5" in rule and "ties" not in rule


def test_all_thresholds_at_one_half_keep_the_deepisles_rule():
    a, b = _at("a", [0.9, 0.6, 0.4], 0.5), _at("b", [0.1, 0.45, 0.1], 0.5)
    mask, _, rule = combine([a, b])
    assert mask.tolist() == [1, 1, 0]  # mean 0.5, 0.525, 0.25
    from deepisles.ensemble import RULE

    assert rule == RULE
