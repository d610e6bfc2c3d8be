"""The FLAIR path into FACTORIZER: a FLAIR already on the DWI grid and aligned is used unchanged, and
``--flair-registered`` skips the registration (preprocess/register.py ``align_to``, preprocess/case.py).

The independent check: tests/fixtures/official/ensemble/factorizer_input/flair_on_dwi.nii.gz is the FLAIR on the
DWI grid that FACTORIZER's reference output (reference.npz) was computed on by the original DeepISLES code. Given
as ``--flair``, it must reach FACTORIZER untouched, so deepisles' FACTORIZER output must equal that reference.
Before the fix ``segment`` re-registered it (a spurious 0.51 deg / 0.24 mm "motion") and re-interpolated it:
FACTORIZER max |dp| 0.33, mask Dice 0.85, vote Dice 0.957 against the reference.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

import deepisles
from deepisles.io.image import Image
from deepisles.preprocess import register
from deepisles.preprocess.case import build_case
from deepisles.preprocess.inputs import load_inputs
from deepisles.preprocess.register import PASS_THROUGH_MM, align_to
from deepisles.preprocess.resample import resample_to
from test_segment_official import FACTORIZER_WEIGHT, FIX, PROB_TOL, SOURCES, _invoke, _load  # same fixtures

DWI, ADC, FLAIR = (FIX / "inputs" / f"{m}.nii.gz" for m in ("dwi", "adc", "flair"))
FLAIR_ON_DWI = FIX / "factorizer_input" / "flair_on_dwi.nii.gz"  # untouched by deepisles in these tests
DICE_MIN = 0.999


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a).astype(bool), np.asarray(b).astype(bool)
    return 2.0 * float((a & b).sum()) / max(int(a.sum() + b.sum()), 1)


def _no_registration(*_args, **_kwargs):
    raise AssertionError("register_to was called")


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    z = np.load(FIX / "reference.npz")
    out = {k: z[k] for k in z.files}
    out["factorizer_prob"] = (
        1.0 / (1.0 + np.exp(-out["factorizer_scaled_logit"].astype(np.float64) / FACTORIZER_WEIGHT))
    ).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The three official-format member fixtures, imported with `deepisles weights import` (once)."""
    root = tmp_path_factory.mktemp("official") / "stroke_ensemble_weights"
    for name, src in SOURCES.items():
        shutil.copytree(src, root / "weights" / name)
    home = tmp_path_factory.mktemp("deepisles_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPISLES_HOME", str(home))
        _invoke(["weights", "import", root])
        yield home


@pytest.fixture(scope="module")
def loaded():
    return load_inputs(DWI, ADC, FLAIR_ON_DWI)


def _check_factorizer(prob: np.ndarray, ref: dict) -> None:
    diff = np.abs(prob - ref["factorizer_prob"])
    dice = _dice(prob >= 0.5, ref["factorizer_mask"])
    assert float(diff.max()) <= PROB_TOL, f"factorizer: max |p - p_ref| = {float(diff.max())}"
    assert dice >= DICE_MIN, f"factorizer: Dice {dice}"


# --- the reference computed on a FLAIR deepisles does not touch ---------------------------------------------
def test_segment_flair_on_dwi_grid_reproduces_the_factorizer_reference_and_the_vote(imported, ref, tmp_path):
    out = tmp_path / "out"
    _invoke(["segment", "--dwi", DWI, "--adc", ADC, "--flair", FLAIR_ON_DWI, "-o", out, "--save-members",
             "--device", "cpu", "--no-preview", "--no-html"])  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    reg = report["preprocessing"]["flair_registration"]
    assert reg["action"] == "passed_through" and reg["grid"] == "same", reg["summary"]
    assert reg["summary"].startswith("passed through: already on the DWI grid")
    assert reg["max_displacement_mm"] <= PASS_THROUGH_MM and "matrix_ras" in reg["estimate"]
    assert [m["name"] for m in report["members"]["run"]] == ["seals", "nvauto", "factorizer"]
    _check_factorizer(_load(out / "members" / "factorizer_prob.nii.gz"), ref)
    for name in ("seals", "nvauto"):  # unaffected by the FLAIR
        prob = _load(out / "members" / f"{name}_prob.nii.gz")
        assert float(np.abs(prob - ref[f"{name}_prob"]).max()) <= PROB_TOL
    mask = _load(out / "lesion_mask.nii.gz")
    assert _dice(mask, ref["vote"]) >= DICE_MIN, f"vote: Dice {_dice(mask, ref['vote'])}"


