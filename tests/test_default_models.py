"""The packaged default ensemble (compact members trained on synthetic data by scripts/train_default_models.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from deepisles.cli import app
from deepisles.members import clear_cache, resolve_members
from deepisles.members.base import DEFAULT_MODELS_NOTE
from deepisles.metrics import case_metrics

runner = CliRunner()
MEMBERS = ["seals", "nvauto", "factorizer"]


def test_packaged_models_are_small_and_verified(default_models):
    from deepisles import store

    total = 0
    for m in MEMBERS:
        meta, folder = store.read_member_folder(default_models / m, verify=True)
        assert meta["origin"]["kind"] == "default" and meta["origin"]["note"] == DEFAULT_MODELS_NOTE
        # trained from random weights, or fine-tuned from the previous default (docs/training.md): synthetic only
        assert meta["origin"]["data"] == "synthetic" and meta["origin"]["init"] in ("none", "default")
        total += sum(f.stat().st_size for f in Path(folder).iterdir())
    assert total <= 20 * 1024 * 1024


def test_auto_uses_the_default_models_and_never_mixes_them(default_models):
    members, skipped = resolve_members("auto", "cpu")
    assert [m.name for m in members] == MEMBERS and not skipped
    assert all(m.weights_origin["kind"] == "default" for m in members)
    members, _ = resolve_members("classical", "cpu")
    assert [m.name for m in members] == ["classical"]

    res = runner.invoke(app, ["weights", "import", str(Path(__file__).parent / "fixtures/official/nvauto/weights")])
    assert res.exit_code == 0, res.output
    clear_cache()
    members, skipped = resolve_members("auto", "cpu")
    assert [m.name for m in members] == ["nvauto"] and members[0].weights_origin["kind"] == "imported"
    assert {s["member"] for s in skipped} == {"seals", "factorizer"}
    assert all("not mixed" in s["reason"] for s in skipped)
    # named explicitly, a member without installed weights uses its default model
    members, _ = resolve_members("seals,nvauto", "cpu")
    assert [m.weights_origin["kind"] for m in members] == ["default", "imported"]


@pytest.mark.slow  # ~25 s; the default models also run in tests/test_default_install.py and the threshold test
def test_default_ensemble_segments_a_held_out_synthetic_case(default_models, tmp_path):
    """Real behaviour: a synthetic case from a seed never used in training is found by every member."""
    from deepisles.api import segment
    from deepisles.synth import generate_case

    sc = generate_case(424242, lesion=True)
    paths = {}
    for role, img in (("dwi", sc.dwi), ("adc", sc.adc), ("flair", sc.flair)):
        paths[role] = tmp_path / f"{role}.nii.gz"
        img.to_nifti(np.float32).to_filename(paths[role])
    res = segment(paths["dwi"], paths["adc"], paths["flair"], outdir=tmp_path / "out", device="cpu")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [m["name"] for m in report["members"]["run"]] == MEMBERS
    assert all(m["weights"]["note"] == DEFAULT_MODELS_NOTE for m in report["members"]["run"])
    gt = np.asarray(sc.mask.data) > 0
    m = case_metrics(res.mask.data, gt, sc.mask.voxel_volume_ml)
    assert m["dice"] >= 0.6, m
    # every member finds the lesion (their accuracy is measured by benchmarks/eval_default.py, not here; on this
    # case the compact FACTORIZER under-segments: Dice ~0.2 against >= 0.6 for the vote)
    for r in res.members:
        assert case_metrics(r.mask, gt, sc.mask.voxel_volume_ml)["lesion_f1"] > 0, r.name


def test_segment_cli_says_the_default_models_are_not_validated(default_models, isles22_case, tmp_path):
    res = runner.invoke(app, ["segment", "--dwi", str(isles22_case["dwi"]), "--adc", str(isles22_case["adc"]),
                              "-o", str(tmp_path / "o"), "--device", "cpu", "--no-html", "--no-preview"])  # fmt: skip
    assert res.exit_code == 0, res.output
    flat = " ".join(res.output.split())
    assert "seals, nvauto" in flat and "not clinically validated" in flat


def test_weights_list_shows_the_default_models(default_models):
    res = runner.invoke(app, ["weights", "list"])
    assert res.exit_code == 0
    for m in MEMBERS:
        assert f"{m} (default)" in res.output
    assert "not clinically validated" in " ".join(res.output.split())


def test_fine_tune_from_the_default_model(default_models, tmp_path):
    from safetensors.torch import load_file

    from deepisles.training.loop import TrainConfig, train

    cfg = TrainConfig(member="seals", out=tmp_path / "ft", init="default", iterations=2, batch_size=1, val_every=0,
                      checkpoint_every=2, pool_size=1, refresh_every=0, device="cpu", patch=[32, 32, 32],
                      install=False)  # fmt: skip
    summary = train(cfg)
    start = load_file(str(default_models / "seals" / "fold_0.safetensors"))
    tuned = load_file(summary["weights"])
    diffs = [float((start[k] - tuned[k]).abs().max()) for k in start]
    assert 0 < max(diffs) < 0.05


@pytest.mark.parametrize("member", ["seals", "nvauto"])
def test_decision_threshold_setting_decides_the_mask_and_the_votes(member, default_models, tmp_path):
    """settings.decision_threshold: mask = probability >= t and each network votes at t; 0.5 (absent) is the
    reference argmax. The probability itself does not change (up to the argmax matching at 0.5)."""
    import shutil

    from deepisles.io.image import Image
    from deepisles.members import Case
    from deepisles.members.config import ConfigError
    from deepisles.members.registry import spec
    from small_case import case_arrays

    dwi, adc = case_arrays(shape=(48, 52, 36))  # 2 mm voxels: small enough for two runs of each member
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    case = Case(dwi=Image(dwi, affine), adc=Image(adc, affine), brain=dwi > 0)
    cls = spec(member).runtime_class()
    folder = tmp_path / member
    shutil.copytree(default_models / member, folder)
    meta = json.loads((folder / "member.json").read_text())
    meta["settings"].pop("decision_threshold", None)
    assert cls.parse(meta).settings.decision_threshold == 0.5  # absent: the reference argmax
    at_half = cls.from_config(cls.parse(meta), folder)
    ref = at_half.run(case)
    assert ref.threshold == 0.5 and ref.mask.sum() > 0
    for t in (0.3,):  # below 0.5: a superset
        meta["settings"]["decision_threshold"] = t
        res = cls.from_config(cls.parse(meta), folder).run(case)
        assert res.threshold == t and np.array_equal(res.mask > 0, res.probability >= np.float32(t))
        assert np.allclose(res.probability, ref.probability, atol=1e-6)
        assert res.mask.sum() > ref.mask.sum() and np.all(res.mask >= ref.mask)  # the lower threshold adds voxels
        assert int(res.votes.max()) <= res.networks
        if res.networks == 1:
            assert np.array_equal(res.votes, res.mask)
    for bad in (0.0, 1.0, 1.5):
        meta["settings"]["decision_threshold"] = bad
        with pytest.raises(ConfigError, match="decision_threshold"):
            cls.parse(meta)


def test_select_default_decision_picks_and_applies_a_threshold(default_models, tmp_path, monkeypatch):
    """scripts/select_default_decision.py: the pick maximises (Dice + F1) / 2 over both settings (ties: nearest
    0.5); --apply writes it into the packaged SEALS and NVAUTO member.json and leaves the weights verified."""
    import importlib.util
    import shutil

    from deepisles import store
    from deepisles.members import base
    from deepisles.members.registry import spec

    path = Path(__file__).resolve().parents[1] / "scripts" / "select_default_decision.py"
    mod_spec = importlib.util.spec_from_file_location("select_default_decision", path)
    sel = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(sel)

    def table(scores):
        return {s: {"rules": {sel.vote_rule(t): {"dice": d, "lesion_f1": f} for t, (d, f) in scores.items()}}
                for s in ("with FLAIR", "DWI + ADC only")}

    assert sel.pick_threshold(table({0.3: (0.5, 0.3), 0.4: (0.45, 0.3), 0.5: (0.4, 0.3), 0.6: (0.3, 0.3),
                                     0.7: (0.2, 0.3)}))[0] == 0.3
    assert sel.pick_threshold(table({t: (0.0, 0.0) for t in sel.THRESHOLDS}))[0] == 0.5  # no signal: the reference

    for name in ("seals", "nvauto", "factorizer"):
        shutil.copytree(default_models / name, tmp_path / name)
    monkeypatch.setattr(base, "DEFAULT_MODELS_DIR", tmp_path)
    written = sel.apply(0.4)
    assert sorted(p.parent.name for p in written) == ["nvauto", "seals"]
    for name in ("seals", "nvauto"):
        meta, folder = store.read_member_folder(tmp_path / name, verify=True)
        assert spec(name).runtime_class().parse(meta).settings.decision_threshold == 0.4
    assert (tmp_path / "factorizer" / "member.json").read_bytes() == (default_models / "factorizer" / "member.json").read_bytes()
