"""The guard against an ensemble worse than a threshold (issue 11, item 3): every case compares the ensemble with the
classical member (report.json ``classical_check``) and warns when they disagree strongly."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from deepisles import pipeline
from deepisles.members.base import Context, Member
from deepisles.members.classical import ClassicalMember
from deepisles.postprocess.classical_check import (
    DICE_BELOW,
    MIN_VOLUME_ML,
    RATIO_ABOVE,
    compare_with_classical,
)
from small_case import case_arrays


def _box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = True
    return m


@pytest.mark.parametrize(
    ("a_box", "b_box", "fires"),
    [
        (((0, 0, 0), (10, 10, 10)), ((0, 0, 0), (10, 10, 10)), False),  # identical
        (((0, 0, 0), (10, 10, 10)), ((20, 20, 20), (30, 30, 30)), True),  # disjoint, 1 mL each
        (((0, 0, 0), (10, 10, 10)), ((0, 0, 0), (10, 10, 1)), True),  # nested, 10x smaller
        (((0, 0, 0), (10, 10, 10)), ((0, 0, 0), (10, 10, 5)), False),  # half: Dice 0.67, ratio 2
        (((0, 0, 0), (2, 2, 2)), ((20, 20, 20), (22, 22, 22)), False),  # disjoint but tiny (8 uL each)
    ],
)
def test_compare_with_classical_matches_numpy(a_box, b_box, fires):
    shape, voxel_ml = (32, 32, 32), 0.001
    a, b = _box(shape, *a_box), _box(shape, *b_box)
    check = compare_with_classical(a, b, voxel_ml)
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    va, vb = a.sum() * voxel_ml, b.sum() * voxel_ml
    assert check["dice"] == pytest.approx(dice, abs=1e-4)
    assert (check["ensemble_volume_ml"], check["classical_volume_ml"]) == (pytest.approx(va), pytest.approx(vb))
    expected = bool(max(va, vb) >= MIN_VOLUME_ML and (dice < DICE_BELOW or max(va, vb) > RATIO_ABOVE * min(va, vb)))
    assert check["disagree"] is expected is fires
    assert bool(check["reasons"]) is fires and str(DICE_BELOW) in check["rule"]


def test_both_empty_agree():
    z = np.zeros((8, 8, 8), bool)
    check = compare_with_classical(z, z, 0.008)
    assert check["dice"] == 1.0 and not check["disagree"]


class _Fixed(Member):
    """A member whose mask is given (a stand-in for a network ensemble)."""

    name = "fixed"

    def __init__(self, mask: np.ndarray):
        self.mask = mask.astype(np.float32)

    def preprocess(self, case, label=None):
        return None, Context(shape=tuple(case.dwi.shape))

    def infer(self, x):
        return None

    def export(self, output, context):
        return self.result(self.mask, context)


def _files(tmp_path):
    dwi, adc = case_arrays()
    paths = []
    for name, arr in (("dwi", dwi), ("adc", adc)):
        p = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 2.0, 1.0])), str(p))
        paths.append(p)
    return pipeline.InputFiles(*paths)


def _run(files, member):
    opts = pipeline.RunOptions(members="classical")
    return pipeline.run_case(files, opts, members=pipeline.MemberSet([member], []))


def test_an_ensemble_far_from_the_threshold_is_flagged_in_the_report(tmp_path):
    files = _files(tmp_path)
    wrong = np.zeros((40, 44, 30), bool)
    wrong[5:15, 5:15, 5:15] = True  # 8 mL away from the planted lesion
    result = _run(files, _Fixed(wrong))
    check = result.report["classical_check"]
    classical = ClassicalMember().run(pipeline.prepare_case(pipeline.validate(files, pipeline.RunOptions(),
                                                                              pipeline.Trace(), pipeline.Silent()),
                                                            pipeline.RunOptions(), pipeline.Trace(),
                                                            pipeline.Silent()))  # fmt: skip
    expected = compare_with_classical(wrong, classical.mask, 0.008)
    assert check == expected and check["disagree"]
    assert any("disagree strongly" in w for w in result.report["warnings"])


def test_an_ensemble_that_matches_the_threshold_is_not_flagged(tmp_path):
    files = _files(tmp_path)
    first = _run(files, ClassicalMember())
    assert first.report["classical_check"] is None  # the classical member alone: nothing to compare
    same = _run(files, _Fixed(first.mask.data > 0))
    check = same.report["classical_check"]
    assert check["dice"] == 1.0 and not check["disagree"]
    assert not any("disagree strongly" in w for w in same.report["warnings"])