def test_api_flair_registered_reproduces_the_factorizer_reference(imported, ref, monkeypatch):
    monkeypatch.setattr(register, "register_to", _no_registration)
    res = deepisles.segment(DWI, ADC, FLAIR_ON_DWI, members="factorizer", device="cpu", flair_registered=True)
    reg = res.report["preprocessing"]["flair_registration"]
    assert reg["action"] == "passed_through" and reg["assume_registered"] is True
    assert reg["summary"] == "passed through (--flair-registered): already on the DWI grid"
    (member,) = res.members
    _check_factorizer(member.probability, ref)


# --- pass-through and registration on the DWI grid -------------------------------------------------------------
def test_flair_on_dwi_grid_passes_through_bit_identical(loaded):
    original = _load(FLAIR_ON_DWI)
    assert original.dtype == np.float32
    img, info = align_to(loaded.flair, loaded.dwi)
    assert info["action"] == "passed_through" and info["grid"] == "same"
    assert img.data.dtype == np.float32 and np.array_equal(img.data, original)
    assert np.array_equal(img.affine, loaded.dwi.affine)
    # the registration that ran as a check found a small spurious motion: what used to be applied
    assert 0.0 < info["max_displacement_mm"] <= PASS_THROUGH_MM
    case, steps, _, _ = build_case(loaded, "auto")
    assert steps["flair_registration"]["action"] == "passed_through"
    assert np.array_equal(case.flair.data, original)  # what the members see (skull strip: the zero background)


