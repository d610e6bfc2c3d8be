"""deepisles.synth: synthetic ISLES'22-layout cases from real anatomy."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from deepisles.errors import DeepIslesError, OutputExistsError
from deepisles.synth import SynthCase, case_rng, generate_case, write_dataset
from deepisles.synth import generator as gen
from deepisles.synth.anatomy import load_template
from deepisles.synth.contrast import TissueParams, signal_maps, subject_tissue
from deepisles.synth.lesions import ADC_DROP_RANGE, MAX_VOLUME_ML, MIN_VOLUME_ML, sample_lesions

LESION_SEED = 10
FREE_SEED = 3


@pytest.fixture(scope="module")
def lesion_case() -> SynthCase:
    return generate_case(LESION_SEED, lesion=True)


@pytest.fixture(scope="module")
def free_case() -> SynthCase:
    return generate_case(FREE_SEED, lesion=False, with_flair=False)


def _brain(case: SynthCase) -> np.ndarray:
    return case.dwi.data > 0


def _normal(case: SynthCase) -> np.ndarray:
    """Parenchyma outside the lesion (CSF excluded)."""
    a = case.adc.data
    return _brain(case) & (case.mask.data == 0) & (a > 0.1) & (a < 1.5)


def test_determinism_and_independent_streams(lesion_case):
    again = generate_case(LESION_SEED, lesion=True, with_flair=False)  # FLAIR off must not change the rest
    for name in ("dwi", "adc", "mask"):
        a, b = getattr(lesion_case, name), getattr(again, name)
        assert np.array_equal(a.data, b.data), name
        assert np.array_equal(a.affine, b.affine), name
    assert again.flair is None
    assert again.meta["lesions"] == lesion_case.meta["lesions"]


def test_case_rng_depends_only_on_seed_and_index():
    a = case_rng(5, 3).integers(0, 2**62, 4)
    b = case_rng(5, 3).integers(0, 2**62, 4)
    c = case_rng(5, 4).integers(0, 2**62, 4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_mask_on_dwi_grid_binary(lesion_case):
    c = lesion_case
    assert c.mask.same_grid(c.dwi) and c.adc.same_grid(c.dwi)
    assert c.mask.data.dtype == np.uint8
    assert set(np.unique(c.mask.data)) == {0, 1}
    assert np.all(c.dwi.data[c.mask.data > 0] > 0), "lesion voxels lie inside the brain"
    assert c.meta["lesion"] and c.meta["n_lesions"] >= 1
    assert c.meta["mask_volume_ml"] == pytest.approx(c.mask.data.sum() * c.mask.voxel_volume_ml, rel=1e-3)


def test_lesion_free_case_has_empty_mask(free_case):
    assert not free_case.mask.data.any()
    assert free_case.meta["lesion"] is False and free_case.meta["lesions"] == []
    assert free_case.meta["mask_volume_ml"] == 0
    assert free_case.flair is None


def test_background_is_zero_and_skull_stripped(lesion_case, free_case):
    for c in (lesion_case, free_case):
        brain = _brain(c)
        assert 0.05 < brain.mean() < 0.6
        assert np.all(c.adc.data[~brain] == 0)
        assert (c.adc.data[brain] == 0).mean() < 0.01
        for arr in (c.dwi.data, c.adc.data):
            assert arr[0].max() == 0 and arr[-1].max() == 0 and arr[:, :, 0].max() == 0
        assert np.isfinite(c.dwi.data).all() and np.isfinite(c.adc.data).all()
        assert c.dwi.data.dtype == np.float32 and c.adc.data.dtype == np.float32
    assert np.all(lesion_case.flair.data[0] == 0)


def test_spacing_and_intensity_ranges(lesion_case, free_case):
    for c in (lesion_case, free_case):
        sp = sorted(c.dwi.spacing)
        assert 1.0 <= sp[0] <= 2.0 and 1.0 <= sp[1] <= 2.0 and sp[0] == pytest.approx(sp[1])
        assert 2.0 <= sp[2] <= 5.0
        d = c.dwi.data[_brain(c)]
        assert 150 < np.median(d) < 320  # real ISLES'22 case: ~230
        assert 1.2 < np.percentile(d, 95) / np.median(d) < 2.2  # real: ~1.45


def test_tissue_adc_in_output(free_case):
    a = free_case.adc.data
    assert 0.7 < np.median(a[_normal(free_case)]) < 0.95
    csf = a[_brain(free_case) & (a > 2.0)]
    assert csf.size > 100 and 2.4 < np.median(csf) < 3.4
    t = free_case.meta["tissue"]
    assert 0.65 <= t["adc_wm"] <= 0.77 and 0.79 <= t["adc_gm"] <= 0.91 and 2.9 <= t["adc_csf"] <= 3.3


def test_tissue_adc_of_noiseless_model():
    """Pure-tissue voxels of the template-space signal model have the textbook ADCs."""
    rng = np.random.default_rng(0)
    t = load_template()
    params = TissueParams.random(rng, atrophy=0.3)
    subject = subject_tissue(t, params)
    maps = signal_maps(rng, t, subject, params, np.zeros(t.shape, np.uint8), {})
    ok = maps.sb > 0
    adc = np.zeros(t.shape, np.float32)
    adc[ok] = np.log(maps.s0[ok] / maps.sb[ok])
    for frac, lo, hi in ((subject.wm, 0.6, 0.8), (subject.gm, 0.75, 0.95), (subject.csf, 2.8, 3.4)):
        pure = (frac > 0.9 * subject.brain) & (subject.brain > 0.99)
        assert pure.sum() > 200
        assert lo < np.median(adc[pure]) < hi


def test_lesion_adc_drop_in_model():
    """Inside each lesion the model ADC is below the same tissue without the lesion by about the lesion's drawn
    ``adc_drop`` (heterogeneity and a softer rim take up to ~30 % of it), and the drops lie in ADC_DROP_RANGE."""
    t = load_template()
    params = TissueParams.random(np.random.default_rng(1), atrophy=0.4)
    subject = subject_tissue(t, params)
    warp_ml = lambda m: np.full(len(m), t.voxel_volume_ml)  # noqa: E731
    les = sample_lesions(np.random.default_rng(2), t, subject.tissue, warp_ml)
    lp = {x.label: (x.adc_drop, x.t2_increase, x.flair_increase) for x in les.lesions}
    with_l = signal_maps(np.random.default_rng(3), t, subject, params, les.labels, lp)
    without = signal_maps(np.random.default_rng(3), t, subject, params, np.zeros_like(les.labels), {})
    lo, hi = ADC_DROP_RANGE
    assert all(lo <= x.adc_drop <= hi for x in les.lesions)
    assert len({x.adc_drop for x in les.lesions}) == len(les.lesions)  # drawn per lesion
    checked = 0
    for x in les.lesions:
        inside = les.labels == x.label
        if inside.sum() < 30:
            continue
        adc_l = np.log(with_l.s0[inside] / with_l.sb[inside])
        adc_0 = np.log(without.s0[inside] / without.sb[inside])
        drop = 1 - np.median(adc_l) / np.median(adc_0)
        assert 0.65 * x.adc_drop < drop < 1.1 * x.adc_drop, (x.label, x.adc_drop, drop)
        checked += 1
    assert checked >= 1


def test_lesion_adc_low_and_dwi_bright(lesion_case):
    c = lesion_case
    m = c.mask.data > 0
    drop = 1 - np.median(c.adc.data[m]) / np.median(c.adc.data[_normal(c)])
    lo, hi = ADC_DROP_RANGE
    assert all(lo <= x["adc_drop"] <= hi for x in c.meta["lesions"])
    drawn = np.median([x["adc_drop"] for x in c.meta["lesions"]])
    assert 0.4 * drawn < drop < 1.2 * hi, (drop, drawn)  # partial volume at the mask's edge dilutes it
    assert np.median(c.dwi.data[m]) > 1.1 * np.median(c.dwi.data[_brain(c)])


def test_flair_on_its_own_grid(lesion_case):
    f = lesion_case.flair
    assert f is not None and not f.same_grid(lesion_case.dwi)
    sp = sorted(f.spacing)
    assert 0.6 <= sp[0] <= 1.25 and sp[2] <= 6.0
    motion = lesion_case.meta["flair"]
    assert max(abs(v) for v in motion["motion_rotation_deg"] + motion["motion_shift_mm"]) > 0
    brain = f.data > 0
    # skull-stripped; CSF dark, so the brain median sits well above the 5th percentile
    assert 0.02 < brain.mean() < 0.7
    assert np.median(f.data[brain]) > 1.5 * np.percentile(f.data[brain], 5)


def test_lesion_volumes_within_range():
    t = load_template()
    tissue = t.gm + t.wm
    ml = lambda m: np.full(len(m), t.voxel_volume_ml)  # noqa: E731
    scenarios = set()
    for seed in range(6):
        les = sample_lesions(np.random.default_rng(seed), t, tissue, ml)
        scenarios.add(les.scenario)
        assert les.lesions
        vols = [x.volume_ml for x in les.lesions]
        assert all(MIN_VOLUME_ML <= v <= MAX_VOLUME_ML for v in vols), vols
        assert sum(vols) <= MAX_VOLUME_ML
        counts = np.bincount(les.labels.ravel(), minlength=len(vols) + 1)[1:]
        assert np.allclose(counts * t.voxel_volume_ml, vols, rtol=1e-3, atol=1e-3)
        assert np.all(tissue[les.labels > 0] >= 0.5)
    assert len(scenarios) >= 3


def test_lesion_meta_volumes(lesion_case):
    for x in lesion_case.meta["lesions"]:
        assert MIN_VOLUME_ML <= x["volume_ml"] <= MAX_VOLUME_ML
        assert x["type"] and x["territory"] and x["hemisphere"] in ("L", "R")
    assert lesion_case.meta["mask_volume_ml"] == pytest.approx(lesion_case.meta["lesion_volume_ml"], rel=0.35)


def test_write_dataset_layout_and_overwrite(tmp_path, monkeypatch, lesion_case, free_case):
    seen = []

    def fake(rng, **kw):
        seen.append(rng.bit_generator.state)
        return [lesion_case, free_case][len(seen) - 1]

    monkeypatch.setattr(gen, "generate_case", fake)
    from deepisles.progress import Recorder

    rec = Recorder()
    subs = write_dataset(tmp_path, 2, seed=7, progress=rec)
    assert subs == ["sub-synth0001", "sub-synth0002"]
    assert [a[:2] for a in rec.advances] == [(1, 2), (2, 2)]
    # case i is drawn from case_rng(seed, i)
    assert seen == [case_rng(7, 0).bit_generator.state, case_rng(7, 1).bit_generator.state]
    for sub, case in zip(subs, (lesion_case, free_case), strict=True):
        raw = tmp_path / "rawdata" / sub / "ses-0001"
        der = tmp_path / "derivatives" / sub / "ses-0001"
        dwi = nib.load(raw / f"{sub}_ses-0001_dwi.nii.gz")
        msk = nib.load(der / f"{sub}_ses-0001_msk.nii.gz")
        assert (raw / f"{sub}_ses-0001_adc.nii.gz").exists()
        assert (raw / f"{sub}_ses-0001_flair.nii.gz").exists() == (case.flair is not None)
        assert np.allclose(dwi.affine, case.dwi.affine) and np.allclose(msk.affine, dwi.affine)
        assert msk.get_data_dtype() == np.uint8 and dwi.get_data_dtype() == np.float32
        assert np.array_equal(np.asarray(msk.dataobj), case.mask.data)
    manifest = json.loads((tmp_path / "synth_manifest.json").read_text())
    assert [c["subject"] for c in manifest["cases"]] == subs and manifest["seed"] == 7
    assert manifest["cases"][1]["lesion"] is False
    tsv = (tmp_path / "rawdata" / "participants.tsv").read_text().splitlines()
    assert tsv[0].startswith("participant_id\t") and len(tsv) == 3
    assert (tmp_path / "rawdata" / "dataset_description.json").exists()

    with pytest.raises(OutputExistsError):
        write_dataset(tmp_path, 1, seed=7)
    seen.clear()
    assert write_dataset(tmp_path, 1, seed=8, overwrite=True) == ["sub-synth0001"]


def test_write_dataset_rejects_bad_n(tmp_path):
    with pytest.raises(DeepIslesError):
        write_dataset(tmp_path, 0, seed=1)


def test_showers_hold_many_tiny_lesions():
    """The "shower" scenario: 8-40 tiny emboli (<= 0.4 mL) plus a few larger ones, as in real ISLES'22 masks."""
    t = load_template()
    tissue = t.gm + t.wm
    ml = lambda m: np.full(len(m), t.voxel_volume_ml)  # noqa: E731
    seen = 0
    for seed in range(40):
        les = sample_lesions(np.random.default_rng(seed), t, tissue, ml)
        if les.scenario != "shower":
            continue
        vols = np.array([x.volume_ml for x in les.lesions])
        assert len(vols) >= 8, len(vols)
        assert np.sum(vols <= 0.4 + 1e-6) >= 8
        assert vols.min() < 0.1
        seen += 1
        if seen == 2:
            break
    assert seen == 2


