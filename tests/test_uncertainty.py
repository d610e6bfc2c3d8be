"""Network agreement (lesion_agreement.nii.gz), per-lesion agreement, report.json "uncertainty" and the review flag.

Expected numbers are computed here in numpy/scipy from the planted per-network votes, not by the code under test.
"""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from deepisles.ensemble import agreement
from deepisles.io.image import Image
from deepisles.members.base import Context, Member, MemberResult, VoteCount
from deepisles.postprocess import uncertainty as unc
from deepisles.postprocess.lesions import lesion_table

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])  # 8 mm^3 voxels: 125 voxels per mL


def _res(name: str, votes: np.ndarray, networks: int) -> MemberResult:
    votes = np.asarray(votes, dtype=np.uint8)
    mask = (2 * votes > networks).astype(np.uint8)
    return MemberResult(name, mask.astype(np.float32), mask, votes=votes, networks=networks)


def test_agreement_is_the_share_of_all_networks():
    rng = np.random.default_rng(0)
    shape = (7, 6, 5)
    a, b, c = rng.integers(0, 6, shape), rng.integers(0, 16, shape), rng.integers(0, 11, shape)
    got, nets = agreement([_res("seals", a, 5), _res("nvauto", b, 15), _res("factorizer", c, 10)])
    assert nets == {"seals": 5, "nvauto": 15, "factorizer": 10}
    assert got.dtype == np.float32
    expected = (a.astype(np.float64) + b + c) / 30.0
    np.testing.assert_array_equal(got, expected.astype(np.float32))


def test_a_result_without_votes_is_one_network_voting_its_mask():
    mask = np.array([0, 1, 1, 0], np.uint8)
    r = MemberResult("classical", mask.astype(np.float32), mask)
    assert r.networks == 1 and r.votes.tolist() == [0, 1, 1, 0]
    got, nets = agreement([r, _res("x", [0, 1, 2, 3], 3)])
    np.testing.assert_allclose(got, [0, 2 / 4, 3 / 4, 3 / 4])
    assert nets == {"classical": 1, "x": 3}


def test_bad_votes_are_refused():
    with pytest.raises(ValueError, match="above its 2 network"):
        agreement([_res("x", [0, 3], 2)])
    with pytest.raises(ValueError, match="shape"):
        agreement([_res("x", [0, 1], 2), _res("y", [0, 1, 1], 2)])
    with pytest.raises(ValueError, match="no member"):
        agreement([])
    votes = VoteCount()
    votes.add(np.zeros(3, bool))
    with pytest.raises(ValueError, match="shape"):
        votes.add(np.zeros(4, bool))


def _ball(shape, centre, radius) -> np.ndarray:
    grid = np.indices(shape).astype(np.float64)
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2


def _summary(agree: np.ndarray, mask: np.ndarray, networks: dict) -> tuple[dict, list[dict]]:
    a, m = Image(agree.astype(np.float32), AFFINE), Image(mask.astype(np.uint8), AFFINE)
    table = lesion_table(m, None, a)
    return unc.uncertainty_summary(a, m, networks, table), table


def test_summary_and_lesion_agreement_equal_numpy():
    shape = (40, 40, 30)
    rng = np.random.default_rng(1)
    big, small = _ball(shape, (12, 12, 12), 6), _ball(shape, (30, 30, 20), 3)
    mask = big | small
    agree = np.where(mask, rng.integers(10, 31, shape) / 30.0, 0.0)
    shell = _ball(shape, (12, 12, 12), 8) & ~mask
    agree[shell] = rng.integers(1, 10, int(shell.sum())) / 30.0
    agree = agree.astype(np.float32)
    s, table = _summary(agree, mask, {"seals": 5, "nvauto": 15, "factorizer": 10})

    vox_ml = 8 / 1000
    a = agree.astype(np.float64)
    assert s["networks_total"] == 30
    assert s["disagreement_volume_ml"] == pytest.approx(np.count_nonzero((a > 0) & (a < 1)) * vox_ml, abs=1e-6)
    assert s["mean_agreement_in_mask"] == pytest.approx(a[mask].mean(), abs=1e-4)
    labels, n = ndi.label(mask, structure=np.ones((3, 3, 3)))
    assert n == 2 and len(table) == 2
    for row in table:  # rows largest first; match each to scipy's label by its voxel count
        k = [lab for lab in (1, 2) if (labels == lab).sum() == row["voxels"]][0]
        assert row["agreement_mean"] == pytest.approx(a[labels == k].mean(), abs=1e-4)
        assert row["agreement_min"] == pytest.approx(a[labels == k].min(), abs=1e-4)


