"""Foreign code in imported weights is never run.

The official NVAUTO models are TorchScript archives; loading one with ``torch.jit.load`` and calling it runs
the scripted code in the file. These tests build archives whose code writes a marker file when TorchScript
runs it (``torch.from_file(..., shared=True)`` creates and fills the file), archives whose ``data.pkl`` names
``os.system``/``builtins.exec``/..., and archives whose tensors do not fit the SegResNet, and check that

* ``deepisles weights import`` only reads tensors (or refuses with one line naming the file), and neither the
  import nor ``deepisles segment`` with the imported member ever creates the marker;
* globals outside the reader's allow-list are refused by name, as are odd zip entries and missing storages;
* missing, unexpected and wrong-shape tensors are refused, naming the first such key;
* a store written by an older deepisles (``model*.ts``) makes the member unavailable with the re-import
  reason, without loading the archive.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import SegResNet
from safetensors.torch import load_file

from deepisles import store
from deepisles.errors import DeepIslesError
from deepisles.members.base import MemberUnavailable
from deepisles.members.nvauto import DEFAULT_CONFIG, NvautoMember
from deepisles.weights import import_nvauto
from deepisles.weights.restricted import module_tensors, read_torchscript

OFFICIAL = Path(__file__).parent / "fixtures" / "official"
FIX_TS = OFFICIAL / "nvauto" / "weights" / "NVAUTO" / "ts"
ENSEMBLE_INPUTS = OFFICIAL / "ensemble" / "inputs"
KW = dict(spatial_dims=3, in_channels=2, out_channels=2, init_filters=2, blocks_down=(1,), blocks_up=(),
          norm=("GROUP", {"num_groups": 1}))  # fmt: skip


class ArmedSegResNet(SegResNet):
    """A SegResNet whose scripted forward creates and writes ``marker`` (16 bytes of 'X')."""

    def __init__(self, marker: str, **kw):
        super().__init__(**kw)
        self.marker = marker

    def forward(self, x):
        t = torch.from_file(self.marker, True, 16, dtype=torch.uint8)
        t.fill_(88)
        x = x + t.float().sum() * 0.0  # keeps the file access in the scripted graph
        x, down_x = self.encode(x)
        down_x.reverse()
        return self.decode(x, down_x)


class _Disguised(ArmedSegResNet):
    """The same, under the class name of MONAI's SegResNet (what an official archive names)."""


_Disguised.__module__ = "monai.networks.nets.segresnet"
_Disguised.__qualname__ = _Disguised.__name__ = "SegResNet"


def _save_scripted(module: torch.nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(module.eval()), str(path))
    return path


def _armed(path: Path, marker: Path, disguised: bool = True) -> Path:
    torch.manual_seed(0)
    return _save_scripted((_Disguised if disguised else ArmedSegResNet)(str(marker), **KW), path)


def _official_folder(root: Path, archive: Path) -> Path:
    ts = root / "weights" / "NVAUTO" / "ts"
    ts.mkdir(parents=True)
    shutil.copy(archive, ts / "model0.ts")
    return root


def _rewrite(src: Path, dst: Path, replace: dict[str, bytes | None] | None = None,
             add: dict[str, bytes] | None = None) -> Path:  # fmt: skip
    """A copy of the zip ``src`` with entries (by their name after the top folder) replaced or dropped."""
    replace, add = replace or {}, add or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            rel = info.filename.split("/", 1)[1]
            if rel in replace:
                if replace[rel] is not None:
                    zout.writestr(info.filename, replace[rel])
                continue
            zout.writestr(info.filename, zin.read(info))
        for name, data in add.items():
            zout.writestr(name, data)
    return dst


def _global_call(module: str, name: str, arg: str) -> bytes:
    """A protocol-2 pickle calling ``module.name(arg)`` (GLOBAL, BINUNICODE, TUPLE1, REDUCE)."""
    a = arg.encode()
    return (b"\x80\x02" + pickle.GLOBAL + f"{module}\n{name}\n".encode() + pickle.BINUNICODE
            + struct.pack("<I", len(a)) + a + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP)  # fmt: skip


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPISLES_HOME", str(tmp_path / "home"))
    from deepisles.members import clear_cache

    clear_cache()
    yield tmp_path / "home"
    clear_cache()


