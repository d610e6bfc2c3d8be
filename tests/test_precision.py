"""`--precision bf16` (issue 13, item 4): opt-in bfloat16 CPU inference, refused where it cannot help."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from deepisles import pipeline
from deepisles.cli import app
from deepisles.engine import sliding_window as sw
from deepisles.errors import DeepIslesError
from small_case import case_arrays

runner = CliRunner()


def test_cpu_autocast_is_fp32_unless_bf16_is_asked_for():
    net = torch.nn.Linear(4, 2)
    x = torch.randn(3, 4)
    with sw.autocast("cpu", amp=True):  # --amp never changes CPU arithmetic
        assert net(x).dtype == torch.float32
    with sw.cpu_precision("bf16"), sw.autocast("cpu", amp=False):
        assert net(x).dtype == torch.bfloat16
    with sw.autocast("cpu", amp=False):  # the setting ends with its block
        assert net(x).dtype == torch.float32
    with pytest.raises(ValueError):
        sw.cpu_precision("fp16").__enter__()


def test_precision_option_is_checked(monkeypatch):
    with pytest.raises(DeepIslesError, match="--precision fp16"):
        pipeline.RunOptions(precision="fp16").check()
    with pytest.raises(DeepIslesError, match="for CPU inference"):
        pipeline.RunOptions(precision="bf16", device="cuda").check_device()
    monkeypatch.setattr(pipeline, "cpu_bf16_support", lambda: None)
    with pytest.raises(DeepIslesError, match="no bfloat16 instructions"):
        pipeline.RunOptions(precision="bf16", device="cpu").check_device()
    pipeline.RunOptions(precision="fp32", device="cpu").check_device()  # the default needs nothing


def _inputs(tmp_path):
    dwi, adc = case_arrays()
    out = []
    for name, arr in (("dwi", dwi), ("adc", adc)):
        p = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 2.0, 1.0])), str(p))
        out.append(str(p))
    return out


def test_cli_refuses_bf16_on_a_cpu_without_it_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "cpu_bf16_support", lambda: None)
    dwi, adc = _inputs(tmp_path)
    res = runner.invoke(app, ["segment", "--dwi", dwi, "--adc", adc, "-o", str(tmp_path / "out"), "--members",
                              "classical", "--device", "cpu", "--precision", "bf16"])  # fmt: skip
    assert res.exit_code == 2 and res.stderr.startswith("error: --precision bf16")
    assert not (tmp_path / "out").exists()


def test_report_states_the_precision(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "cpu_bf16_support", lambda: "avx512_bf16")
    dwi, adc = _inputs(tmp_path)
    for precision in ("fp32", "bf16"):
        res = runner.invoke(app, ["segment", "--dwi", dwi, "--adc", adc, "-o", str(tmp_path / precision),
                                  "--members", "classical", "--device", "cpu", "--no-html", "--no-preview",
                                  "--precision", precision])  # fmt: skip
        assert res.exit_code == 0, res.stderr
        assert f'"precision": "{precision}"' in (tmp_path / precision / "report.json").read_text()
