"""The dataset case finder (deepisles.io.dataset) on ISLES'22 layouts; training.datasets: K-fold splits, loading a
case."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from deepisles.errors import DeepIslesError, InputError
from deepisles.io.dataset import DatasetCase, find_cases
from deepisles.io.load import LoadedInputs
from deepisles.training.datasets import load_case, split_folds

SHAPE = (12, 12, 8)
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def _volume(role: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    brain = np.zeros(SHAPE, bool)
    brain[2:10, 2:10, 1:7] = True
    if role == "mask":
        out = np.zeros(SHAPE, np.uint8)
        out[4:7, 4:7, 3:5] = 1
        return out
    mean, sd = {"dwi": (300.0, 30.0), "adc": (0.8, 0.05), "flair": (200.0, 20.0)}[role]
    return np.where(brain, rng.normal(mean, sd, SHAPE), 0).astype(np.float32)


def _save(path: Path, role: str, affine: np.ndarray = AFFINE, shape: tuple[int, ...] = SHAPE) -> Path:
    data = _volume(role)
    if shape != SHAPE:
        data = np.resize(data, shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _flat(
    root: Path, sub: str, ses: str | None = "ses-0001", flair: bool = True, ext: str = ".nii.gz"
) -> None:
    """Layout 1 as `deepisles synth` writes it: rawdata/sub/ses/sub_ses_{dwi,adc,flair}, derivatives mask."""
    stem = sub if ses is None else f"{sub}_{ses}"
    raw = root / "rawdata" / sub / (ses or "")
    der = root / "derivatives" / sub / (ses or "")
    for role in ("dwi", "adc") + (("flair",) if flair else ()):
        _save(raw / f"{stem}_{role}{ext}", role)
    _save(der / f"{stem}_msk{ext}", "mask")


def _official(base: Path, der: Path, sub: str, ses: str = "ses-0001", upper: bool = True) -> None:
    """ISLES'22 release: sub/ses/{dwi,anat}/..., upper-case suffixes, JSON sidecars; mask in ``der``."""
    stem = f"{sub}_{ses}"
    d = base / sub / ses
    name = (lambda s: s.upper()) if upper else (lambda s: s)
    _save(d / "dwi" / f"{stem}_{name('dwi')}.nii.gz", "dwi")
    _save(d / "dwi" / f"{stem}_{name('adc')}.nii.gz", "adc")
    _save(d / "anat" / f"{stem}_{name('flair')}.nii.gz", "flair")
    for side in (f"{stem}_dwi.json", f"{stem}_adc.json", f"{stem}_FLAIR.json", f"{stem}_dwi.bval"):
        (d / ("anat" if "FLAIR" in side else "dwi") / side).write_text(json.dumps({"x": 1}))
    _save(der / sub / ses / f"{stem}_{name('msk')}.nii.gz", "mask")


# --- find_cases -----------------------------------------------------------------------------------------
def test_layout1_flat(tmp_path):
    for i in (2, 1):
        _flat(tmp_path, f"sub-strokecase000{i}")
    cases = find_cases(tmp_path)
    assert [c.case_id for c in cases] == ["sub-strokecase0001_ses-0001", "sub-strokecase0002_ses-0001"]
    c = cases[0]
    assert isinstance(c, DatasetCase) and c.subject == "sub-strokecase0001" and c.session == "ses-0001"
    raw = tmp_path / "rawdata" / "sub-strokecase0001" / "ses-0001"
    assert c.dwi == raw / "sub-strokecase0001_ses-0001_dwi.nii.gz"
    assert c.adc == raw / "sub-strokecase0001_ses-0001_adc.nii.gz"
    assert c.flair == raw / "sub-strokecase0001_ses-0001_flair.nii.gz"
    assert (
        c.mask == tmp_path / "derivatives/sub-strokecase0001/ses-0001/sub-strokecase0001_ses-0001_msk.nii.gz"
    )