def test_flair_on_dwi_grid_with_axes_reordered_passes_through_exactly(loaded):
    """The same voxel centres stored in another axis order and flipped: copied exactly, not interpolated."""
    flair = loaded.flair
    data = np.flip(np.asarray(flair.data), axis=0).transpose(2, 0, 1)  # new axes (k, -i, j)
    n0 = flair.shape[0]
    to_old = np.array([[0, -1, 0, n0 - 1], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    stored = Image(np.ascontiguousarray(data), flair.affine @ to_old, "reordered.nii.gz")
    assert not stored.same_grid(loaded.dwi)
    img, info = align_to(stored, loaded.dwi)
    assert info["action"] == "passed_through" and info["grid"] == "same, axes reordered"
    assert np.array_equal(img.data, _load(FLAIR_ON_DWI)) and np.array_equal(img.affine, loaded.dwi.affine)


def _moved(img: Image, motion: np.ndarray) -> Image:
    """``img``'s content moved on its own grid: new(x) = img(motion @ x), world RAS."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ motion @ np.diag([-1.0, -1.0, 1.0, 1.0])
    tx = sitk.AffineTransform(lps[:3, :3].ravel().tolist(), lps[:3, 3].tolist())
    src = img.to_sitk()
    out = Image.from_sitk(sitk.Resample(src, src, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    return Image(np.asarray(out.data), img.affine.copy(), "moved-flair.nii.gz")


def _motion(dwi: Image, shift=(0.0, 0.0, 0.0), deg: float = 0.0) -> np.ndarray:
    c = np.eye(4)
    c[:3, 3] = (dwi.affine @ np.r_[np.argwhere(np.asarray(dwi.data) != 0).mean(0), 1.0])[:3]
    r = np.eye(4)
    r[0, 0] = r[1, 1] = math.cos(math.radians(deg))
    r[0, 1], r[1, 0] = -math.sin(math.radians(deg)), math.sin(math.radians(deg))
    t = np.eye(4)
    t[:3, 3] = shift
    return t @ c @ r @ np.linalg.inv(c)


@pytest.mark.parametrize("shift, deg", [((2.0, -1.5, 1.0), 0.0), ((0.0, 0.0, 0.0), 4.0)])
def test_flair_on_dwi_grid_but_moved_is_registered(loaded, shift, deg):
    motion = _motion(loaded.dwi, shift, deg)
    moved = _moved(loaded.flair, motion)
    img, info = align_to(moved, loaded.dwi)
    assert info["action"] == "registered" and info["grid"] == "same", info["summary"]
    assert info["max_displacement_mm"] > PASS_THROUGH_MM and "on its grid but moved" in info["summary"]
    # the estimate maps a DWI point to where that anatomy now is in the moved FLAIR: inv(motion)
    brain = np.argwhere(np.asarray(loaded.dwi.data) != 0)
    pts = loaded.dwi.affine @ np.c_[brain, np.ones(len(brain))].T
    err = np.linalg.norm((np.asarray(info["matrix_ras"]) @ pts - np.linalg.inv(motion) @ pts)[:3], axis=0)
    assert err.max() < 0.6, f"registration error up to {err.max():.2f} mm"
    original = np.asarray(loaded.flair.data)
    inside = np.asarray(loaded.dwi.data) != 0
    before = np.corrcoef(moved.data[inside], original[inside])[0, 1]
    after = np.corrcoef(img.data[inside], original[inside])[0, 1]
    assert after > before + 0.02, f"correlation with the aligned FLAIR: {before:.3f} moved, {after:.3f} registered"


# --- --flair-registered -----------------------------------------------------------------------------------------
def test_flair_registered_resamples_a_flair_on_another_grid_in_physical_space(monkeypatch):
    loaded = load_inputs(DWI, ADC, FLAIR)
    monkeypatch.setattr(register, "register_to", _no_registration)
    case, steps, _, _ = build_case(loaded, "auto", flair_registered=True)
    reg = steps["flair_registration"]
    assert reg["action"] == "resampled" and reg["grid"] == "other" and "matrix_ras" not in reg
    assert "identity transform" in reg["summary"]
    expected = resample_to(loaded.flair, loaded.dwi, order=1, fill=0.0)
    assert expected.meta["resampled_from"]["method"] == "interpolated"
    assert np.array_equal(case.flair.data, expected.data) and case.flair.same_grid(loaded.dwi)


@pytest.mark.parametrize("flag, flair, action", [
    (True, FLAIR, "resampled"),
    (True, FLAIR_ON_DWI, "passed_through"),
    (False, FLAIR, "registered"),
])  # fmt: skip
def test_cli_flair_registered_skips_registration(tmp_path, monkeypatch, flag, flair, action):
    if flag:
        monkeypatch.setattr(register, "register_to", _no_registration)
    out = tmp_path / "out"
    args = ["segment", "--dwi", DWI, "--adc", ADC, "--flair", flair, "-o", out, "--members", "classical",
            "--device", "cpu", "--no-preview", "--no-html"]  # fmt: skip
    _invoke([*args, "--flair-registered"] if flag else args)
    reg = json.loads((out / "report.json").read_text())["preprocessing"]["flair_registration"]
    assert reg["action"] == action and reg["assume_registered"] is flag
    assert ("--flair-registered" in reg["summary"]) is flag
    assert ("matrix_ras" in reg) is (action == "registered")


def test_batch_flair_registered_skips_registration(tmp_path, monkeypatch):
    raw = tmp_path / "ds" / "rawdata" / "sub-a" / "ses-0001"
    for role, src in (("dwi", DWI), ("adc", ADC), ("flair", FLAIR)):
        folder = raw / ("anat" if role == "flair" else "dwi")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, folder / f"sub-a_ses-0001_{role}.nii.gz")
    monkeypatch.setattr(register, "register_to", _no_registration)
    out = tmp_path / "deriv"
    _invoke(["batch", "-i", tmp_path / "ds", "-o", out, "--members", "classical", "--device", "cpu",
             "--flair-registered"])  # fmt: skip
    (report,) = list(out.rglob("*desc-deepisles_report.json"))
    reg = json.loads(report.read_text())["preprocessing"]["flair_registration"]
    assert reg["action"] == "resampled" and reg["assume_registered"] is True
