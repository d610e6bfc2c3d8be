"""deepisles train: real (tiny) training runs on ISLES'22-layout data, synthetic data, resume, fine-tuning from
official-format weights, installation into the store, DDP with two processes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from deepisles.cli import app
from deepisles.errors import DeepIslesError
from deepisles.training.loop import TrainConfig, train
from deepisles.training.members import compact_meta, make_trainable

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = REPO / "tests" / "fixtures" / "official"
runner = CliRunner()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Three synthetic cases with lesions, written in the ISLES'22 layout by `deepisles synth`."""
    from deepisles.synth import write_dataset

    root = tmp_path_factory.mktemp("isles") / "ds"
    write_dataset(root, 3, seed=11)
    return root


def _small(**kw) -> TrainConfig:
    base = dict(iterations=3, batch_size=1, val_every=3, checkpoint_every=3, pool_size=1, refresh_every=0,
                val_cases=1, device="cpu", patch=[32, 32, 32], install=False, folds=3)
    base.update(kw)
    return TrainConfig(**base)


def _log(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_cli_train_on_isles_layout_installs_a_member_segment_uses(dataset, tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--member", "seals", "--data", str(dataset), "-o", str(out),
                              "--folds", "3", "--fold", "1", "--iterations", "3", "--val-every", "3",
                              "--checkpoint-every", "3", "--batch-size", "1", "--patch", "32,32,32",
                              "--device", "cpu", "--no-amp"])  # fmt: skip
    # float32: bfloat16 autocast is not deterministic between runs and once gave a NaN loss here under load
    assert res.exit_code == 0, res.output
    rows = _log(out / "fold_1" / "log.csv")
    assert rows[-1]["iteration"] == "3" and rows[-1]["val_cases"] == "1"
    assert 0.0 <= float(rows[-1]["val_dice"]) <= 1.0 and np.isfinite(float(rows[-1]["loss"]))
    from deepisles import store

    meta, folder = store.read_member("seals", verify=True)
    assert [m["fold"] for m in meta["models"]] == [1] and meta["origin"]["kind"] == "trained"
    assert meta["origin"]["data"] == str(dataset.resolve())
    trained = load_file(str(out / "fold_1" / "fold_1.safetensors"))
    installed = load_file(str(folder / "fold_1.safetensors"))
    assert all(torch.equal(trained[k], installed[k]) for k in trained)

    raw = sorted((dataset / "rawdata").glob("sub-*/ses-0001"))[0]
    sub = raw.parent.name
    seg = runner.invoke(app, ["segment", "--dwi", str(raw / f"{sub}_ses-0001_dwi.nii.gz"),
                              "--adc", str(raw / f"{sub}_ses-0001_adc.nii.gz"), "-o", str(tmp_path / "seg"),
                              "--members", "seals", "--device", "cpu", "--no-preview"])  # fmt: skip
    assert seg.exit_code == 0, seg.output
    report = json.loads((tmp_path / "seg" / "report.json").read_text())
    (run,) = report["members"]["run"]
    assert run["name"] == "seals" and run["weights"]["kind"] == "trained"

    # a second run into the same folder needs --resume or --overwrite; the installed member is protected
    again = runner.invoke(app, ["train", "--member", "seals", "--data", str(dataset), "--output", str(out),
                                "--folds", "3", "--fold", "1", "--iterations", "3"])  # fmt: skip
    assert again.exit_code == 2 and "--resume" in again.output
    other = runner.invoke(app, ["train", "--member", "seals", "--data", str(dataset), "-o", str(tmp_path / "o"),
                                "--folds", "3", "--iterations", "3"])  # fmt: skip
    assert other.exit_code == 2 and "already installed" in other.output


