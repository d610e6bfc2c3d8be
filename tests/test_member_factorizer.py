"""FACTORIZER member: import of official-format Lightning checkpoints and parity with the reference code.

The fixture (tests/fixtures/official/factorizer/, see scripts/make_official_fixtures_factorizer.md) holds
tiny random-weight Res-U-Nets and Swin Factorizers (2 folds each) saved as the official checkpoints, a
DWI/ADC/FLAIR phantom on an oblique anisotropic grid, and the output of DeepISLES' FACTORIZER code path
(vendored factorizer 0.0.1, MONAI 0.9.0, models in eval mode) on it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from deepisles import store
from deepisles.core import Case
from deepisles.errors import DeepIslesError
from deepisles.io.image import Image
from deepisles.members.base import MemberUnavailable
from deepisles.members.factorizer import FactorizerMember, normalize_nonzero, resized_shape
from deepisles.weights import import_factorizer as imp

FIX = Path(__file__).parent / "fixtures" / "official" / "factorizer"
MODELS = ["fold0_resunet", "fold1_resunet", "fold0_swin-factorizer", "fold1_swin-factorizer"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The fixture's checkpoints imported into a temporary DEEPISLES_HOME (once for the module)."""
    home = tmp_path_factory.mktemp("deepisles_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPISLES_HOME", str(home))
        folder = imp.locate(FIX)
        assert folder == FIX / "weights" / "FACTORIZER"
        dest = imp.import_official(folder)
        yield dest


def _image(name: str) -> Image:
    img = nib.load(str(FIX / "inputs" / f"{name}.nii.gz"))
    return Image(np.asarray(img.dataobj).astype(np.float32), img.affine, name)


def _case(with_flair: bool = True) -> Case:
    dwi, adc, flair = _image("dwi"), _image("adc"), _image("flair")
    adc = adc.with_data(adc.data / 1000.0)  # the pipeline's canonical unit; the z-score does not see it
    return Case(dwi=dwi, adc=adc, brain=np.ones(dwi.shape, bool), flair=flair if with_flair else None)


def test_import_writes_safetensors_and_json(imported):
    dest = imported
    files = sorted(p.name for p in dest.iterdir())
    assert files == sorted(["member.json", *(f"{m}.safetensors" for m in MODELS)])
    for p in dest.iterdir():  # no pickles (torch zip archives or raw pickles) in the store
        head = p.read_bytes()[:2]
        assert head not in (b"PK", b"\x80\x02", b"\x80\x04", b"\x80\x05")
    meta = json.loads((dest / "member.json").read_text())
    assert meta["format"] == 2 and meta["member"] == "factorizer" and meta["inputs"] == ["dwi", "adc", "flair"]
    assert meta["settings"]["roi_size"] == [64, 64, 64] and meta["settings"]["ensemble_weight"] == 0.1
    assert [m["name"] for m in meta["models"]] == MODELS
    for m in meta["models"]:
        tensors = load_file(str(dest / m["file"]))
        assert tensors and not any(k.startswith("net.") for k in tensors)
        net = m["network"]  # a JSON spec of the functools.partial stored by Lightning
        assert net["partial"]["ref"].endswith("UNet" if m["arch"] == "resunet" else "SegmentationFactorizer")
        width = [8, 16, 16] if m["arch"] == "resunet" else [4, 8, 8]
        assert net["kwargs"]["in_channels"] == 3 and net["kwargs"]["encoder_width"] == width
        json.dumps(m)  # plain JSON all the way down
    swin = meta["models"][2]["network"]["kwargs"]
    assert swin["nmf"][1]["tensorize"][1] == {"head_dim": 4, "patch_size": 4, "shifts": [None, 1, 2, 3]}
    store.read_member("factorizer", verify=True)
    for root in (FIX / "weights", FIX / "weights" / "FACTORIZER"):
        assert imp.locate(root) == FIX / "weights" / "FACTORIZER"
    with pytest.raises(DeepIslesError, match="already installed"):
        imp.import_official(FIX / "weights" / "FACTORIZER")


def test_parity_with_reference(imported):
    member = FactorizerMember.from_store("cpu")
    assert all(not net.training for net in member.models)
    ref = np.load(FIX / "reference.npz")
    case = _case()
    res = member.run(case)  # CPU, float32
    ref_prob = 1.0 / (1.0 + np.exp(-ref["scaled_logit"].astype(np.float64) / 0.1))  # sigmoid(mean logit)
    assert res.probability.shape == case.dwi.shape
    assert np.abs(res.probability - ref_prob).max() <= 1e-3  # measured 2.1e-7 on CPU
    a, b = res.mask.astype(bool), ref["mask"].astype(bool)
    assert b.sum() > 1000 and (~b).sum() > 1000  # the fixture's decision is not trivial
    assert np.array_equal(a, b), f"{int((a != b).sum())} voxels differ from the reference mask"  # identical on CPU
    assert res.info["models"] == MODELS and res.info["eval_mode"] is True


def test_fast_mode_runs_resunets_only(imported):
    member = FactorizerMember.from_store("cpu", fast=True)
    assert member.model_names == ["fold0_resunet", "fold1_resunet"]


def test_missing_flair_is_unavailable(imported):
    member = FactorizerMember.from_store("cpu", fast=True)
    with pytest.raises(MemberUnavailable, match="FLAIR"):
        member.run(_case(with_flair=False))


def test_from_store_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPISLES_HOME", str(tmp_path))
    with pytest.raises(MemberUnavailable, match="no weights installed"):
        FactorizerMember.from_store("cpu")
    assert imp.locate(tmp_path) is None


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo should-not-run > /dev/null",))


def test_unpickler_never_resolves_arbitrary_globals(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"x": _Evil(), "t": torch.arange(3.0), "f": torch.nn.Conv3d}, path)
    out = imp.read_checkpoint(path)
    assert isinstance(out["x"], imp.StandIn) and out["x"]._ref.endswith(".system")
    assert torch.equal(out["t"], torch.arange(3.0))
    assert imp.to_json(out["f"]) == {"ref": "torch.nn.modules.conv.Conv3d"}
    with pytest.raises(DeepIslesError, match="hyper_parameters"):
        imp.convert_checkpoint(path)


def test_preprocessing_helpers():
    x = np.array([[[0.0, 1.0], [2.0, 3.0]]], dtype=np.float32)[None]
    out = normalize_nonzero(x.copy())
    nz = x != 0
    assert out[~nz].tolist() == [0.0] and abs(float(out[nz].mean())) < 1e-6
    assert resized_shape((64, 56, 30), (2.0, 2.0, 2.0), (2.0, 2.0, 2.0)) is None
    assert resized_shape((64, 56, 30), (2.3, 2.6, 3.2), (2.0, 2.0, 2.0)) == (74, 73, 48)
