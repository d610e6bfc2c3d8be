"""The member registry is the one list of members; the member contract is what training and inference share;
members and weights depend on each other in one direction only."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from deepisles.cli import app
from deepisles.errors import DeepIslesError
from deepisles.members import check_member_spec, registry, resolve_members
from deepisles.members.base import Member, StoredMember
from deepisles.members.classical import ClassicalMember, ClassicalParams
from deepisles.members.registry import MemberSpec

SRC = Path(__file__).resolve().parents[1] / "src" / "deepisles"


def test_the_registry_lists_every_member_once_with_what_it_names():
    assert registry.known_members() == ("classical", "seals", "nvauto", "factorizer")
    assert registry.deep_members() == registry.importable_members() == registry.trainable_members()
    assert registry.deep_members() == ("seals", "nvauto", "factorizer")
    for name, spec in registry.MEMBERS.items():
        cls = spec.runtime_class()
        assert issubclass(cls, Member) and cls.name == name
        settings = spec.settings_class()
        if not spec.stored:
            assert settings is ClassicalParams and cls is ClassicalMember and spec.importer is None
            continue
        assert issubclass(cls, StoredMember) and cls.settings_cls is settings
        importer = importlib.import_module(spec.importer)
        assert importer.__name__.startswith("deepisles.weights.") and callable(importer.locate)
        assert callable(importer.import_official)
        recipe = cls.parse(spec.compact_recipe())  # the recipe is a valid member.json of the member
        assert recipe.member == name and recipe.models == ()


def test_consumers_read_the_registry():
    from deepisles.api import owned_outputs
    from deepisles.members import DEEP_MEMBERS, KNOWN_MEMBERS
    from deepisles.training.members import make_trainable

    assert check_member_spec("auto") == list(DEEP_MEMBERS) == list(registry.deep_members())
    assert KNOWN_MEMBERS == registry.known_members()
    assert {f"members/{m}_prob.nii.gz" for m in KNOWN_MEMBERS} <= set(owned_outputs())
    with pytest.raises(DeepIslesError, match="unknown member to train 'classical'; choose from seals, nvauto"):
        make_trainable("classical")
    res = CliRunner().invoke(app, ["weights", "import", str(SRC), "--members", "classical"])
    assert res.exit_code != 0 and "unknown member to import 'classical'" in " ".join(res.output.split())


def test_a_fourth_member_is_one_registry_entry(monkeypatch, tmp_path):
    """tests/toy_member.py is a whole member; adding its entry makes it selectable, trainable, stored and run."""
    from deepisles import store
    from deepisles.synth import generate_case
    from deepisles.training.loop import TrainConfig, train

    monkeypatch.setitem(registry.MEMBERS, "toy", MemberSpec("toy", "toy_member:ToyMember", "toy_member:ToySettings",
                                                            recipe="toy_member:COMPACT_RECIPE"))  # fmt: skip
    from deepisles.members import KNOWN_MEMBERS

    assert "toy" in KNOWN_MEMBERS and check_member_spec("classical,toy") == ["classical", "toy"]
    with pytest.raises(DeepIslesError, match="toy: no weights installed"):
        resolve_members("toy")
    cfg = TrainConfig(member="toy", out=tmp_path / "run", iterations=2, batch_size=1, val_every=2, checkpoint_every=2,
                      pool_size=1, refresh_every=0, val_cases=1, device="cpu")  # fmt: skip
    summary = train(cfg)
    assert summary["val_cases"] == 1 and 0.0 <= summary["val_dice"] <= 1.0
    meta, folder = store.read_member("toy", verify=True)
    assert meta["format"] == 2 and [m["file"] for m in meta["models"]] == ["toy_0.safetensors"]
    members, skipped = resolve_members("toy,classical")
    assert [m.name for m in members] == ["toy", "classical"] and not skipped
    assert members[0].weights_origin["kind"] == "trained"
    sc = generate_case(5, lesion=True)
    from deepisles.core import Case

    res = members[0].run(Case(dwi=sc.dwi, adc=sc.adc, brain=np.asarray(sc.dwi.data) > 0))
    assert res.probability.shape == sc.dwi.shape and res.mask.dtype == np.uint8
    assert "toy" in CliRunner().invoke(app, ["weights", "list"]).output


@pytest.mark.parametrize("member", ["seals", "nvauto", "factorizer"])
def test_training_samples_come_from_the_members_preprocess_stage(member, monkeypatch):
    """A training sample is the member's ``preprocess`` output (with the label on the network's grid), the same
    network input inference computes."""
    from deepisles.core import Case
    from deepisles.synth import generate_case
    from deepisles.training.members import make_trainable

    sc = generate_case(3, lesion=True)
    case = Case(dwi=sc.dwi, adc=sc.adc, brain=np.asarray(sc.dwi.data) > 0, flair=sc.flair)
    label = (np.asarray(sc.mask.data) > 0).astype(np.uint8)
    t = make_trainable(member, "none")
    cls = type(t.member)
    calls = []
    real = cls.preprocess

    def spy(self, case, label=None):
        calls.append(label is not None)
        return real(self, case, label)

    monkeypatch.setattr(cls, "preprocess", spy)
    sample = t.sample(case, label)
    assert calls == [True]
    x, ctx = t.runtime("cpu").preprocess(case)  # what inference feeds the network
    x = x.numpy() if hasattr(x, "numpy") else x
    assert np.array_equal(sample.image, x) and ctx.label is None
    assert sample.label.shape == sample.image.shape[1:] and 0 < int(sample.label.sum()) < sample.label.size


def _imports(path: Path) -> set[str]:
    """Every deepisles module ``path`` imports (top level or inside functions); ``from pkg import x`` counts as
    ``pkg.x`` when ``x`` is a module of the package, else as ``pkg``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            pkg = SRC.parent.joinpath(*node.module.split("."))
            for a in node.names:
                sub = pkg / a.name
                out.add(f"{node.module}.{a.name}" if sub.is_dir() or sub.with_suffix(".py").is_file() else node.module)
    return {m for m in out if m.startswith("deepisles")}


def test_members_and_weights_import_each_other_in_one_direction():
    """store (the on-disk format) <- members <- weights (importers); core below all of them: the members and
    weights packages do not import each other both ways (members import nothing from deepisles.weights)."""
    for path in (SRC / "members").rglob("*.py"):
        weights = {m for m in _imports(path) if m.startswith("deepisles.weights")}
        assert not weights, (path, weights)
        assert not any(m.startswith("deepisles.api") for m in _imports(path)), path
    assert not any(m.startswith(("deepisles.members", "deepisles.weights")) for m in _imports(SRC / "store.py"))
    assert all(not m.startswith(("deepisles.members", "deepisles.weights", "deepisles.api"))
               for m in _imports(SRC / "core.py"))  # fmt: skip
