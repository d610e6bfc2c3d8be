"""Acceptance: an official-layout weight folder, imported with `deepisles weights import`, makes
`deepisles segment --save-members` reproduce the reference outputs of every member and of DeepISLES' majority vote.

The official folder is assembled at test time from the three member fixtures (small random-weight models in the
official formats; nothing is duplicated in git):

    <tmp>/weights/SEALS/...        tests/fixtures/official/seals/main/weights/SEALS (nnU-Net v1, 2 DDP folds)
    <tmp>/weights/NVAUTO/ts/...    tests/fixtures/official/nvauto/weights/NVAUTO (2 TorchScript SegResNets)
    <tmp>/weights/FACTORIZER/logs/ tests/fixtures/official/factorizer/weights/FACTORIZER (4 Lightning checkpoints)

tests/fixtures/official/ensemble/ holds one small synthetic case (DWI, ADC, FLAIR on its own grid) and what the
reference code of each member computed on it in throwaway environments (DeepISLES' SEALS launcher chain with its
nnU-Net fork, NVAUTO's process.py on MONAI 0.9.0, FACTORIZER's predict.py with the vendored factorizer in eval
mode), plus the output of DeepISLES' src/majority_voting.py on the three reference masks. FACTORIZER's reference
was given the FLAIR as *deepisles* registers it (factorizer_input/flair_on_dwi.nii.gz) instead of DeepISLES'
SimpleElastix result: that isolates the network path from the choice of registration method.
See scripts/make_official_fixtures_ensemble.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from deepisles.cli import app

OFFICIAL = Path(__file__).parent / "fixtures" / "official"
FIX = OFFICIAL / "ensemble"
MEMBERS = ("seals", "nvauto", "factorizer")
# where each member's official-format fixture weights live, and their folder name in the official archive
SOURCES = {
    "SEALS": OFFICIAL / "seals" / "main" / "weights" / "SEALS",
    "NVAUTO": OFFICIAL / "nvauto" / "weights" / "NVAUTO",
    "FACTORIZER": OFFICIAL / "factorizer" / "weights" / "FACTORIZER",
}
PROB_TOL = 1e-3  # measured max |p - p_ref| on CPU: SEALS 2.0e-4, NVAUTO 3.0e-6, FACTORIZER 6.3e-7
# masks: identical to the reference's on CPU (every member and the vote; asserted voxel for voxel)
# DeepISLES' ensemble weight of each FACTORIZER model: the reference stores 0.1 x the mean logit
FACTORIZER_WEIGHT = 0.1

runner = CliRunner()


def _invoke(args) -> object:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, f"exit {res.exit_code}\n{res.output}\n{res.exception!r}"
    return res


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a).astype(bool), np.asarray(b).astype(bool)
    s = int(a.sum() + b.sum())
    return 1.0 if s == 0 else 2.0 * float((a & b).sum()) / s


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    z = np.load(FIX / "reference.npz")
    out = {k: z[k] for k in z.files}
    out["factorizer_prob"] = (
        1.0 / (1.0 + np.exp(-out["factorizer_scaled_logit"].astype(np.float64) / FACTORIZER_WEIGHT))
    ).astype(np.float32)  # sigmoid(mean logit), what deepisles' FACTORIZER member returns
    return out


@pytest.fixture(scope="module")
def official_folder(tmp_path_factory) -> Path:
    """One unpacked official archive: weights/SEALS, weights/NVAUTO/ts, weights/FACTORIZER/logs."""
    root = tmp_path_factory.mktemp("official") / "stroke_ensemble_weights"
    for name, src in SOURCES.items():
        shutil.copytree(src, root / "weights" / name)  # real files: the importers walk the tree
    return root


@pytest.fixture(scope="module")
def imported(official_folder, tmp_path_factory):
    """`deepisles weights import <folder>` into a fresh DEEPISLES_HOME (once for the module)."""
    home = tmp_path_factory.mktemp("deepisles_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPISLES_HOME", str(home))
        res = _invoke(["weights", "import", official_folder])
        yield {"home": home, "import_output": res.stdout}


def _segment(tmp_path: Path, flair: bool) -> tuple[Path, dict]:
    out = tmp_path / "out"
    args = ["segment", "--dwi", FIX / "inputs" / "dwi.nii.gz", "--adc", FIX / "inputs" / "adc.nii.gz"]
    if flair:
        args += ["--flair", FIX / "inputs" / "flair.nii.gz"]
    _invoke([*args, "-o", out, "--save-members", "--device", "cpu", "--no-preview"])
    return out, json.loads((out / "report.json").read_text())


def _check_member(out: Path, ref: dict, name: str) -> dict:
    prob = _load(out / "members" / f"{name}_prob.nii.gz")
    assert prob.dtype == np.float32 and prob.shape == ref[f"{name}_mask"].shape
    diff = float(np.abs(prob - ref[f"{name}_prob"]).max())
    differ = int(((prob >= 0.5) != ref[f"{name}_mask"].astype(bool)).sum())
    assert diff <= PROB_TOL, f"{name}: max |p - p_ref| = {diff}"
    assert differ == 0, f"{name}: {differ} voxels differ (Dice {_dice(prob >= 0.5, ref[f'{name}_mask'])})"
    return {"max_abs_diff": diff, "voxels_differ": differ}


def _decision_consistent(p: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A reference probability moved by at most an ulp so that ``>= 0.5`` is the reference decision (NVAUTO's exact
    0.5/0.5 ties are background for argmax), as deepisles' members return it."""
    below = np.float32(np.nextafter(np.float32(0.5), np.float32(0.0)))
    return np.where(mask == 1, np.maximum(p, np.float32(0.5)), np.minimum(p, below)).astype(np.float32)


