"""member.json: one schema (format 2) read into typed configs, clear one-line errors, and stores written by older
deepisles (format 1: SEALS' nested blocks, NVAUTO's ``config``, FACTORIZER's top level) migrated on read.

``tests/fixtures/store_v1/<member>/member.json`` are the files the format-1 importers wrote for the official-format
fixtures in ``tests/fixtures/official/`` (paths made relative); the packaged default models are format 1 too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from deepisles import store
from deepisles.members import base, resolve_members
from deepisles.members.base import MemberUnavailable
from deepisles.members.config import ConfigError, MemberConfig
from deepisles.members.factorizer import FactorizerMember
from deepisles.members.nvauto import NvautoMember, NvautoSettings
from deepisles.members.seals import SealsMember
from deepisles.weights import import_factorizer, import_nvauto, import_seals

FIX = Path(__file__).parent / "fixtures"
V1 = FIX / "store_v1"
CLASSES = {"seals": SealsMember, "nvauto": NvautoMember, "factorizer": FactorizerMember}


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    """The official-format fixtures imported by today's importers (format 2), once for the module."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPISLES_HOME", str(home))
        import_seals.import_official(import_seals.locate(FIX / "official" / "seals" / "main"))
        import_nvauto.import_official(FIX / "official" / "nvauto")
        import_factorizer.import_official(import_factorizer.locate(FIX / "official" / "factorizer"))
    return home / "weights"


def _v1(member: str) -> dict:
    return json.loads((V1 / member / "member.json").read_text())


# --- format 1 -> 2 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("member", ["seals", "nvauto", "factorizer"])
def test_old_layout_reads_as_what_the_importer_writes_today(imported, member):
    old = _v1(member)
    assert old["format"] == 1
    new = json.loads((imported / member / "member.json").read_text())
    assert new["format"] == 2 and set(new) <= {"format", "member", "source", "inputs", "network", "models",
                                               "settings", "provenance", "files", "origin"}  # fmt: skip
    cls = CLASSES[member]
    a, b = cls.parse(old), cls.parse(new)
    # everything but where each was imported from and the digests (safetensors' header order varies by process)
    assert a.replace(source=None, files={}) == b.replace(source=None, files={})
    assert set(a.files) == set(b.files) == {m.file for m in a.models}
    assert MemberConfig.from_json(a.to_json(), cls.settings_cls, member) == a.replace(files={})  # format 2 round trip


@pytest.mark.parametrize("member", ["seals", "nvauto", "factorizer"])
def test_a_store_in_the_old_layout_loads_the_same_networks(imported, tmp_path, member):
    old_store = tmp_path / member
    shutil.copytree(imported / member, old_store)
    old = _v1(member)
    old["files"] = {f: store.sha256_file(old_store / f) for f in old["files"]}  # this import's tensor files
    (old_store / "member.json").write_text(json.dumps(old))
    store.read_member_folder(old_store, verify=True)
    cls = CLASSES[member]
    old, new = cls.from_folder(old_store), cls.from_folder(imported / member)
    assert old.config.replace(source=None, files={}) == new.config.replace(source=None, files={})
    assert len(old.networks) == len(new.networks) > 0
    for n_old, n_new in zip(old.networks, new.networks, strict=True):
        sa, sb = n_old.state_dict(), n_new.state_dict()
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_old_nvauto_fast_subset_and_seals_folds_survive_migration():
    nv = NvautoMember.parse(_v1("nvauto"))
    assert [m.file for m in nv.models] == ["model0.safetensors", "model1.safetensors"]
    assert nv.settings == NvautoSettings() and nv.inputs == ("adc", "dwi")
    assert nv.provenance["official_files"]["model1.safetensors"]["file"] == "ts/model1.ts"
    seals = SealsMember.parse(_v1("seals"))
    assert [(m.file, m.fold) for m in seals.models] == [("fold_0.safetensors", 0), ("fold_1.safetensors", 1)]
    assert seals.settings.inference.patch_size == (24, 32, 32) and seals.provenance["trainer"] == "nnUNetTrainerV2_DDP"


def test_packaged_default_models_load_in_the_format_they_were_written(default_models):
    """The default models shipped in the package: FACTORIZER written by format-1 deepisles (stage 1), SEALS and
    NVAUTO by format 2 (stage 2, docs/training.md); both formats keep loading."""
    for member, cls in CLASSES.items():
        meta, folder = store.read_member_folder(default_models / member, verify=True)
        assert meta["format"] in (1, 2)
        cfg = cls.parse(meta)
        assert cfg.origin["kind"] == "default" and len(cfg.models) == 1 and cfg.models[0].fold == 0
        assert (folder / cfg.models[0].file).is_file()
    nv = NvautoMember.parse(store.read_member_folder(default_models / "nvauto")[0])
    assert nv.settings.pixdim == (2.0, 2.0, 2.0) and nv.settings.fast_models == (0,)
    assert nv.settings.overlap == 0.5 and nv.settings.sigma_scale == 0.125  # the rest from the reference defaults
    fz = FactorizerMember.parse(store.read_member_folder(default_models / "factorizer")[0])
    assert fz.models[0].arch == "resunet" and fz.models[0].ensemble_weight == 1.0 and fz.models[0].network
    members, skipped = resolve_members("seals,nvauto,factorizer", "cpu")
    assert [m.name for m in members] == ["seals", "nvauto", "factorizer"] and not skipped