def test_cli_train_argument_errors(tmp_path):
    res = runner.invoke(app, ["train", "--member", "seals"])
    assert res.exit_code == 2 and "--data" in res.output
    res = runner.invoke(app, ["train", "--member", "seals", "--data", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "no such dataset" in res.output
    res = runner.invoke(app, ["train", "--member", "unet", "--synthetic", "-o", str(tmp_path / "r")])
    assert res.exit_code == 2 and "unknown member" in res.output
    res = runner.invoke(app, ["train", "--member", "seals", "--synthetic", "--init", "official",
                              "-o", str(tmp_path / "r2")])  # fmt: skip
    assert res.exit_code == 2 and "weights import" in res.output
    res = runner.invoke(app, ["train", "--member", "seals", "--synthetic", "--patch", "64,64"])
    assert res.exit_code == 2 and "--patch" in res.output


def test_cli_train_output_option_and_its_hidden_old_spelling(tmp_path, monkeypatch):
    """-o/--output like every other command; --out (the earlier spelling) still works but is not listed."""
    import re

    import deepisles.training.loop as loop

    seen = []

    def stop(cfg, **_kw):
        seen.append(cfg.out)
        raise DeepIslesError("stopped before training")

    monkeypatch.setattr(loop, "train", stop)
    base = ["train", "--member", "seals", "--synthetic"]
    for flag in ("-o", "--output", "--out"):
        res = runner.invoke(app, [*base, flag, str(tmp_path / flag.strip("-"))])
        assert res.exit_code == 2 and "stopped before training" in res.output, res.output
    res = runner.invoke(app, [*base, "-o", str(tmp_path / "same"), "--out", str(tmp_path / "same")])
    assert res.exit_code == 2 and "stopped before training" in res.output
    assert seen == [tmp_path / "o", tmp_path / "output", tmp_path / "out", tmp_path / "same"]
    res = runner.invoke(app, [*base, "-o", str(tmp_path / "a"), "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "give -o/--output only" in res.output and len(seen) == 4
    text = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    assert "--output" in text and "-o" in text and not re.search(r"--out(?!put)", text)


def test_resume_continues_from_the_checkpoint(tmp_path, monkeypatch):
    """An interrupted run resumes at its last checkpoint with the optimizer state, and finishes the schedule."""
    import deepisles.training.loop as loop

    cfg = _small(member="nvauto", out=tmp_path / "nv", iterations=4, checkpoint_every=2, val_every=0)
    real_batch = loop._batch
    calls = {"n": 0}

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed during iteration 3, after the checkpoint of iteration 2
        return real_batch(*a, **k)

    monkeypatch.setattr(loop, "_batch", crashing)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    state = json.loads((cfg.run_dir / "checkpoint" / "state.json").read_text())
    assert state["iteration"] == 2 and not (cfg.run_dir / "final.json").exists()
    with pytest.raises(DeepIslesError, match="--resume"):
        train(cfg)
    monkeypatch.setattr(loop, "_batch", real_batch)
    cfg.resume = True
    summary = train(cfg)
    assert summary["iterations"] == 4
    state = json.loads((cfg.run_dir / "checkpoint" / "state.json").read_text())
    assert state["iteration"] == 4
    opt = load_file(str(cfg.run_dir / "checkpoint" / "optimizer.safetensors"))
    steps = [v for k, v in opt.items() if k.endswith(".step")]
    assert steps and all(float(s) == 4.0 for s in steps)  # 2 before the crash + 2 after the resume
    iters = [int(r["iteration"]) for r in _log(cfg.run_dir / "log.csv")]
    assert iters == sorted(set(iters)) and iters[-1] == 4


def test_a_non_finite_step_is_skipped_and_a_run_of_them_stops_training(tmp_path, monkeypatch):
    """A batch that makes the loss or gradients NaN (reduced precision, one bad patch) does not poison the
    weights: that step is skipped and counted; MAX_SKIPPED_IN_A_ROW of them in a row stop with a clear error."""
    import deepisles.training.loop as loop

    real_batch = loop._batch
    calls = {"n": 0}
    bad = {2}

    def poisoned(*a, **k):
        calls["n"] += 1
        x, y = real_batch(*a, **k)
        if calls["n"] in bad:
            x = x.clone()
            x[..., 0, 0, 0] = float("nan")
        return x, y

    monkeypatch.setattr(loop, "_batch", poisoned)
    cfg = _small(member="nvauto", out=tmp_path / "nv", iterations=4, checkpoint_every=4, val_every=0, amp=False)
    summary = train(cfg)
    assert summary["skipped_steps"] == 1
    weights = load_file(str(cfg.run_dir / "checkpoint" / "network.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    opt = load_file(str(cfg.run_dir / "checkpoint" / "optimizer.safetensors"))
    assert {float(v) for k, v in opt.items() if k.endswith(".step")} == {3.0}  # 4 iterations, 1 skipped
    rows = _log(cfg.run_dir / "log.csv")
    assert rows[-1]["skipped_steps"] == "1" and np.isfinite(float(rows[-1]["loss"]))

    calls["n"], bad = 0, set(range(1, 100))
    cfg = _small(member="nvauto", out=tmp_path / "nv2", iterations=20, val_every=0, checkpoint_every=0, amp=False)
    with pytest.raises(DeepIslesError, match=r"diverged: 5 steps in a row.*--no-amp"):
        train(cfg)
    assert calls["n"] == loop.MAX_SKIPPED_IN_A_ROW == 5


def test_synthetic_training_each_member_writes_a_store_member(tmp_path):
    from deepisles import store
    from deepisles.members.factorizer import FactorizerMember

    for member in ("factorizer",):  # seals (dataset) and nvauto (resume) are covered above
        cfg = _small(member=member, out=tmp_path / member, iterations=2, val_every=2, checkpoint_every=2)
        summary = train(cfg)
        assert summary["data"] == "synthetic" and summary["val_cases"] == 1
        meta, folder = store.read_member_folder(Path(summary["member_folder"]), verify=True)
        assert [m["arch"] for m in meta["models"]] == ["resunet"]
        loaded = FactorizerMember.from_folder(folder)
        assert len(loaded.models) == 1


def test_finetune_from_official_format_weights(tmp_path):
    """--init official starts from the imported official weights (the small official-format fixtures) and
    writes a member in the same format (NVAUTO: deepisles' SegResNet, safetensors)."""
    res = runner.invoke(app, ["weights", "import", str(OFFICIAL / "seals" / "main")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["weights", "import", str(OFFICIAL / "nvauto" / "weights")])
    assert res.exit_code == 0, res.output
    from deepisles import store

    official_meta, official_folder = store.read_member("seals")
    start = load_file(str(official_folder / "fold_0.safetensors"))
    cfg = _small(member="seals", out=tmp_path / "ft", init="official", iterations=2, val_every=0,
                 checkpoint_every=2, patch=[24, 32, 32])  # fmt: skip
    summary = train(cfg)
    tuned = load_file(summary["weights"])
    assert set(tuned) == set(start)
    moved = [k for k in start if not torch.equal(start[k], tuned[k])]
    assert moved and max(float((start[k] - tuned[k]).abs().max()) for k in moved) < 0.05  # small lr: close
    meta, _ = store.read_member_folder(Path(summary["member_folder"]))
    assert meta["network"] == official_meta["network"] and meta["settings"] == official_meta["settings"]
    assert meta["origin"]["init"] == "official"

    cfg = _small(member="nvauto", out=tmp_path / "ftnv", init="official", iterations=2, val_every=0,
                 checkpoint_every=2, patch=[32, 32, 32])  # fmt: skip
    summary = train(cfg)
    assert summary["weights"].endswith("model0.safetensors")
    from deepisles.members.nvauto import NvautoMember
    from deepisles.weights.import_nvauto import read_model

    meta, folder = store.read_member_folder(Path(summary["member_folder"]))
    assert [m["file"] for m in meta["models"]] == ["model0.safetensors"]
    assert meta["network"] == store.read_member("nvauto")[0]["network"]  # the imported official SegResNet
    tuned = load_file(summary["weights"])
    _, ref = read_model(OFFICIAL / "nvauto" / "weights" / "NVAUTO" / "ts" / "model0.ts")  # restricted reader
    assert set(tuned) == set(ref)
    diffs = [float((ref[k] - tuned[k]).abs().max()) for k in ref]
    assert max(diffs) > 0
    assert NvautoMember.from_folder(folder).models


def test_compact_recipes_fit_the_size_budget():
    total = 0
    for m in ("seals", "nvauto", "factorizer"):
        t = make_trainable(m, "none")
        total += sum(p.numel() for p in t.network.parameters()) * 4
        assert t.train_patch == [64, 64, 64]
    assert total <= 20 * 1024 * 1024
    assert compact_meta("seals")["settings"]["preprocessing"]["target_spacing"] == [2.0, 2.0, 2.0]


@pytest.mark.slow  # two training processes on two cores: ~20 s, and timing-sensitive under load
def test_ddp_two_processes_on_cpu_gloo(tmp_path):
    """torchrun with 2 processes (gloo backend on CPU): both train, rank 0 writes, DDP keeps weights equal."""
    script = tmp_path / "ddp_run.py"
    script.write_text(
        "import json, os, sys\n"
        "from pathlib import Path\n"
        "import torch\n"
        "from safetensors.torch import save_file\n"
        "torch.set_num_threads(1)\n"
        "import deepisles.training.loop as loop\n"
        "seen = {}\n"
        "make = loop.make_trainable\n"
        "def capture(*a, **k):\n"
        "    seen['t'] = make(*a, **k)\n"
        "    return seen['t']\n"
        "loop.make_trainable = capture\n"
        "cfg = loop.TrainConfig(member='seals', out=Path(sys.argv[1]), iterations=2, batch_size=1, val_every=0,\n"
        "                       checkpoint_every=2, pool_size=1, refresh_every=0, val_cases=0, device='cpu',\n"
        "                       patch=[32, 32, 32], install=False)\n"
        "s = loop.train(cfg)\n"
        "rank = int(os.environ['RANK'])\n"
        "state = {k: v.detach().contiguous() for k, v in seen['t'].network.state_dict().items()}\n"
        "save_file(state, str(Path(sys.argv[1]) / f'rank{rank}.safetensors'))\n"
        "print(json.dumps({'rank': rank, 'world': s['world_size']}))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DEEPISLES_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         str(script), str(tmp_path / "run")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert sorted(x["rank"] for x in lines) == [0, 1] and all(x["world"] == 2 for x in lines)
    meta = json.loads((tmp_path / "run" / "member" / "member.json").read_text())
    assert meta["origin"]["world_size"] == 2
    # each rank drew its own synthetic cases; DDP averaged the gradients, so the two copies stay identical
    w0 = load_file(str(tmp_path / "run" / "rank0.safetensors"))
    w1 = load_file(str(tmp_path / "run" / "rank1.safetensors"))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