@pytest.fixture
def jit_loads(monkeypatch):
    """Records every ``torch.jit.load`` (and lets it run, so that old code would write the marker)."""
    calls, real = [], torch.jit.load

    def spy(*a, **k):
        calls.append(a[0] if a else k.get("f"))
        return real(*a, **k)

    monkeypatch.setattr(torch.jit, "load", spy)
    return calls


@pytest.fixture
def no_torchscript(monkeypatch):
    """Any TorchScript loading during the test fails loudly."""

    def boom(*a, **k):
        raise AssertionError("torch.jit.load called")

    monkeypatch.setattr(torch.jit, "load", boom)


# --- (a) code in the archive ------------------------------------------------------------------------------
def test_the_armed_archive_really_runs_its_code_under_torchscript(tmp_path):
    """Sanity check of the test archive: TorchScript, loading it and calling it, writes the marker."""
    marker = tmp_path / "armed-marker"
    path = _armed(tmp_path / "armed.ts", marker)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.jit.load(str(path))
    assert not marker.exists()
    model(torch.zeros(1, 2, 8, 8, 8))
    assert marker.read_bytes() == b"X" * 16


def test_import_and_segment_never_run_the_archives_code(home, tmp_path, jit_loads):
    from typer.testing import CliRunner

    from deepisles.cli import app

    marker = tmp_path / "marker"
    folder = _official_folder(tmp_path / "official", _armed(tmp_path / "armed.ts", marker))
    runner = CliRunner()
    res = runner.invoke(app, ["weights", "import", str(folder), "--members", "nvauto"])
    assert res.exit_code == 0, res.output
    assert not marker.exists()
    meta, dest = store.read_member("nvauto", verify=True)
    assert [m["file"] for m in meta["models"]] == ["model0.safetensors"] and not list(dest.glob("*.ts"))
    assert meta["network"]["kwargs"]["init_filters"] == 2 and "marker" not in json.dumps(meta["network"])
    stored = load_file(str(dest / "model0.safetensors"))
    original = module_tensors(read_torchscript(folder / "weights" / "NVAUTO" / "ts" / "model0.ts").root)
    assert set(stored) == set(original) and all(torch.equal(stored[k], original[k]) for k in stored)

    out = tmp_path / "seg"
    res = runner.invoke(app, ["segment", "--dwi", str(ENSEMBLE_INPUTS / "dwi.nii.gz"),
                              "--adc", str(ENSEMBLE_INPUTS / "adc.nii.gz"), "-o", str(out),
                              "--members", "nvauto", "--device", "cpu", "--no-preview"])  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert [m["name"] for m in report["members"]["run"]] == ["nvauto"]
    assert not marker.exists() and jit_loads == []


def test_an_undisguised_archive_is_refused_in_one_line(home, tmp_path, no_torchscript):
    marker = tmp_path / "marker"
    folder = _official_folder(tmp_path / "official", _armed(tmp_path / "armed.ts", marker, disguised=False))
    with pytest.raises(DeepIslesError) as exc:
        import_nvauto.import_official(folder)
    msg = str(exc.value)
    assert "model0.ts" in msg and "ArmedSegResNet" in msg and "\n" not in msg
    assert not marker.exists() and not store.member_dir("nvauto").exists()


# --- (b) globals and archive structure ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "module,name", [("os", "system"), ("posix", "system"), ("builtins", "exec"), ("subprocess", "Popen"),
                    ("torch", "load"), ("torch.serialization", "load")]  # fmt: skip
)
def test_globals_outside_the_allow_list_are_refused_by_name(home, tmp_path, module, name, no_torchscript):
    marker = tmp_path / "marker"
    evil = _rewrite(FIX_TS / "model0.ts", tmp_path / "evil.ts", {"data.pkl": _global_call(module, name, f"touch {marker}")})
    folder = _official_folder(tmp_path / "official", evil)
    with pytest.raises(DeepIslesError) as exc:
        import_nvauto.import_official(folder)
    msg = str(exc.value)
    assert f"global {module}.{name}" in msg and "model0.ts" in msg and "\n" not in msg
    assert not marker.exists() and not store.member_dir("nvauto").exists()