def _flag(agree, mask, networks=None):
    return _summary(agree, mask, networks or {"a": 10, "b": 10})[0]


def test_review_flag_fires_on_each_rule_and_not_on_a_confident_case():
    shape = (40, 40, 40)
    lesion = _ball(shape, (20, 20, 20), 6)  # 925 voxels = 7.4 mL
    inside = np.where(lesion, 1.0, 0.0)

    confident = inside.copy()
    confident[_ball(shape, (20, 20, 20), 7) & ~lesion] = 0.2  # a thin boundary shell of disagreement
    s = _flag(confident, lesion)
    assert s["review_recommended"] is False and s["reasons"] == []
    assert 0 < s["disagreement_volume_ml"] < s["mean_agreement_in_mask"] * 7.4

    wide = inside.copy()  # (a) many networks see a much larger lesion than the ensemble mask
    wide[_ball(shape, (20, 20, 20), 12) & ~lesion] = 0.3
    s = _flag(wide, lesion)
    assert s["review_recommended"] is True and any("disagreement volume" in r for r in s["reasons"])

    weak = np.where(lesion, 0.6, 0.0)  # (b) mean agreement inside the mask 0.6 < 0.7
    s = _flag(weak, lesion)
    assert s["review_recommended"] is True and any("mean agreement inside" in r for r in s["reasons"])
    assert not any(r.startswith("lesion ") for r in s["reasons"])  # 0.6 >= 0.5: rule (c) stays quiet

    second = _ball(shape, (20, 20, 33), 4)  # (c) a 2.1 mL lesion only 40 % of the networks vote for
    both = lesion | second
    mixed = np.where(lesion, 1.0, 0.0) + np.where(second, 0.4, 0.0)
    s = _flag(mixed, both)
    assert any(r.startswith("lesion 2 ") and "0.40" in r for r in s["reasons"]), s["reasons"]

    tiny = np.zeros(shape, bool)  # below 1 mL a weak lesion does not fire (c)
    tiny[20:22, 20:22, 20:22] = True
    s = _flag(np.where(tiny, 0.4, 0.0) + np.where(lesion, 1.0, 0.0), tiny | lesion)
    assert not any(r.startswith("lesion ") for r in s["reasons"])

    s = _flag(np.zeros(shape), np.zeros(shape, bool))  # nothing anywhere: no flag
    assert s["review_recommended"] is False and s["mean_agreement_in_mask"] is None


def test_one_network_is_not_assessed():
    shape = (10, 10, 10)
    mask = _ball(shape, (5, 5, 5), 3)
    s = _flag(mask.astype(float), mask, {"classical": 1})
    assert s["review_recommended"] is None and "one network" in s["note"]