def test_susceptibility_artefacts_sit_next_to_sinuses_and_petrous_bone():
    """EPI pile-up/loss changes b0 and b1000 together (the ADC barely moves) and only in the orbitofrontal and
    inferior temporal brain next to air and bone."""
    from deepisles.synth import artefacts

    t = load_template()
    regions = artefacts._candidates(t)
    allowed = regions["orbitofrontal"] | regions["inferior-temporal"]
    for seed in range(6):
        s0 = np.ones(t.shape, np.float32)
        sb = np.full(t.shape, np.exp(-0.8), np.float32)
        meta = artefacts.susceptibility(np.random.default_rng(seed), t, s0, sb)
        if not meta["susceptibility"]:
            continue
        changed = np.abs(s0 - 1) > 0.05
        assert changed.any()
        # blob centres lie in the allowed regions; their ~2 sd reach stays near them
        near = np.asarray(allowed)
        from scipy import ndimage as ndi

        near = ndi.binary_dilation(near, iterations=int(round(30 / t.spacing)))
        assert not (changed & ~near).any()
        adc = np.log(s0[changed] / sb[changed])
        assert np.all(np.abs(adc - 0.8) < 0.45)  # DWI-only mismatch: at most a modest ADC change
        return
    pytest.fail("no case with a susceptibility artefact in 6 seeds")