# --- the fixture itself --------------------------------------------------------------------------------
def test_fixture_is_small_and_not_trivial(ref):
    size = sum(p.stat().st_size for p in FIX.rglob("*") if p.is_file())
    assert size < 2_000_000
    dwi = nib.load(str(FIX / "inputs" / "dwi.nii.gz"))
    flair = nib.load(str(FIX / "inputs" / "flair.nii.gz"))
    assert not np.allclose(dwi.affine, flair.affine) and dwi.shape != flair.shape  # FLAIR on its own grid
    vote = ref["vote"].astype(bool)
    masks = [ref[f"{m}_mask"].astype(bool) for m in MEMBERS]
    assert np.array_equal(vote, np.sum(masks, axis=0) >= 2)  # DeepISLES: (s + n + f) / 3 > 0.5
    for m in masks:  # every member decides non-trivially, and the vote is none of them
        assert 1000 < m.sum() < m.size - 1000
        assert (m != vote).sum() > 500


def test_deepisles_registration_gives_the_factorizer_reference_input():
    """FACTORIZER's reference saw deepisles' registered FLAIR. If this fails, preprocess/register.py changed:
    regenerate the fixture (scripts/make_official_fixtures_ensemble.md) before reading the parity failures."""
    from deepisles.preprocess.inputs import load_inputs
    from deepisles.preprocess.register import register_to

    loaded = load_inputs(*(FIX / "inputs" / f"{m}.nii.gz" for m in ("dwi", "adc", "flair")))
    registered, info = register_to(loaded.flair, loaded.dwi)
    expected = _load(FIX / "factorizer_input" / "flair_on_dwi.nii.gz")
    assert registered.shape == expected.shape
    diff = float(np.abs(np.asarray(registered.data, np.float32) - expected).max())
    assert diff <= 1e-4 * float(expected.max()), f"registered FLAIR differs by {diff} from the fixture's"