def test_layout1_official_subfolders_upper_case_and_sidecars(tmp_path):
    _official(tmp_path / "rawdata", tmp_path / "derivatives", "sub-strokecase0003")
    (tmp_path / "rawdata" / "participants.tsv").write_text("participant_id\nsub-strokecase0003\n")
    cases = find_cases(tmp_path)
    assert len(cases) == 1
    c = cases[0]
    assert c.case_id == "sub-strokecase0003_ses-0001"
    assert c.dwi.name.endswith("_DWI.nii.gz") and c.dwi.parent.name == "dwi"
    assert c.adc.name.endswith("_ADC.nii.gz")
    assert c.flair is not None and c.flair.parent.name == "anat" and c.flair.name.endswith("_FLAIR.nii.gz")
    assert c.mask.name.endswith("_MSK.nii.gz")


def test_layout2_no_rawdata_lower_case_nested_derivatives(tmp_path):
    _official(tmp_path, tmp_path / "derivatives" / "lesion_masks", "sub-a", upper=False)
    _official(tmp_path, tmp_path / "derivatives" / "lesion_masks", "sub-b", ses="ses-0002", upper=True)
    cases = find_cases(tmp_path)
    assert [c.case_id for c in cases] == ["sub-a_ses-0001", "sub-b_ses-0002"]
    assert all("lesion_masks" in c.mask.parts for c in cases)
    assert cases[0].dwi == tmp_path / "sub-a/ses-0001/dwi/sub-a_ses-0001_dwi.nii.gz"


def test_mask_in_anat_subfolder_of_derivatives_and_plain_nii(tmp_path):
    _flat(tmp_path, "sub-x", ext=".nii")
    m = tmp_path / "derivatives/sub-x/ses-0001/sub-x_ses-0001_msk.nii"
    (m.parent / "anat").mkdir()
    m.rename(m.parent / "anat" / m.name)
    (c,) = find_cases(tmp_path)
    assert c.mask == tmp_path / "derivatives/sub-x/ses-0001/anat/sub-x_ses-0001_msk.nii"
    assert c.dwi.name == "sub-x_ses-0001_dwi.nii"


def test_no_session(tmp_path):
    _flat(tmp_path, "sub-nos", ses=None)
    (c,) = find_cases(tmp_path)
    assert c.case_id == "sub-nos" and c.subject == "sub-nos" and c.session is None
    assert c.dwi == tmp_path / "rawdata/sub-nos/sub-nos_dwi.nii.gz"


def test_mask_next_to_images_is_a_fallback(tmp_path):
    d = tmp_path / "sub-strokecase0001"
    for role in ("dwi", "adc"):
        _save(d / f"sub-strokecase0001_ses-0001_{role}.nii.gz", role)
    _save(d / "sub-strokecase0001_ses-0001_msk.nii.gz", "mask")
    _save(d / "reference-deepisles-dwi-adc-only_lesion_msk.nii.gz", "mask")  # not a case file
    (c,) = find_cases(tmp_path)
    assert c.mask == d / "sub-strokecase0001_ses-0001_msk.nii.gz" and c.flair is None


def test_missing_mask_or_adc_skipped_with_warning(tmp_path, caplog):
    _flat(tmp_path, "sub-ok")
    _flat(tmp_path, "sub-nomask")
    (tmp_path / "derivatives/sub-nomask/ses-0001/sub-nomask_ses-0001_msk.nii.gz").unlink()
    _flat(tmp_path, "sub-noadc")
    (tmp_path / "rawdata/sub-noadc/ses-0001/sub-noadc_ses-0001_adc.nii.gz").unlink()
    _save(tmp_path / "derivatives/sub-orphan/sub-orphan_msk.nii.gz", "mask")  # mask without images
    with caplog.at_level(logging.WARNING, logger="deepisles.io.dataset"):
        cases = find_cases(tmp_path)
    assert [c.case_id for c in cases] == ["sub-ok_ses-0001"]
    text = caplog.text
    assert "sub-nomask_ses-0001" in text and "no mask" in text
    assert "sub-noadc_ses-0001" in text and "ADC" in text


