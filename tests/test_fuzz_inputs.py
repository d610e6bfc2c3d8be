"""Fuzz suite (issue 9): random-but-plausible NIfTI/MetaImage headers and data through `deepisles segment`.

The property (tests/fuzz_segment.py): exit 0 with outputs on the DWI grid, or exit 2 with exactly one `error:` line
and nothing written; never a traceback; hostile detached headers refused. It runs in a child process so that its
peak RSS is its own: bounded well below what a header declaring 1100^3 voxels would take if it were read.
Default: 100 examples, fixed seed (~15 s on 2 cores; a third are plausible scans); `pytest -m slow tests/test_fuzz_inputs.py`: 300 examples.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")

DRIVER = Path(__file__).with_name("fuzz_segment.py")
MAX_RSS_GIB = 3.0  # the process with torch, SimpleITK and a segment run; a 1100^3 float32 read alone is 5.0 GiB


def _fuzz(examples: int, seed: int) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    p = subprocess.Popen([sys.executable, str(DRIVER), "--examples", str(examples), "--seed", str(seed)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    assert p.returncode == 0, output[-8000:]
    rss_gib = usage.ru_maxrss / 2**20  # Linux: KiB
    assert rss_gib < MAX_RSS_GIB, f"peak RSS {rss_gib:.2f} GiB"
    stats = json.loads(output.strip().splitlines()[-1])
    stats["peak_rss_gib"] = round(rss_gib, 2)
    print(stats)
    return stats


def test_fuzz_segment_inputs():
    stats = _fuzz(100, 4)  # seed 4: on the pre-issue-9 code it finds a non-finite probability (ADC off the brain)
    assert stats["examples"] >= 100
    assert stats["exit0"] > 0 and stats["exit2"] > 0  # both outcomes are exercised


@pytest.mark.slow
def test_fuzz_segment_inputs_long():
    stats = _fuzz(300, 1)
    assert stats["exit0"] > 0 and stats["exit2"] > 0