def test_a_scripted_class_is_a_stand_in_even_when_called(tmp_path):
    """``__torch__.*`` globals are recorded, never imported: a call of one just records its arguments."""
    evil = _rewrite(FIX_TS / "model0.ts", tmp_path / "evil.ts",
                    {"data.pkl": _global_call("__torch__.os", "system", "touch x")})  # fmt: skip
    with pytest.raises(DeepIslesError, match="does not hold a scripted module"):
        read_torchscript(evil)


def test_code_folder_is_never_read(tmp_path):
    """The reader ignores code/: an archive whose scripted code is garbage reads the same tensors."""
    garbage = {"code/__torch__/monai/networks/nets/segresnet.py": b"import os\nos.system('touch x')\n"}
    tampered = _rewrite(FIX_TS / "model0.ts", tmp_path / "tampered.ts", garbage)
    a, b = (module_tensors(read_torchscript(p).root) for p in (FIX_TS / "model0.ts", tampered))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "change,expected",
    [
        ({"replace": {"data/3": None}}, "storage key 3 not in the archive"),
        ({"replace": {"data/3": b"\0" * 5}}, "storage 3: 5 bytes"),
        ({"add": {"model0/../../escape": b"x"}}, "odd name"),
        ({"add": {"other/file": b"x"}}, "outside the archive's single top folder"),
        ({"replace": {"data.pkl": None}}, "no model0/data.pkl"),
        ({"replace": {"data.pkl": b"\x80\x02(."}}, "cannot read this TorchScript archive"),
    ],
)
def test_malformed_archives_are_refused(tmp_path, change, expected):
    bad = _rewrite(FIX_TS / "model0.ts", tmp_path / "bad.ts", **change)
    with pytest.raises(DeepIslesError) as exc:
        read_torchscript(bad)
    assert expected in str(exc.value) and "bad.ts" in str(exc.value) and "\n" not in str(exc.value)


def test_absurd_sizes_are_refused(tmp_path, monkeypatch):
    from deepisles.weights import restricted

    monkeypatch.setattr(restricted, "MAX_ENTRY_BYTES", 100)
    with pytest.raises(DeepIslesError, match="bytes \\(at most 100\\)"):
        read_torchscript(FIX_TS / "model0.ts")


# --- (c) tensors that do not fit the SegResNet ---------------------------------------------------------------
def _variant(tmp_path: Path, edit) -> Path:
    torch.manual_seed(0)
    net = SegResNet(**KW)
    edit(net)
    return _official_folder(tmp_path / "official", _save_scripted(net, tmp_path / "variant.ts"))


def _wrong_shape(net):
    net.down_layers[0][1].conv1.conv.weight = torch.nn.Parameter(torch.zeros(2, 2, 3, 3, 1))


def _missing(net):
    net.down_layers[0][1].norm1.register_parameter("weight", None)


def _unexpected(net):
    net.extra = torch.nn.Parameter(torch.zeros(3))


def _bad_hyper_parameter(net):
    net.act = ("os.system", {"inplace": True})


@pytest.mark.parametrize(
    "edit,expected",
    [
        (_wrong_shape, "tensor down_layers.0.1.conv1.conv.weight has shape (2, 2, 3, 3, 1), the SegResNet needs "
                       "(2, 2, 3, 3, 3)"),
        (_missing, "tensor down_layers.0.1.norm1.weight missing"),
        (_unexpected, "unexpected tensor extra"),
        (_bad_hyper_parameter, "unsupported SegResNet hyper-parameter act = ('os.system'"),
    ],
)  # fmt: skip
def test_tensors_must_fit_our_segresnet(home, tmp_path, edit, expected):
    folder = _variant(tmp_path, edit)
    with pytest.raises(DeepIslesError) as exc:
        import_nvauto.import_official(folder)
    assert expected in str(exc.value) and "model0.ts" in str(exc.value) and "\n" not in str(exc.value)
    assert not store.member_dir("nvauto").exists()