# --- the acceptance ---------------------------------------------------------------------------------------
def test_weights_import_official_layout_and_list(imported):
    lines = imported["import_output"]
    for name in MEMBERS:
        assert f"{name}: " in lines and "not found" not in lines
    res = _invoke(["weights", "list"])
    for name in MEMBERS:
        assert name in res.stdout
    from deepisles import store

    assert sorted(store.installed_members()) == sorted(MEMBERS)
    for name in MEMBERS:
        store.read_member(name, verify=True)


def test_segment_save_members_reproduces_every_member_and_the_vote(imported, ref, tmp_path):
    out, report = _segment(tmp_path, flair=True)
    assert [m["name"] for m in report["members"]["run"]] == list(MEMBERS)
    assert report["members"]["skipped"] == []
    # the reference members saw the images as given: deepisles must not have skull-stripped them
    assert report["preprocessing"]["skull_strip"]["chosen"] == "nonzero"
    assert "flair_registration" in report["preprocessing"]
    numbers = {name: _check_member(out, ref, name) for name in MEMBERS}

    mask = _load(out / "lesion_mask.nii.gz")
    assert mask.shape == ref["vote"].shape
    differ = int((mask.astype(bool) != ref["vote"].astype(bool)).sum())
    assert differ == 0, f"vote: {differ} voxels differ (Dice {_dice(mask, ref['vote'])})"
    prob = _load(out / "lesion_prob.nii.gz")
    mean_ref = np.mean([ref[f"{m}_prob"] for m in MEMBERS], axis=0)
    assert float(np.abs(prob - mean_ref).max()) <= PROB_TOL
    assert report["lesions"]["voxels"] == int(mask.sum())
    assert set(report["outputs"]) >= {f"member_{m}" for m in MEMBERS}
    # agreement: every stored network votes (SEALS folds, NVAUTO models, FACTORIZER models, as member.json lists)
    from deepisles import store

    counts = {m: len(store.read_member(m)[0]["models"]) for m in MEMBERS}
    assert report["uncertainty"]["networks"] == counts and min(counts.values()) >= 2
    agree = _load(out / "lesion_agreement.nii.gz").astype(np.float64)
    total = sum(counts.values())
    assert agree.shape == mask.shape and np.allclose(agree * total, np.round(agree * total), atol=1e-4)
    assert mask[agree == 1].all() and not mask[agree == 0].any()  # unanimous networks decide the vote
    assert 0 < int(((agree > 0) & (agree < 1)).sum())
    print(json.dumps({**numbers, "vote_voxels_differ": differ}))


def test_segment_without_flair_skips_factorizer_and_votes_two_members(imported, ref, tmp_path):
    out, report = _segment(tmp_path, flair=False)
    assert [m["name"] for m in report["members"]["run"]] == ["seals", "nvauto"]
    skipped = report["members"]["skipped"]
    assert [s["member"] for s in skipped] == ["factorizer"] and "FLAIR" in skipped[0]["reason"]
    assert any("factorizer" in w and "FLAIR" in w for w in report["warnings"])
    assert not (out / "members" / "factorizer_prob.nii.gz").exists()
    for name in ("seals", "nvauto"):
        _check_member(out, ref, name)

    # deepisles' documented rule for two members (ensemble.py): lesion where both say so, and where they
    # disagree, where their mean probability is >= 0.5 (DeepISLES itself returns SEALS alone without FLAIR)
    ps = _decision_consistent(ref["seals_prob"], ref["seals_mask"])
    pn = _decision_consistent(ref["nvauto_prob"], ref["nvauto_mask"])
    agree = ref["seals_mask"] == ref["nvauto_mask"]
    expected = np.where(agree, ref["seals_mask"] == 1, (ps + pn) / np.float32(2) >= 0.5)
    mask = _load(out / "lesion_mask.nii.gz")
    differ = int((mask.astype(bool) != expected).sum())
    assert differ == 0, f"two-member vote: {differ} voxels differ (Dice {_dice(mask, expected)})"
    assert (expected != ref["vote"].astype(bool)).any()  # it is not the three-member vote