def test_grid_artefacts_ghost_gibbs_motion(monkeypatch):
    from deepisles.synth import artefacts

    monkeypatch.setattr(artefacts, "GIBBS_P", 1.0)
    monkeypatch.setattr(artefacts, "GHOST_P", 1.0)
    monkeypatch.setattr(artefacts, "MOTION_P", 1.0)
    shape = (40, 48, 20)
    brain = np.zeros(shape, bool)
    brain[8:32, 10:38, 4:16] = True
    s0 = np.where(brain, 100.0, 0).astype(np.float32)
    sb = np.where(brain, 40.0, 0).astype(np.float32)
    a0, ab, meta = artefacts.grid_artefacts(np.random.default_rng(0), s0, sb, brain, (0, 1), 1)
    assert set(meta) == {"gibbs_kspace_kept", "nyquist_ghost", "b0_dwi_motion_vox"}
    assert np.all(a0[~brain] == 0) and np.all(ab[~brain] == 0)  # still skull-stripped
    interior = np.zeros(shape, bool)
    interior[14:26, 16:32, 6:14] = True
    edge = brain & ~ndi_erode(brain, 3)
    # ringing and the motion shift act at edges; the flat interior keeps about its level
    assert np.abs(a0[interior] / 100.0 - 1).max() < 0.15
    assert np.abs(a0[edge] / 100.0 - 1).max() > 0.05
    adc = np.log(np.maximum(a0[brain], 1e-3) / np.maximum(ab[brain], 1e-3))
    assert np.abs(adc - np.log(2.5)).max() > 0.1  # b0/b1000 motion leaves ADC rims


def ndi_erode(mask: np.ndarray, n: int) -> np.ndarray:
    from scipy import ndimage as ndi

    return ndi.binary_erosion(mask, iterations=n)