def test_session_must_match_for_mask(tmp_path, caplog):
    _flat(tmp_path, "sub-a", ses="ses-0001")
    _flat(tmp_path, "sub-a", ses="ses-0002")
    (tmp_path / "derivatives/sub-a/ses-0002/sub-a_ses-0002_msk.nii.gz").unlink()
    with caplog.at_level(logging.WARNING):
        cases = find_cases(tmp_path)
    assert [c.case_id for c in cases] == ["sub-a_ses-0001"]
    assert "sub-a_ses-0002" in caplog.text


def test_duplicate_role_is_an_error(tmp_path):
    _flat(tmp_path, "sub-dup")
    raw = tmp_path / "rawdata/sub-dup/ses-0001"
    _save(raw / "sub-dup_ses-0001_dwi.nii", "dwi")
    with pytest.raises(DeepIslesError, match="sub-dup_ses-0001") as e:
        find_cases(tmp_path)
    assert "sub-dup_ses-0001_dwi.nii.gz" in str(e.value) and "sub-dup_ses-0001_dwi.nii," in str(e.value)


def test_duplicate_mask_is_an_error(tmp_path):
    _flat(tmp_path, "sub-dup")
    _save(tmp_path / "derivatives/other/sub-dup/ses-0001/sub-dup_ses-0001_MSK.nii.gz", "mask")
    with pytest.raises(DeepIslesError, match="2 mask files"):
        find_cases(tmp_path)