# --- segment end to end with members of known votes ---------------------------------------------------------
class PlantedMember(Member):
    """A member whose networks vote planted balls (radius per network) around the grid centre."""

    modalities = required = ("dwi", "adc")

    def __init__(self, name: str, radii: list[float]):
        self.name, self.radii, self.last_info = name, radii, {}

    def preprocess(self, case, label=None):
        return None, Context(tuple(case.dwi.shape))

    def infer(self, x):
        return x

    def export(self, output, context):
        votes = VoteCount()
        centre = [(s - 1) / 2 for s in context.shape]
        balls = [_ball(context.shape, centre, r) for r in self.radii]
        for b in balls:
            votes.add(b)
        return self.result(np.mean(balls, axis=0), context, votes)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from deepisles.synth import generate_case

    case = generate_case(3, lesion=True, with_flair=False)
    d = tmp_path_factory.mktemp("planted")
    nib.save(case.dwi.to_nifti(), d / "dwi.nii.gz")
    nib.save(case.adc.to_nifti(), d / "adc.nii.gz")
    members = [PlantedMember("a", [4, 5, 6]), PlantedMember("b", [5, 9])]
    return d, members, case.dwi.shape


def _segment(planted, monkeypatch, **kw):
    import deepisles.members as members_mod
    from deepisles.api import segment

    d, members, _ = planted
    monkeypatch.setattr(members_mod, "resolve_members", lambda *a, **k: (list(members), []))
    return segment(d / "dwi.nii.gz", d / "adc.nii.gz", outdir=d / "out", device="cpu", **kw)


def test_segment_writes_lists_and_reports_the_agreement(planted, monkeypatch):
    d, _, shape = planted
    res = _segment(planted, monkeypatch, skull_strip="none", preview=False, html=True)
    out = d / "out"
    centre = [(s - 1) / 2 for s in shape]
    votes = sum(_ball(shape, centre, r).astype(int) for r in (4, 5, 6, 5, 9))
    expected = (votes / 5.0).astype(np.float32)

    nii = nib.load(out / "lesion_agreement.nii.gz")
    got = np.asarray(nii.dataobj)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(nii.affine, nib.load(d / "dwi.nii.gz").affine)
    report = json.loads((out / "report.json").read_text())
    assert report["outputs"]["lesion_agreement.nii.gz"] == "lesion_agreement.nii.gz"
    u = report["uncertainty"]
    vox_ml = float(np.prod(nii.header.get_zooms()[:3])) / 1000
    assert u["networks"] == {"a": 3, "b": 2} and u["networks_total"] == 5
    assert u["disagreement_volume_ml"] == pytest.approx(((votes > 0) & (votes < 5)).sum() * vox_ml, abs=1e-6)
    mask = np.asarray(nib.load(out / "lesion_mask.nii.gz").dataobj) > 0
    # the member masks: a = radius 5 (2 of 3 balls), b = mean of radius 5 and 9 >= 0.5 -> radius 5; vote: radius 5
    np.testing.assert_array_equal(mask, _ball(shape, centre, 5))
    assert u["mean_agreement_in_mask"] == pytest.approx(expected[mask].astype(np.float64).mean(), abs=1e-4)
    # a 9-voxel-radius ball of partial votes around a radius-5 lesion: rule (a) fires, and only it
    assert u["review_recommended"] is True and len(u["reasons"]) == 1 and "disagreement" in u["reasons"][0]
    rows = list(csv.DictReader((out / "lesions.csv").open()))
    assert len(rows) == 1
    assert float(rows[0]["agreement_mean"]) == pytest.approx(expected[mask].astype(np.float64).mean(), abs=1e-4)
    assert float(rows[0]["agreement_min"]) == pytest.approx(float(expected[mask].min()), abs=1e-4)
    html = (out / "report.html").read_text()
    assert 'id="review" data-review="true"' in html and 'id="vol-agreement"' in html
    assert res.report["uncertainty"] == u


def test_overwrite_replaces_a_stale_agreement_map(planted, monkeypatch):
    from deepisles.api import owned_outputs

    assert "lesion_agreement.nii.gz" in owned_outputs()
    d, _, _ = planted
    _segment(planted, monkeypatch, skull_strip="none", preview=False, html=False, overwrite=True)
    stale = d / "out" / "lesion_agreement.nii.gz"
    stale.write_bytes(b"stale")
    _segment(planted, monkeypatch, skull_strip="none", preview=False, html=False, overwrite=True)
    assert np.asarray(nib.load(stale).dataobj).max() == 1.0
