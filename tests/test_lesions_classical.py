"""Connected lesions, their measurements, and the classical member on a constructed case."""

from __future__ import annotations

import numpy as np
import pytest

from deepisles.io.image import Image
from deepisles.members import Case, ClassicalMember
from deepisles.postprocess.lesions import lesion_summary, lesion_table


def _aff(spacing=(2.0, 2.0, 3.0), origin=(-50.0, -60.0, -30.0)):
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = origin
    return a


def test_lesion_table_counts_diagonal_contacts_as_one_lesion():
    m = np.zeros((10, 10, 10), np.uint8)
    m[2, 2, 2] = m[3, 3, 3] = 1  # corner contact: one lesion with 26-connectivity
    m[7:9, 7:9, 7:9] = 1  # 8 voxels
    img = Image(m, _aff())
    rows = lesion_table(img, Image(np.full(m.shape, 0.5, np.float32), _aff()))
    assert [r["voxels"] for r in rows] == [8, 2]
    assert rows[0]["id"] == 1
    assert rows[0]["volume_ml"] == pytest.approx(8 * 12 / 1000)
    # centroid of the 2x2x2 block (voxels 7..8) in world mm
    assert rows[0]["centroid_mm"] == pytest.approx([-50 + 7.5 * 2, -60 + 7.5 * 2, -30 + 7.5 * 3])
    assert rows[1]["mean_adc_1e-3_mm2_s"] == pytest.approx(0.5)
    s = lesion_summary(img)
    assert s == {"volume_ml": pytest.approx(10 * 0.012), "count": 2, "voxels": 10}


def test_empty_mask_has_no_lesions():
    img = Image(np.zeros((5, 5, 5), np.uint8), _aff())
    assert lesion_table(img) == []
    assert lesion_summary(img)["count"] == 0


def _phantom(rng, lesion=True):
    shape = (64, 64, 40)
    zz = np.indices(shape).astype(np.float32)
    c = np.array(shape, np.float32)[:, None, None, None] / 2
    r = np.sqrt((((zz - c) / (np.array([28, 28, 17])[:, None, None, None])) ** 2).sum(0))
    brain = r < 1
    adc = np.where(brain, 0.78 + 0.05 * rng.standard_normal(shape), 0).astype(np.float32)
    dwi = np.where(brain, 230 + 15 * rng.standard_normal(shape), 0).astype(np.float32)
    truth = np.zeros(shape, bool)
    if lesion:
        ll = np.sqrt(((zz - np.array([40, 30, 22])[:, None, None, None]) ** 2).sum(0)) < 5
        truth = ll & brain
        adc[truth] *= 0.55
        dwi[truth] *= 2.2
    aff = _aff((2.0, 2.0, 2.0))
    return Case(Image(dwi, aff), Image(adc, aff), brain), truth


def test_classical_member_finds_dwi_bright_adc_dark_lesion():
    case, truth = _phantom(np.random.default_rng(1))
    res = ClassicalMember().run(case)
    assert res.probability.dtype == np.float32 and res.probability.shape == case.dwi.shape
    dice = 2 * (res.mask.astype(bool) & truth).sum() / (res.mask.sum() + truth.sum())
    assert dice > 0.85
    assert res.info["adc_reference_median"] == pytest.approx(0.78, abs=0.02)
    np.testing.assert_array_equal(res.mask, res.probability >= 0.5)


def test_classical_member_on_lesion_free_case_finds_almost_nothing():
    case, _ = _phantom(np.random.default_rng(2), lesion=False)
    res = ClassicalMember().run(case)
    assert res.mask.sum() * case.dwi.voxel_volume_ml < 0.05