def test_nothing_found(tmp_path):
    (tmp_path / "rawdata" / "sub-a").mkdir(parents=True)
    (tmp_path / "rawdata" / "sub-a" / "notes.txt").write_text("x")
    with pytest.raises(DeepIslesError, match="no training cases") as e:
        find_cases(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "rawdata/sub-*" in msg and "derivatives" in msg
    with pytest.raises(DeepIslesError, match="not found"):
        find_cases(tmp_path / "missing")


def test_nothing_usable_says_why(tmp_path):
    _flat(tmp_path, "sub-a")
    (tmp_path / "derivatives/sub-a/ses-0001/sub-a_ses-0001_msk.nii.gz").unlink()
    with pytest.raises(DeepIslesError, match="1 no mask"):
        find_cases(tmp_path)


def test_require_flair(tmp_path, caplog):
    _flat(tmp_path, "sub-with")
    _flat(tmp_path, "sub-without", flair=False)
    assert [c.flair is None for c in find_cases(tmp_path)] == [False, True]
    with caplog.at_level(logging.WARNING):
        cases = find_cases(tmp_path, require_flair=True)
    assert [c.case_id for c in cases] == ["sub-with_ses-0001"]
    assert "sub-without_ses-0001" in caplog.text and "FLAIR" in caplog.text
    (cases[0].flair).unlink()
    with pytest.raises(DeepIslesError, match="no FLAIR"):
        find_cases(tmp_path, require_flair=True)


# --- split_folds ----------------------------------------------------------------------------------------
def _fake_cases(n_subjects: int, sessions: int = 1) -> list[DatasetCase]:
    out = []
    for s in range(n_subjects):
        for t in range(sessions):
            sub = f"sub-{s:03d}"
            p = Path(f"/x/{sub}_ses-{t}")
            out.append(DatasetCase(sub, f"ses-{t}", p, p, mask=p))
    return sorted(out, key=lambda c: c.case_id)


def test_split_folds_partition_by_subject():
    cases = _fake_cases(10, sessions=2)
    vals = []
    for k in range(3):
        train, val = split_folds(cases, 3, k)
        tsub, vsub = {c.subject for c in train}, {c.subject for c in val}
        assert not tsub & vsub and len(train) + len(val) == len(cases)
        assert set(train) | set(val) == set(cases)
        assert len(vsub) in (3, 4) and all(len([c for c in val if c.subject == s]) == 2 for s in vsub)
        assert val == sorted(val, key=lambda c: c.case_id)
        vals.append(vsub)
    assert set().union(*vals) == {c.subject for c in cases}
    assert sum(len(v) for v in vals) == 10  # each subject validates exactly once


def test_split_folds_deterministic_and_seeded():
    cases = _fake_cases(12)
    assert split_folds(cases, 4, 1) == split_folds(cases, 4, 1)
    assert split_folds(cases, 4, 1, seed=1) == split_folds(cases, 4, 1, seed=1)
    picks = {tuple(c.subject for c in split_folds(cases, 4, 1, seed=s)[1]) for s in range(6)}
    assert len(picks) > 1


def test_split_folds_one_fold_and_bad_args():
    cases = _fake_cases(3)
    assert split_folds(cases, 1, 0) == (cases, [])
    for folds, fold in ((0, 0), (3, 3), (3, -1), (1, 1), (2.0, 0), (True, 0)):
        with pytest.raises(DeepIslesError):
            split_folds(cases, folds, fold)  # type: ignore[arg-type]
    with pytest.raises(DeepIslesError, match="3 subject"):
        split_folds(_fake_cases(3, sessions=3), 4, 0)


# --- load_case ------------------------------------------------------------------------------------------
def test_load_case_mask_uint8_on_grid(tmp_path):
    _flat(tmp_path, "sub-a")
    (case,) = find_cases(tmp_path)
    loaded, mask = load_case(case)
    assert isinstance(loaded, LoadedInputs) and loaded.flair is not None
    assert mask.data.dtype == np.uint8 and set(np.unique(mask.data)) == {0, 1}
    assert mask.same_grid(loaded.dwi) and loaded.adc.same_grid(loaded.dwi)
    np.testing.assert_array_equal(mask.data, _volume("mask"))
    loaded2, _ = load_case(case, with_flair=False)
    assert loaded2.flair is None


def test_load_case_float_mask_is_binarised(tmp_path):
    _flat(tmp_path, "sub-a")
    (case,) = find_cases(tmp_path)
    soft = _volume("mask").astype(np.float32) * 0.9 + 0.2  # 0.2 background, 1.1 lesion
    nib.save(nib.Nifti1Image(soft, AFFINE), case.mask)
    _, mask = load_case(case)
    np.testing.assert_array_equal(mask.data, _volume("mask"))


@pytest.mark.parametrize("what", ["shape", "affine"])
def test_load_case_rejects_mask_off_grid(tmp_path, what):
    _flat(tmp_path, "sub-a")
    (case,) = find_cases(tmp_path)
    if what == "shape":
        _save(case.mask, "mask", shape=(12, 12, 9))
    else:
        shifted = AFFINE.copy()
        shifted[0, 3] = 5.0
        _save(case.mask, "mask", affine=shifted)
    with pytest.raises(InputError, match="not on the DWI grid") as e:
        load_case(case)
    assert e.value.path == str(case.mask)


# --- the package's own synthetic datasets ----------------------------------------------------------------
def test_reads_synth_dataset(tmp_path):
    from deepisles.synth import write_dataset

    subjects = write_dataset(tmp_path / "synth", n=2, seed=3)
    cases = find_cases(tmp_path / "synth")
    assert [c.subject for c in cases] == sorted(subjects)
    assert [c.case_id for c in cases] == [f"{s}_ses-0001" for s in sorted(subjects)]
    loaded, mask = load_case(cases[0])
    assert mask.data.dtype == np.uint8 and mask.same_grid(loaded.dwi)
    assert mask.shape == loaded.dwi.shape and loaded.adc.same_grid(loaded.dwi)


def test_positive_patches_pick_lesions_uniformly_not_voxels():
    """A 1-voxel embolus next to a 4,000-voxel infarct is the centre of about half the positive patches."""
    from deepisles.training.loop import random_patch
    from deepisles.training.members import Sample

    lab = np.zeros((64, 64, 64), np.uint8)
    lab[4:20, 4:20, 4:20] = 1  # 4,096 voxels
    lab[50, 50, 50] = 1  # one voxel
    img = np.ones((2, 64, 64, 64), np.float32)
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(200):
        _, y = random_patch(Sample(img, lab), [16, 16, 16], rng, pos_fraction=1.0)
        hits += bool(y[0, ...].sum() == 1)  # the patch holds the embolus alone
    assert 70 < hits < 130, hits