def test_fixture_models_read_exactly_what_torchscript_holds():
    """The reader's tensors are TorchScript's own (checked on our trusted fixtures with torch.jit.load)."""
    for k in (0, 1):
        spec, tensors = import_nvauto.read_model(FIX_TS / f"model{k}.ts")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.jit.load(str(FIX_TS / f"model{k}.ts")).state_dict()
        assert set(state) == set(tensors) and all(torch.equal(state[n], tensors[n]) for n in state)
        assert set(import_nvauto.build_segresnet(spec).state_dict()) == set(tensors)


# --- (d) stores written by older deepisles -----------------------------------------------------------------
def _old_store(archive: Path) -> Path:
    meta = {"source": "old", "inputs": ["adc", "dwi"], "models": ["model0.ts"], "config": dict(DEFAULT_CONFIG),
            "architecture": "MONAI SegResNet, TorchScript"}  # fmt: skip
    return store.write_member("nvauto", meta, {"model0.ts": lambda dst: shutil.copyfile(archive, dst)})


def test_old_torchscript_store_is_unavailable_with_the_reimport_reason(home, tmp_path, no_torchscript):
    marker = tmp_path / "marker"
    _old_store(_armed(tmp_path / "armed.ts", marker))
    with pytest.raises(MemberUnavailable) as exc:
        NvautoMember.from_store(device="cpu")
    assert "TorchScript" in exc.value.reason and "deepisles weights import" in exc.value.reason
    from deepisles.members import resolve_members

    members, skipped = resolve_members(["nvauto", "classical"], device="cpu")
    assert [m.name for m in members] == ["classical"]
    assert skipped[0]["member"] == "nvauto" and "deepisles weights import" in skipped[0]["reason"]
    from deepisles.training.members import make_trainable

    with pytest.raises(DeepIslesError, match="deepisles weights import"):
        make_trainable("nvauto", "official")
    assert not marker.exists()


def test_old_member_json_without_model_list_is_unavailable_too(home, tmp_path, no_torchscript):
    meta = {"source": "old", "inputs": ["adc", "dwi"], "config": dict(DEFAULT_CONFIG)}
    store.write_member("nvauto", meta, {"model0.ts": lambda dst: shutil.copyfile(FIX_TS / "model0.ts", dst)})
    with pytest.raises(MemberUnavailable, match="weights import"):
        NvautoMember.from_store(device="cpu")


def test_training_checkpoint_with_a_torchscript_network_is_not_loaded(tmp_path, no_torchscript):
    from deepisles.training.checkpoint import load_checkpoint

    ck = tmp_path / "run" / "checkpoint"
    ck.mkdir(parents=True)
    (ck / "state.json").write_text(json.dumps({"iteration": 2}))
    shutil.copy(FIX_TS / "model0.ts", ck / "network.ts")
    net = SegResNet(**KW)
    with pytest.raises(DeepIslesError, match="TorchScript"):
        load_checkpoint(tmp_path / "run", net, torch.optim.SGD(net.parameters(), lr=0.1))


# --- FACTORIZER: the architecture-folder message ---------------------------------------------------------------
def test_factorizer_architecture_mismatch_says_what_is_wrong():
    from deepisles.weights.import_factorizer import _arch_mismatch

    msg = _arch_mismatch(Path("fold0/resunet/x.ckpt"), {"partial": {"ref": "factorizer.SegmentationFactorizer"}},
                         "swin-factorizer", "resunet")  # fmt: skip
    assert "Swin-Factorizer" in msg and "factorizer.SegmentationFactorizer" in msg and "`resunet`" in msg
    assert "Res-U-Net (factorizer.UNet)" in msg
    msg = _arch_mismatch(Path("x.ckpt"), {"object": "something.Else"}, "", "resunet")
    assert "no network class DeepISLES knows" in msg and "something.Else" in msg and "holds a  network" not in msg


def test_stored_tensors_are_what_the_reader_returns(home):
    import_nvauto.import_official(OFFICIAL / "nvauto")
    meta, folder = store.read_member("nvauto", verify=True)
    for k in (0, 1):
        stored = load_file(str(folder / f"model{k}.safetensors"))
        _, read = import_nvauto.read_model(FIX_TS / f"model{k}.ts")
        assert all(np.array_equal(stored[n].numpy(), read[n].numpy()) for n in read)
