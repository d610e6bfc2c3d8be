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
