"""NVAUTO member: importer, store round trip and parity with the reference (DeepISLES' NVAUTO chain on
MONAI 0.9.0), on the small random-weight fixture in tests/fixtures/official/nvauto/ (see
scripts/make_official_fixtures_nvauto.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from deepisles import store
from deepisles.core import Case
from deepisles.engine.sliding_window import monai09_gaussian
from deepisles.errors import DeepIslesError
from deepisles.io.image import Image
from deepisles.members.base import MemberUnavailable, match_decision
from deepisles.members.nvauto import (
    NvautoMember,
    compute_shape_offset,
    resample,
    spacing_target,
    zoom_affine,
)
from deepisles.weights import import_nvauto

FIX = Path(__file__).parent / "fixtures" / "official" / "nvauto"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPISLES_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _case(adc_scale: float = 1e-3) -> Case:
    dwi = Image.from_nifti(nib.load(FIX / "dwi.nii.gz"))
    adc = Image.from_nifti(nib.load(FIX / "adc.nii.gz"))
    # the pipeline hands members ADC in 10^-3 mm^2/s; the fixture file is in 10^-6 (as ISLES'22)
    adc = adc.with_data(np.asarray(adc.data, dtype=np.float32) * np.float32(adc_scale))
    return Case(dwi=dwi, adc=adc, brain=np.asarray(dwi.data) != 0)


# --- importer -----------------------------------------------------------------------------------
def test_locate_accepts_archive_root_weights_and_member_folder(tmp_path):
    member = FIX / "weights" / "NVAUTO"
    assert import_nvauto.locate(FIX) == member
    assert import_nvauto.locate(FIX / "weights") == member
    assert import_nvauto.locate(member) == member
    assert import_nvauto.locate(tmp_path) is None


def test_from_store_without_weights_is_unavailable(home):
    with pytest.raises(MemberUnavailable) as exc:
        NvautoMember.from_store()
    assert exc.value.member == "nvauto"
    assert "no weights" in exc.value.reason


def test_import_writes_member_json_and_refuses_overwrite(home):
    dest = import_nvauto.import_official(FIX)
    assert dest == store.member_dir("nvauto")
    meta, folder = store.read_member("nvauto", verify=True)
    assert meta["format"] == 2 and [m["file"] for m in meta["models"]] == ["model0.safetensors", "model1.safetensors"]
    assert [(m["name"], m["fold"]) for m in meta["models"]] == [("model0", 0), ("model1", 1)]
    assert sorted(p.name for p in folder.iterdir()) == ["member.json", "model0.safetensors", "model1.safetensors"]
    assert meta["inputs"] == ["adc", "dwi"]
    cfg = meta["settings"]
    assert cfg["roi_size"] == [192, 192, 128] and cfg["overlap"] == 0.625 and cfg["blend_mode"] == "gaussian"
    assert cfg["pixdim"] == [1.0, 1.0, 1.0] and cfg["sw_batch_size"] == 2
    # the SegResNet the fixture models were scripted from (scripts/make_official_fixtures_nvauto.md, step 3)
    assert meta["network"] == {"class": "SegResNet", "kwargs": {
        "spatial_dims": 3, "in_channels": 2, "out_channels": 2, "init_filters": 2, "blocks_down": [1],
        "blocks_up": [], "dropout_prob": None, "use_conv_final": True, "act": ["RELU", {"inplace": True}],
        "norm": ["GROUP", {"num_groups": 1}], "upsample_mode": "nontrainable"}}  # fmt: skip
    src = FIX / "weights" / "NVAUTO" / "ts"
    for k, name in enumerate(meta["models"]):
        official = meta["provenance"]["official_files"][name["file"]]
        assert official == {"file": f"ts/model{k}.ts", "sha256": store.sha256_file(src / f"model{k}.ts")}
        assert meta["files"][name["file"]] == store.sha256_file(folder / name["file"])
    assert json.loads((folder / "member.json").read_text())["member"] == "nvauto"
    with pytest.raises(DeepIslesError, match="already installed"):
        import_nvauto.import_official(FIX)
    import_nvauto.import_official(FIX / "weights", overwrite=True)


def test_import_rejects_broken_or_misnumbered_models(home, tmp_path):
    ts = tmp_path / "arch" / "weights" / "NVAUTO" / "ts"
    ts.mkdir(parents=True)
    shutil.copy(FIX / "weights" / "NVAUTO" / "ts" / "model0.ts", ts / "model0.ts")
    (ts / "model1.ts").write_bytes(b"this is not a TorchScript archive")
    with pytest.raises(DeepIslesError, match="model1.ts"):
        import_nvauto.import_official(tmp_path / "arch")
    (ts / "model1.ts").rename(ts / "model2.ts")
    with pytest.raises(DeepIslesError, match="numbered"):
        import_nvauto.import_official(tmp_path / "arch")
    assert not store.member_dir("nvauto").exists()
    with pytest.raises(DeepIslesError, match="no NVAUTO models"):
        import_nvauto.import_official(tmp_path)


# --- MONAI 0.9.0 building blocks -----------------------------------------------------------------
def test_spacing_keeps_first_voxel_centre_and_rotation():
    ref = nib.load(FIX / "dwi.nii.gz")
    aff, shape = ref.affine, ref.shape
    target, shape1 = spacing_target(shape, aff, [1.0, 1.0, 1.0])
    sp = np.linalg.norm(aff[:3, :3], axis=0)
    assert np.allclose(target[:3, 3], aff[:3, 3])  # first voxel centre kept (MONAI 0.9.0)
    assert np.allclose(np.linalg.norm(target[:3, :3], axis=0), 1.0)
    assert np.allclose(target[:3, :3] * sp, aff[:3, :3], atol=1e-5)  # same directions
    assert shape1 == tuple(int(v) for v in np.round((np.array(shape) - 1) * sp + 1))
    assert shape1 == tuple(json.loads((FIX / "reference.json").read_text())["grid_1mm_shape"])
    # a sheared affine loses its shear; the offset is still an input corner
    sheared = aff.copy()
    sheared[0, 1] += 0.3
    z = zoom_affine(sheared, [1, 1, 1])
    assert np.allclose(z[:3, :3].T @ z[:3, :3], np.eye(3), atol=1e-9)
    _, offset = compute_shape_offset(shape, sheared, z)
    corners = [
        sheared[:3] @ np.array([i, j, k, 1.0])
        for i in (0, shape[0] - 1)
        for j in (0, shape[1] - 1)
        for k in (0, shape[2] - 1)
    ]
    assert any(np.allclose(offset, c) for c in corners)


def test_resample_identity_and_round_trip():
    aff = nib.load(FIX / "dwi.nii.gz").affine.copy()
    aff[:3, :3] = aff[:3, :3] / np.linalg.norm(aff[:3, :3], axis=0) * np.array([2.0, 2.0, 3.0])  # integer mm
    img = torch.rand(1, 10, 9, 8)
    assert torch.equal(resample(img, aff, aff, img.shape[1:]), img)
    up, shape = spacing_target(img.shape[1:], aff, [1.0, 1.0, 1.0])
    fine = resample(img, aff, up, shape)
    back, _ = spacing_target(shape, up, np.linalg.norm(aff[:3, :3], axis=0))
    again = resample(fine, up.astype(np.float32), back, img.shape[1:])
    assert torch.allclose(again, img, atol=1e-4)  # grid points of the coarse grid are on the fine grid


def test_monai09_gaussian_peak_and_clamp():
    g = monai09_gaussian((192, 192, 128))
    assert g.shape == (192, 192, 128) and g.dtype == torch.float32
    assert tuple(int(i) for i in np.unravel_index(int(torch.argmax(g)), g.shape)) == (96, 96, 64)
    assert float(g.max()) == 1.0 and float(g.min()) == pytest.approx(1e-3)
    assert torch.equal(g[96, 96, 1:], g[96, 96, 1:].flip(0))  # symmetric about size // 2, not (size - 1) / 2


def test_match_decision_breaks_ties_like_argmax():
    p = np.array([0.5, 0.5, 0.4999999, 0.7, 0.2], dtype=np.float32)
    decision = np.array([False, True, True, True, False])
    out = match_decision(p, decision)
    assert np.array_equal(out >= 0.5, decision) and out.dtype == np.float32
    assert float(np.abs(out - p).max()) < 1e-6
    assert out[0] == np.nextafter(np.float32(0.5), np.float32(0)) and out[2] == np.float32(0.5)
    assert np.array_equal(out[3:], p[3:])  # agreeing voxels are untouched


# --- parity with the reference ---------------------------------------------------------------------
def test_parity_with_reference_chain(home):
    import_nvauto.import_official(FIX)
    member = NvautoMember.from_store(device="cpu")
    assert len(member.models) == 2 and member.modalities == ("adc", "dwi")
    case = _case()
    res = member.run(case)
    ref = np.load(FIX / "reference.npz")
    diff = float(np.abs(res.probability - ref["prob_fg"]).max())
    mismatched = int((res.mask != (ref["label"] == 1)).sum())
    assert diff <= 1e-3, f"max |p - p_ref| = {diff}"  # measured 1.3e-6 on CPU
    assert np.array_equal(res.mask, ref["label"] == 1), f"{mismatched} voxels differ"  # identical on CPU
    assert res.probability.shape == case.dwi.shape and res.info["models"] == 2


def test_fast_mode_uses_the_fast_subset(home):
    import_nvauto.import_official(FIX)
    member = NvautoMember.from_store(device="cpu", fast=True)
    assert member.model_names == ["model0.safetensors"] and member.fast