# --- validation: one line, the field named ------------------------------------------------------------------
def _nvauto_v2() -> dict:
    return NvautoMember.parse(_v1("nvauto")).to_json()


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda m: m["settings"].update(roi_sise=[64, 64, 64]), "settings: unknown field(s) roi_sise"),
        (lambda m: m["settings"].update(roi_size=[64, "a", 64]), "settings.roi_size[1]: expected an integer, got 'a'"),
        (lambda m: m["settings"].update(roi_size=[64, 64]), "settings.roi_size: expected 3 positive values"),
        (lambda m: m["settings"].update(overlap=1.5), "settings.overlap: expected a value in [0, 1)"),
        (lambda m: m["settings"].update(amp="yes"), "settings.amp: expected true/false, got 'yes'"),
        (lambda m: m["settings"]["resample"].update(mode="cubic"), "settings.resample.mode: expected bilinear"),
        (lambda m: m.update(inputs=["dwi", "dwi"]), "inputs: expected distinct names from dwi, adc, flair"),
        (lambda m: m.update(inputs=["t2"]), "inputs: expected distinct names"),
        (lambda m: m.update(format=3), "format 3 is not one this deepisles reads (1, 2)"),
        (lambda m: m.update(member="seals"), "describes member 'seals', expected 'nvauto'"),
        (lambda m: m.update(modles=[]), "unknown field(s) modles"),
        (lambda m: m["models"][0].update(file="../x.safetensors"), "models[0].file: expected a file name inside"),
        (lambda m: m["models"][1].update(file="model0.safetensors"), "models: a file is listed twice"),
        (lambda m: m["models"][0].update(fold="0"), "models[0].fold: expected an integer or null, got '0'"),
    ],
)
def test_invalid_member_json_names_the_field(edit, expected):
    meta = _nvauto_v2()
    edit(meta)
    with pytest.raises(ConfigError) as exc:
        NvautoMember.parse(meta, "/store/nvauto/member.json")
    msg = str(exc.value)
    assert msg.startswith("/store/nvauto/member.json") and expected in msg and "\n" not in msg, msg


def test_seals_settings_require_the_plans_values():
    meta = SealsMember.parse(_v1("seals")).to_json()
    del meta["settings"]["preprocessing"]["target_spacing"]
    with pytest.raises(ConfigError, match=r"settings\.preprocessing: missing field target_spacing"):
        SealsMember.parse(meta)
    meta = SealsMember.parse(_v1("seals")).to_json()
    meta["settings"]["preprocessing"]["transpose_forward"] = [0, 1, 1]
    with pytest.raises(ConfigError, match="transpose_forward: expected a permutation"):
        SealsMember.parse(meta)
    meta = SealsMember.parse(_v1("seals")).to_json()
    meta["settings"]["preprocessing"]["normalization_schemes"] = ["CT", "nonCT"]
    with pytest.raises(ConfigError, match="CT normalization needs the intensity properties"):
        SealsMember.parse(meta)


def test_a_broken_store_makes_the_member_unavailable_with_the_reason(imported, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPISLES_HOME", str(tmp_path))
    shutil.copytree(imported / "nvauto", tmp_path / "weights" / "nvauto")
    path = tmp_path / "weights" / "nvauto" / "member.json"
    meta = json.loads(path.read_text())
    meta["settings"]["roi_size"] = [0, 64, 64]
    path.write_text(json.dumps(meta))
    with pytest.raises(MemberUnavailable, match=r"member\.json\.settings\.roi_size: expected 3 positive values"):
        NvautoMember.from_store()
    members, skipped = resolve_members("classical,nvauto")
    assert [m.name for m in members] == ["classical"] and "settings.roi_size" in skipped[0]["reason"]


def test_a_torchscript_store_says_re_import_before_anything_else():
    meta = {"format": 2, "inputs": ["adc", "dwi"], "models": ["model0.ts"], "settings": {"bogus": 1}}
    with pytest.raises(ConfigError, match="TorchScript.*deepisles weights import PATH --members nvauto"):
        NvautoMember.parse(meta, "/s/nvauto/member.json")


def test_from_store_uses_the_default_model_only_when_nothing_is_installed(default_models, imported, monkeypatch):
    member = NvautoMember.from_store()
    assert member.weights_origin["kind"] == "default" and member.config.settings.pixdim == (2.0, 2.0, 2.0)
    monkeypatch.setenv("DEEPISLES_HOME", str(imported.parent))
    member = NvautoMember.from_store()
    assert member.weights_origin["kind"] == "imported" and member.config.settings.pixdim == (1.0, 1.0, 1.0)
    assert base.has_default_model("nvauto")
