"""`--fast` against the full mode on the official-format ensemble case (docs/deviations.md, row 10).

The weights are the small random-weight official-format fixtures (2 SEALS folds, 2 NVAUTO models, 2 Res-U-Nets +
2 Swin-Factorizers; tests/test_segment_official.py shows the full mode reproduces the reference exactly). In fast
mode SEALS drops test-time mirroring, NVAUTO keeps model 0 of 2 and FACTORIZER its 2 Res-U-Nets. The bounds below
are the figures measured on CPU (docs/deviations.md) with a margin of 0.10 (Dice lower, relative volume
difference higher): they catch a fast mode that stops resembling the full one, and the Dice < 1 checks that the
fast path really ran. Random-weight logits sit near 0, so these agreements are pessimistic; the figures for the
packaged default models are in docs/deviations.md too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from deepisles.cli import app

OFFICIAL = Path(__file__).parent / "fixtures" / "official"
FIX = OFFICIAL / "ensemble"
SOURCES = {
    "SEALS": OFFICIAL / "seals" / "main" / "weights" / "SEALS",
    "NVAUTO": OFFICIAL / "nvauto" / "weights" / "NVAUTO",
    "FACTORIZER": OFFICIAL / "factorizer" / "weights" / "FACTORIZER",
}
# measured fast vs full on CPU: Dice, |V_fast - V_full| / V_full
MEASURED = {
    "seals": (0.816, 0.121),
    "nvauto": (0.462, 0.403),
    "factorizer": (0.867, 0.307),
    "ensemble": (0.637, 0.294),
}
MARGIN = 0.10
runner = CliRunner()


def _mask(out: Path, name: str) -> np.ndarray:
    if name == "ensemble":
        return np.asarray(nib.load(str(out / "lesion_mask.nii.gz")).dataobj).astype(bool)
    return np.asarray(nib.load(str(out / "members" / f"{name}_prob.nii.gz")).dataobj) >= 0.5


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The official-layout fixtures imported into a fresh store, then `segment` full and `--fast` with FLAIR."""
    tmp = tmp_path_factory.mktemp("fast")
    root = tmp / "stroke_ensemble_weights"
    for name, src in SOURCES.items():
        shutil.copytree(src, root / "weights" / name)
    outs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPISLES_HOME", str(tmp / "home"))
        res = runner.invoke(app, ["weights", "import", str(root)])
        assert res.exit_code == 0, res.output
        for mode in ("full", "fast"):
            outs[mode] = tmp / mode
            args = ["segment", "--dwi", FIX / "inputs" / "dwi.nii.gz", "--adc", FIX / "inputs" / "adc.nii.gz",
                    "--flair", FIX / "inputs" / "flair.nii.gz", "-o", outs[mode], "--save-members", "--device",
                    "cpu", "--no-preview", "--no-html", *(["--fast"] if mode == "fast" else [])]  # fmt: skip
            res = runner.invoke(app, [str(a) for a in args])
            assert res.exit_code == 0, res.output
    return outs


def test_fast_mode_is_what_the_report_says(runs):
    full = {m["name"]: m for m in json.loads((runs["full"] / "report.json").read_text())["members"]["run"]}
    fast = {m["name"]: m for m in json.loads((runs["fast"] / "report.json").read_text())["members"]["run"]}
    assert list(fast) == list(full) == ["seals", "nvauto", "factorizer"]
    assert full["seals"]["mirroring"] is True and fast["seals"]["mirroring"] is False
    assert full["nvauto"]["models"] == 2 and fast["nvauto"]["models"] == 1
    assert "swin" in " ".join(map(str, full["factorizer"]["models"])).lower()
    assert "swin" not in " ".join(map(str, fast["factorizer"]["models"])).lower()


@pytest.mark.parametrize("name", list(MEASURED))
def test_fast_agrees_with_full_within_the_measured_bounds(runs, name):
    full, fast = _mask(runs["full"], name), _mask(runs["fast"], name)
    assert full.sum() > 1000 and fast.sum() > 1000
    dice = 2.0 * float((full & fast).sum()) / float(full.sum() + fast.sum())
    rel_dv = abs(int(fast.sum()) - int(full.sum())) / int(full.sum())
    dice_measured, dv_measured = MEASURED[name]
    print(json.dumps({"member": name, "dice": round(dice, 4), "rel_volume_diff": round(rel_dv, 4),
                      "full_voxels": int(full.sum()), "fast_voxels": int(fast.sum())}))  # fmt: skip
    assert dice < 1.0, f"{name}: --fast gave the full mode's mask; the fast path did not run"
    assert dice >= dice_measured - MARGIN, f"{name}: Dice fast vs full {dice:.3f} (measured {dice_measured})"
    assert rel_dv <= dv_measured + MARGIN, f"{name}: volume differs by {rel_dv:.1%} (measured {dv_measured:.1%})"
