"""SEALS member: importer of the official nnU-Net v1 checkpoints and parity with DeepISLES' SEALS chain.

The fixtures (tests/fixtures/official/seals/, see scripts/make_official_fixtures_seals.md) hold small random-weight
models in the official formats and the outputs of the reference code (DeepISLES' launcher chain with its nnU-Net
fork) on a small synthetic DWI/ADC pair.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from deepisles import store
from deepisles.core import Case
from deepisles.errors import DeepIslesError
from deepisles.members.base import MemberUnavailable
from deepisles.members.seals import SealsMember, _pixdim_like, deepisles_grid_size
from deepisles.preprocess.inputs import load_inputs
from deepisles.weights import import_seals

FIX = Path(__file__).parent / "fixtures" / "official" / "seals"
TRAINER_DIR = "weights/SEALS/nnUNet_trained_models/nnUNet/3d_fullres/Task012_Ischemic_Stroke_TM_Fullset"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPISLES_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def case() -> Case:
    inp = load_inputs(FIX / "input" / "dwi.nii.gz", FIX / "input" / "adc.nii.gz")
    return Case(dwi=inp.dwi, adc=inp.adc, brain=np.asarray(inp.dwi.data) > 0)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 1.0 if not (a.any() or b.any()) else 2.0 * (a & b).sum() / (a.sum() + b.sum())


# --- importer ------------------------------------------------------------------------------------
def test_locate_accepts_archive_root_weights_and_trainer_folder(tmp_path):
    trainer = FIX / "main" / TRAINER_DIR / "nnUNetTrainerV2_DDP__nnUNetPlansv2.1"
    assert import_seals.locate(FIX / "main") == trainer
    assert import_seals.locate(FIX / "main" / "weights") == trainer
    assert import_seals.locate(trainer) == trainer
    assert import_seals.locate(FIX / "resample").name == "nnUNetTrainerV2__nnUNetPlansv2.1"
    assert import_seals.locate(tmp_path) is None


def test_import_writes_safetensors_without_module_prefix(home):
    src = import_seals.locate(FIX / "main")
    messages = []
    dest = import_seals.import_official(src, say=messages.append)
    assert any("unpickling official SEALS checkpoint" in m for m in messages)
    meta = json.loads((dest / "member.json").read_text())
    assert meta["format"] == 2 and meta["member"] == "seals" and meta["inputs"] == ["dwi", "adc"]
    assert meta["models"] == [{"file": f"fold_{k}.safetensors", "name": f"fold_{k}", "fold": k} for k in (0, 1)]
    assert meta["provenance"]["trainer"] == "nnUNetTrainerV2_DDP"
    assert meta["network"]["base_num_features"] == 4 and meta["settings"]["inference"]["patch_size"] == [24, 32, 32]
    assert set(meta["files"]) == {"fold_0.safetensors", "fold_1.safetensors"}
    for name, digest in meta["files"].items():
        assert store.sha256_file(dest / name) == digest
    # nothing pickled in the store: only JSON and safetensors (8-byte little-endian header length, then JSON)
    assert sorted(p.name for p in dest.iterdir()) == ["fold_0.safetensors", "fold_1.safetensors", "member.json"]
    for k in (0, 1):
        raw = (dest / f"fold_{k}.safetensors").read_bytes()
        assert raw[8:9] == b"{" and not raw.startswith(b"\x80") and not raw.startswith(b"PK")
        sd = load_file(str(dest / f"fold_{k}.safetensors"))
        ck = import_seals.load_checkpoint(src / f"fold_{k}" / "model_final_checkpoint.model")
        assert all(key.startswith("module.") for key in ck["state_dict"])  # DDP checkpoints
        assert not any(key.startswith("module.") for key in sd)
        assert set(sd) == {key[len("module."):] for key in ck["state_dict"]}
        for key, t in ck["state_dict"].items():
            assert torch.equal(sd[key[len("module."):]], t)
    with pytest.raises(DeepIslesError, match="already installed"):
        import_seals.import_official(src)
    import_seals.import_official(src, overwrite=True)


def test_import_reads_stage_transpose_and_export_params(home):
    meta = json.loads((import_seals.import_official(import_seals.locate(FIX / "resample")) / "member.json")
                      .read_text())
    assert meta["provenance"]["stage"] == 1 and meta["provenance"]["trainer"] == "nnUNetTrainerV2"
    pre = meta["settings"]["preprocessing"]
    assert pre["transpose_forward"] == [2, 0, 1] and pre["transpose_backward"] == [1, 2, 0]
    assert pre["target_spacing"] == [1.25, 1.6, 1.1] and pre["use_mask_for_norm"] == [True, False]
    assert meta["network"]["pool_op_kernel_sizes"] == [[1, 2, 2], [2, 2, 2]]
    meta = json.loads((import_seals.import_official(import_seals.locate(FIX / "separate_z"), overwrite=True)
                       / "member.json").read_text())
    assert meta["settings"]["export"]["interpolation_order"] == 3
    assert meta["settings"]["preprocessing"]["normalization_schemes"] == ["nonCT", "CT"]
    assert meta["settings"]["preprocessing"]["intensity_properties"][1]["percentile_99_5"] == 3.2


def test_restricted_unpickler_refuses_foreign_globals(tmp_path):
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("true",))

    bad = tmp_path / "plans.pkl"
    bad.write_bytes(pickle.dumps({"plans": Evil()}))
    with pytest.raises(DeepIslesError, match="refusing to unpickle global"):
        import_seals.load_pickle(bad)
    torch.save({"state_dict": {}, "x": Evil()}, tmp_path / "model_final_checkpoint.model")
    with pytest.raises(DeepIslesError, match="refusing"):
        import_seals.load_checkpoint(tmp_path / "model_final_checkpoint.model")


def test_from_store_without_weights_is_unavailable(home):
    with pytest.raises(MemberUnavailable, match="no weights installed"):
        SealsMember.from_store()


# --- geometry helpers ----------------------------------------------------------------------------
def test_grid_size_and_pixdim_recovery():
    assert deepisles_grid_size((112, 112, 73), (2.0, 2.0, 2.0)) == ([224, 224, 146], False)
    size, wrapped = deepisles_grid_size((256, 256, 40), (1.0, 1.0, 3.0))
    assert size == [256, 256, 120] and wrapped  # DeepISLES' uint8 would give 0 here
    assert _pixdim_like(2.100000109018271) == float(np.float32(2.1))
    assert _pixdim_like(1.9999999) == 2.0 and _pixdim_like(0.8984375000001) == 0.8984375


# --- parity with the reference chain --------------------------------------------------------------
@pytest.mark.parametrize("variant", ["main", "resample", "separate_z"])
def test_parity_with_deepisles_seals(home, case, variant):
    """main: 2 DDP folds, 1 mm plans; resample: transposed axes, cubic resampling to 1.25x1.6x1.1 mm, stage 1;
    separate_z: 3.5 mm out-of-plane (nnU-Net's separate-z resampling), CT normalization, cubic export."""
    import_seals.import_official(import_seals.locate(FIX / variant))
    member = SealsMember.from_store("cpu")
    result = member.run(case)
    ref = np.load(FIX / variant / "reference.npz")
    assert result.probability.shape == ref["probability"].shape == case.dwi.shape
    assert float(np.abs(result.probability - ref["probability"]).max()) <= 1e-3  # measured <= 2.0e-4 on CPU
    differ = int((result.mask.astype(bool) != ref["mask"].astype(bool)).sum())
    assert differ == 0, f"{differ} voxels differ from the reference mask"  # identical on CPU
    assert ref["mask"].sum() > 100  # the fixture's decision is not trivial
    info = member.report_info()
    assert info["mirroring"] is True and info["folds"] == ([0, 1] if variant == "main" else [0])


def test_fast_mode_skips_mirroring(home, case):
    import_seals.import_official(import_seals.locate(FIX / "separate_z"))
    member = SealsMember.from_store("cpu", fast=True)
    result = member.run(case)
    ref = np.load(FIX / "separate_z" / "reference.npz")
    assert member.report_info()["mirroring"] is False
    assert result.probability.shape == case.dwi.shape
    assert not np.array_equal(result.probability, ref["probability"])  # not the mirrored reference
    assert 0.0 < _dice(result.mask, ref["mask"]) < 1.0
