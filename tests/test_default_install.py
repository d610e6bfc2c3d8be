"""`deepisles segment --members auto` as a normal install sees it: a fresh process (none of the test session's
patches; conftest hides the packaged default models from in-process tests), an empty DEEPISLES_HOME, so the
packaged default models run, and the report and the console say which members ran and that they are default
models. `deepisles demo` (the same path, with FLAIR: all three members) is in test_cli_commands.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from deepisles.members.base import DEFAULT_MODELS_NOTE

CASE = Path(__file__).parent / "fixtures" / "official" / "ensemble" / "inputs"  # small DWI/ADC (31 x 19 x 31)


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("deepisles")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "deepisles"]


def test_segment_auto_runs_the_packaged_default_models_in_a_fresh_process(default_models, tmp_path):
    home = tmp_path / "home"  # empty: nothing imported or trained
    env = {**os.environ, "DEEPISLES_HOME": str(home), "OMP_NUM_THREADS": "2"}
    out = tmp_path / "out"
    proc = subprocess.run([*_cli(), "segment", "--dwi", str(CASE / "dwi.nii.gz"), "--adc", str(CASE / "adc.nii.gz"),
                           "-o", str(out), "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    run, skipped = report["members"]["run"], report["members"]["skipped"]
    assert [m["name"] for m in run] == ["seals", "nvauto"]  # no FLAIR: FACTORIZER cannot vote
    assert [s["member"] for s in skipped] == ["factorizer"] and "FLAIR" in skipped[0]["reason"]
    for m in run:
        w = m["weights"]
        assert w["kind"] == "default" and w["note"] == DEFAULT_MODELS_NOTE, m["name"]
        assert w["data"] == "synthetic", m["name"]
    said = " ".join((proc.stdout + proc.stderr).split())
    assert "seals, nvauto" in said and "not clinically validated" in said
    assert not (home / "weights").exists() or not any((home / "weights").iterdir())  # nothing was installed

    listed = subprocess.run([*_cli(), "weights", "list"], capture_output=True, text=True, env=env, timeout=300)
    assert listed.returncode == 0, listed.stderr
    for name in ("seals", "nvauto", "factorizer"):
        assert f"{name} (default)" in listed.stdout
