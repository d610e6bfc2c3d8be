"""The CLI commands a user types first: `deepisles demo` (README's first command, run as a normal install runs it),
`deepisles weights import` of a .7z, and `deepisles weights info --verify` on a good and on a corrupted store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deepisles.cli import app

py7zr = pytest.importorskip("py7zr")

OFFICIAL = Path(__file__).parent / "fixtures" / "official"
# the archive's layout as the importer expects the official one: weights/<MEMBER>/..., from the member fixtures
SOURCES = {
    "SEALS": OFFICIAL / "seals" / "main" / "weights" / "SEALS",
    "NVAUTO": OFFICIAL / "nvauto" / "weights" / "NVAUTO",
    "FACTORIZER": OFFICIAL / "factorizer" / "weights" / "FACTORIZER",
}
MEMBERS = ("seals", "nvauto", "factorizer")
runner = CliRunner()


def _cli() -> list[str]:
    """The installed `deepisles` console script next to this Python (what README runs), else `python -m`."""
    exe = Path(sys.executable).with_name("deepisles")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "deepisles"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """A small stroke_ensemble_weights.7z in the official layout (the random-weight official-format fixtures)."""
    work = tmp_path_factory.mktemp("archive")
    path = work / "stroke_ensemble_weights.7z"
    with py7zr.SevenZipFile(path, "w") as z:
        for name, src in SOURCES.items():
            z.writeall(src, f"weights/{name}")
    return path


def test_weights_import_of_a_7z_archive(archive):
    from deepisles import store

    res = runner.invoke(app, ["weights", "import", str(archive)])
    assert res.exit_code == 0, res.output
    for name in MEMBERS:
        assert f"{name}: {store.member_dir(name)}" in " ".join(res.stdout.split())
    assert sorted(store.installed_members()) == sorted(MEMBERS)
    for name in MEMBERS:
        meta, folder = store.read_member(name, verify=True)
        assert meta["member"] == name and meta["files"]
        assert meta["source"].startswith(f"{archive.resolve()}:weights/")  # not the deleted unpack folder
    # the unpacked copy is gone: only the members' folders are left in the store
    assert sorted(p.name for p in store.weights_dir().iterdir()) == sorted(MEMBERS)
    again = runner.invoke(app, ["weights", "import", str(archive)])
    assert again.exit_code == 2 and "already installed" in again.output


def test_weights_import_of_a_7z_with_one_top_level_folder(tmp_path):
    """An archive that wraps everything in one folder (stroke_ensemble_weights/weights/...) imports too."""
    from deepisles import store

    path = tmp_path / "wrapped.7z"
    with py7zr.SevenZipFile(path, "w") as z:
        z.writeall(SOURCES["NVAUTO"], "stroke_ensemble_weights/weights/NVAUTO")
    res = runner.invoke(app, ["weights", "import", str(path), "--members", "nvauto"])
    assert res.exit_code == 0, res.output
    assert store.installed_members() == ["nvauto"]


def test_weights_info_verify_passes_then_fails_on_a_corrupted_file(archive):
    from deepisles import store

    res = runner.invoke(app, ["weights", "import", str(archive), "--members", "nvauto"])
    assert res.exit_code == 0, res.output
    ok = runner.invoke(app, ["weights", "info", "nvauto", "--verify"])
    assert ok.exit_code == 0, ok.output
    assert "checksums verified" in " ".join(ok.stdout.split()) and '"member": "nvauto"' in ok.stdout

    meta, folder = store.read_member("nvauto")
    victim = folder / sorted(meta["files"])[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the tensor data: same size, same header
    victim.write_bytes(bytes(data))
    plain = runner.invoke(app, ["weights", "info", "nvauto"])  # without --verify the sizes are not re-hashed
    assert plain.exit_code == 0, plain.output
    bad = runner.invoke(app, ["weights", "info", "nvauto", "--verify"])
    assert bad.exit_code != 0
    lines = [line for line in bad.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), bad.output
    assert victim.name in lines[0] and "checksum mismatch" in lines[0] and "re-import" in lines[0]
    assert "Traceback" not in bad.output

    victim.unlink()
    gone = runner.invoke(app, ["weights", "info", "nvauto", "--verify"])
    assert gone.exit_code != 0 and "weight file missing" in gone.output
    none = runner.invoke(app, ["weights", "info", "seals", "--verify"])
    assert none.exit_code != 0 and "no weights for member seals" in none.output


def test_demo_as_the_readme_runs_it(default_models, tmp_path):
    """README's first command, `deepisles demo -o demo-output --overwrite`, in a fresh process as a normal install
    sees it: an empty weight store, so the packaged default models (nothing from the test session's patches)."""
    env = {**os.environ, "DEEPISLES_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "2"}
    out = tmp_path / "demo-output"
    proc = subprocess.run([*_cli(), "demo", "-o", str(out), "--overwrite"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("lesion_mask.nii.gz", "lesion_prob.nii.gz", "report.json", "lesions.csv", "preview.png",
                 "report.html"):  # fmt: skip
        assert (out / name).is_file(), name
    assert any((out / "input" / "rawdata").glob("sub-*/ses-0001/*_dwi.nii.gz"))
    report = json.loads((out / "report.json").read_text())
    run = report["members"]["run"]
    assert [m["name"] for m in run] == list(MEMBERS)  # the demo case has FLAIR: all three vote
    assert all(m["weights"]["kind"] == "default" for m in run)
    said = " ".join((proc.stdout + proc.stderr).split())
    assert "not clinically validated" in said
    assert "against the synthetic ground truth: Dice" in said
    dice = float(said.split("against the synthetic ground truth: Dice ")[1].split(",")[0])
    assert dice >= 0.5, said  # the default ensemble finds the demo lesion (measured 0.8 at seed 1)
    assert not (tmp_path / "home" / "weights").exists() or not any((tmp_path / "home" / "weights").iterdir())


def test_demo_refuses_an_earlier_demo_without_overwrite(tmp_path):
    out = tmp_path / "demo-output"
    out.mkdir()
    (out / "report.json").write_text("{}")
    res = runner.invoke(app, ["demo", "-o", str(out)])
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert (out / "report.json").read_text() == "{}"

