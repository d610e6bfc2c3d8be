"""The output folder: --overwrite leaves no stale results, one run per folder (lock), unwritable folders and write
errors are one-line errors, killed and interrupted runs leave nothing half-written, an output never replaces an
input, user text is never read as rich markup, inputs are validated before any model loads (issue 9, items 4-9,
13, 14)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from deepisles.cli import app
from small_case import case_arrays

runner = CliRunner()


def _save(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) * [2, 2, 2, 1] if affine is None else affine), str(path))
    return path


_case_arrays = case_arrays


@pytest.fixture()
def case(tmp_path):
    dwi, adc = _case_arrays()
    d = tmp_path / "in"
    d.mkdir()
    return {"dwi": _save(d / "dwi.nii.gz", dwi), "adc": _save(d / "adc.nii.gz", adc), "dir": d, "out": tmp_path / "out"}


def _run(args):
    return runner.invoke(app, [str(a) for a in args])


def _segment(case, *extra, out=None):
    return _run(["segment", "--dwi", case["dwi"], "--adc", case["adc"], "-o", out or case["out"], "--device", "cpu",
                 "--members", "classical", *extra])


def _one_error_line(res, code=2):
    assert res.exit_code == code, (res.exit_code, res.output, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error:"), lines[0]
    assert "Traceback" not in res.output + res.stderr
    return lines[0]


def _listing(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- item 1, end to end: a detached header naming another file ----------------------------------------------------
@pytest.mark.parametrize("target", ["/etc/passwd", "secret"])
def test_mhd_pointing_at_another_file_is_refused_and_nothing_is_written(case, tmp_path, target):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"root:x:0:0:secret-bytes\n" * 40)  # 960 bytes: enough for the declared 8x8x8 uint8
    ref = "/etc/passwd" if target == "/etc/passwd" else str(secret)
    if target == "/etc/passwd" and (not Path(ref).is_file() or Path(ref).stat().st_size < 512):
        pytest.skip("this machine has no /etc/passwd of at least 512 bytes")
    evil = case["dir"] / "evil.mhd"
    evil.write_text(f"ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementType = MET_UCHAR\n"
                    f"ElementDataFile = {ref}\n")
    if target == "/etc/passwd":
        assert len(evil.read_bytes()) < 130  # the 125-byte header of the report
    res = _run(["segment", "--dwi", evil, "--adc", case["adc"], "-o", case["out"], "--members", "classical",
                "--device", "cpu"])
    line = _one_error_line(res)
    assert "evil.mhd" in line and "ElementDataFile" in line
    assert not case["out"].exists()  # no report.html (or anything else) that could carry the bytes


def test_report_sha256_of_a_detached_header_covers_its_data_file(case, tmp_path):
    import SimpleITK as sitk

    dwi, adc = _case_arrays()
    mhd = case["dir"] / "dwi_meta.mhd"
    from deepisles.io.image import Image

    sitk.WriteImage(Image(dwi, np.diag([2.0, 2.0, 2.0, 1.0])).to_sitk(), str(mhd))  # the NIfTI ADC's grid  # dwi_meta.mhd + dwi_meta.raw
    raw = mhd.with_suffix(".raw")
    assert raw.is_file()

    def digest(out):
        res = _run(["segment", "--dwi", mhd, "--adc", case["adc"], "-o", out, "--members", "classical",
                    "--device", "cpu", "--no-html", "--no-preview"])
        assert res.exit_code == 0, res.stderr
        rec = json.loads((out / "report.json").read_text())["inputs"]["dwi"]
        assert rec["files"] == [str(mhd.resolve()), str(raw.resolve())]
        return rec["sha256"]

    first = digest(tmp_path / "o1")
    assert first == hashlib.sha256(mhd.read_bytes() + raw.read_bytes()).hexdigest()
    data = bytearray(raw.read_bytes())
    data[-1] ^= 1  # one voxel changes, the header does not
    raw.write_bytes(bytes(data))
    assert digest(tmp_path / "o2") != first


# --- item 4: --overwrite leaves no stale results --------------------------------------------------------------
def test_overwrite_removes_stale_owned_outputs_and_keeps_user_files(case):
    out = case["out"]
    res = _segment(case, "--save-members")
    assert res.exit_code == 0, res.output + res.stderr
    assert (out / "members" / "classical_prob.nii.gz").is_file()
    assert (out / "preview.png").is_file() and (out / "report.html").is_file()
    (out / "notes.txt").write_text("mine")
    (out / "members" / "my-notes.txt").write_text("mine too")

    res = _segment(case, "--overwrite", "--no-preview", "--no-html")
    assert res.exit_code == 0, res.output + res.stderr
    names = set(_listing(out))
    assert "preview.png" not in names and "report.html" not in names  # from the earlier run: gone
    assert "members/classical_prob.nii.gz" not in names
    assert {"lesion_mask.nii.gz", "lesion_prob.nii.gz", "report.json", "lesions.csv"} <= names
    assert (out / "notes.txt").read_text() == "mine" and (out / "members" / "my-notes.txt").read_text() == "mine too"
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["outputs"].values()) == {"lesion_mask.nii.gz", "lesion_prob.nii.gz", "lesion_agreement.nii.gz",
                                            "report.json", "lesions.csv"}
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no staging or temp files left


def test_without_overwrite_existing_results_are_refused_and_untouched(case):
    assert _segment(case).exit_code == 0
    before = _listing(case["out"])
    line = _one_error_line(_segment(case, "--no-html"))
    assert "--overwrite" in line
    assert _listing(case["out"]) == before


# --- item 5: one run per output folder --------------------------------------------------------------------------
def test_second_run_into_a_locked_folder_fails_at_once(case, monkeypatch):
    out = case["out"]
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)  # another run holds the folder
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        import deepisles.io.load as load

        monkeypatch.setattr(load, "read_inputs", lambda *a, **k: pytest.fail("inputs read despite the lock"))
        line = _one_error_line(_segment(case))
        assert "another deepisles run" in line
        assert list(out.iterdir()) == []
    finally:
        os.close(fd)


def test_the_lock_is_held_for_the_whole_run(case):
    from deepisles.api import segment

    seen = []

    def progress(msg):
        fd = os.open(case["out"], os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen.append((msg, "free"))
        except BlockingIOError:
            seen.append((msg, "locked"))
        finally:
            os.close(fd)

    segment(case["dwi"], case["adc"], outdir=case["out"], members="classical", device="cpu", html=False,
            preview=False, progress=progress)
    assert seen and all(state == "locked" for _, state in seen), seen
    fd = os.open(case["out"], os.O_RDONLY)  # released afterwards
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_two_real_processes_one_output_folder(case):
    """Two `segment` processes started together into one folder: one succeeds, the other fails with the lock
    error at once (or, when it started after the first finished, with the existing-results error)."""
    cmd = [sys.executable, "-m", "deepisles", "segment", "--dwi", str(case["dwi"]), "--adc", str(case["adc"]),
           "-o", str(case["out"]), "--members", "classical", "--device", "cpu", "--no-html", "--no-preview"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    res = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in res)
    assert codes == [0, 2], res
    failed = next(e for c, e in res if c == 2)
    assert "another deepisles run" in failed or "already holds results" in failed
    assert "Traceback" not in failed


# --- item 6: unwritable folders, write errors -------------------------------------------------------------------
@pytest.mark.parametrize("where", ["/proc/deepisles-cannot-create", "/proc/self"])
def test_unwritable_output_folder_is_refused_before_any_work(case, monkeypatch, where):
    import deepisles.io.load as load
    import deepisles.members as members

    monkeypatch.setattr(load, "read_inputs", lambda *a, **k: pytest.fail("inputs read before the folder check"))
    monkeypatch.setattr(members, "resolve_members", lambda *a, **k: pytest.fail("models loaded before the check"))
    line = _one_error_line(_segment(case, out=Path(where)))
    assert where in line


def test_disk_full_while_writing_is_one_line_exit_1_and_old_results_stay(case, monkeypatch):
    assert _segment(case, "--no-html").exit_code == 0
    before = _listing(case["out"])
    import deepisles.io.write as write

    def full(path, img):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(write, "write_nifti_atomic", full)
    line = _one_error_line(_segment(case, "--overwrite", "--no-html"), code=1)
    assert "No space left on device" in line
    assert _listing(case["out"]) == before  # nothing published: the earlier result set is intact
    assert not [n for n in os.listdir(case["out"]) if n.startswith(".")]


# --- item 7: killed and interrupted runs ------------------------------------------------------------------------
def test_leftovers_of_a_killed_run_are_swept(case):
    out = case["out"]
    assert _segment(case, "--no-html").exit_code == 0
    junk = [out / ".lesion_mask.ab12cd34.tmp.nii.gz", out / ".report.zz99yy88.tmp.json"]
    for j in junk:
        j.write_bytes(b"half")
    stage = out / ".deepisles-staging-4242-deadbeef"
    stage.mkdir()
    (stage / "lesion_mask.nii.gz").write_bytes(b"half")
    mine = out / ".my-hidden-file"
    mine.write_text("keep")
    res = _segment(case, "--overwrite", "--no-html")
    assert res.exit_code == 0, res.stderr
    assert not any(j.exists() for j in junk) and not stage.exists()
    assert mine.read_text() == "keep"
    rep = json.loads((out / "report.json").read_text())
    assert any("leftovers of an interrupted earlier run" in w for w in rep["warnings"])


def _wait_for(pred, timeout=120.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.02)
    return False


def _cli_cmd(case, out, *extra):
    return [sys.executable, "-m", "deepisles", "segment", "--dwi", str(case["dwi"]), "--adc", str(case["adc"]),
            "-o", str(out), "--members", "classical", "--device", "cpu", *extra]


def test_sigint_during_the_run_leaves_the_folder_as_it_was_and_says_so(case):
    out = case["out"]
    assert _segment(case, "--no-html").exit_code == 0
    before = _listing(out)
    p = subprocess.Popen(_cli_cmd(case, out, "--overwrite"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    assert _wait_for(lambda: any(n.startswith(".deepisles-staging-") for n in os.listdir(out))
                     or p.poll() is not None, 180)
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=120)
    if p.returncode == 0:
        pytest.skip("the run finished before the interrupt arrived")
    assert p.returncode == 130, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("interrupted:"), stderr
    assert "Traceback" not in stderr
    if "no result files were written" in lines[-1]:
        assert _listing(out) == before
    else:  # interrupted during the publish step: the message lists what was published
        assert "published" in lines[-1]


def test_sigkill_during_writing_then_a_rerun_leaves_no_partial_file(case):
    out = case["out"]
    p = subprocess.Popen(_cli_cmd(case, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _wait_for(lambda: out.is_dir() and any(n.startswith(".deepisles-staging-") for n in os.listdir(out))
                     or p.poll() is not None, 180)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    if p.returncode == 0:
        pytest.skip("the run finished before the kill arrived")
    visible = [n for n in os.listdir(out) if not n.startswith(".")]
    assert visible == []  # a killed run published nothing
    res = _segment(case, "--no-html")
    assert res.exit_code == 0, res.stderr
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # the staging folder of the killed run is gone


# --- item 8: an output path that is an input --------------------------------------------------------------------
def test_input_inside_the_output_folder_with_an_output_name_is_refused(case):
    out = case["out"]
    out.mkdir()
    dwi, adc = _case_arrays()
    adc_path = _save(out / "lesion_prob.nii.gz", adc)
    digest = hashlib.sha256(adc_path.read_bytes()).hexdigest()
    res = _run(["segment", "--dwi", case["dwi"], "--adc", adc_path, "-o", out, "--members", "classical",
                "--device", "cpu", "--overwrite"])
    line = _one_error_line(res)
    assert "is also the output file lesion_prob.nii.gz" in line
    assert hashlib.sha256(adc_path.read_bytes()).hexdigest() == digest
    assert sorted(os.listdir(out)) == ["lesion_prob.nii.gz"]


# --- item 9: user text is never rich markup ---------------------------------------------------------------------
@pytest.mark.parametrize("folder", ["in[/]x", "in[red]x", "in[bold]x[/bold]"])
def test_markup_in_paths_is_printed_verbatim(tmp_path, folder):
    d = tmp_path / folder  # "[/]" also splits the path: the folder "in[" holds "]x"
    d.mkdir(parents=True)
    missing = d / "adc.nii.gz"
    dwi, _ = _case_arrays()
    dwi_path = _save(d / "dwi.nii.gz", dwi)
    res = _run(["segment", "--dwi", dwi_path, "--adc", missing, "-o", tmp_path / "out", "--members", "classical"])
    line = _one_error_line(res)
    assert str(missing) in " ".join(line.split()) or str(missing) in line


def test_a_warning_holding_markup_does_not_fail_a_good_run(tmp_path):
    d = tmp_path / "in[/]x[red]"
    d.mkdir(parents=True)
    dwi, adc = _case_arrays()
    dwi[0, 0, 0] = np.nan  # -> a warning naming the DWI path
    dwi_path, adc_path = _save(d / "dwi.nii.gz", dwi), _save(d / "adc.nii.gz", adc)
    res = _run(["segment", "--dwi", dwi_path, "--adc", adc_path, "-o", tmp_path / "o[/]", "--members", "classical",
                "--device", "cpu", "--no-html"])
    assert res.exit_code == 0, res.output + res.stderr
    assert str(dwi_path) in "".join(res.stderr.split("\n"))


def test_py7zr_hint_keeps_its_brackets(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_py7zr(name, *a, **k):
        if name == "py7zr":
            raise ImportError("no py7zr")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_py7zr)
    archive = tmp_path / "stroke_ensemble_weights.7z"
    archive.write_bytes(b"7z")
    res = _run(["weights", "import", archive])
    assert res.exit_code == 2
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]  # after the "unpacking" progress
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "pip install 'deepisles[import]'" in errors[0]


# --- item 13: one ambiguous case does not abort a batch ---------------------------------------------------------
def test_batch_logs_an_ambiguous_case_and_runs_the_others(tmp_path):
    ds = tmp_path / "ds"
    for sub in ("sub-01", "sub-02"):
        d = ds / sub / "ses-1" / "dwi"
        d.mkdir(parents=True)
        dwi, adc = _case_arrays(seed=int(sub[-1]))
        _save(d / f"{sub}_ses-1_dwi.nii.gz", dwi)
        _save(d / f"{sub}_ses-1_adc.nii.gz", adc)
    _save(ds / "sub-02" / "ses-1" / "dwi" / "sub-02_ses-1_acq-b_dwi.nii.gz", _case_arrays(seed=5)[0])
    out = tmp_path / "deriv"
    res = _run(["batch", "-i", ds, "-o", out, "--members", "classical", "--device", "cpu"])
    assert res.exit_code == 1, res.output + res.stderr
    assert "Traceback" not in res.output + res.stderr
    failures = [json.loads(ln) for ln in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["case"] for f in failures] == ["sub-02_ses-1"]
    assert "2 DWI files" in failures[0]["error"]
    assert (out / "sub-01" / "ses-1" / "dwi" / "sub-01_ses-1_space-orig_desc-lesion_mask.nii.gz").is_file()


def test_batch_locks_its_output_root_per_shard(tmp_path):
    from deepisles.batch import RUN_LOCK, run_lock
    from deepisles.errors import DeepIslesError

    out = tmp_path / "deriv"
    out.mkdir()
    with run_lock(out, (1, 2)):
        with run_lock(out, (2, 2)):  # another shard of the same array: fine
            pass
        with pytest.raises(DeepIslesError, match="shard 1/2"):
            with run_lock(out, (1, 2)):
                pass
        with pytest.raises(DeepIslesError, match="another deepisles batch"):
            with run_lock(out, (1, 1)):
                pass
    with run_lock(out, (1, 1)):
        with pytest.raises(DeepIslesError, match="another deepisles batch"):
            with run_lock(out, (2, 3)):
                pass
    assert (out / RUN_LOCK).exists()


def test_batch_cli_refuses_a_root_held_by_another_batch(tmp_path):
    from deepisles.batch import RUN_LOCK

    ds = tmp_path / "ds" / "sub-01" / "dwi"
    ds.mkdir(parents=True)
    dwi, adc = _case_arrays()
    _save(ds / "sub-01_dwi.nii.gz", dwi)
    _save(ds / "sub-01_adc.nii.gz", adc)
    out = tmp_path / "deriv"
    out.mkdir()
    fd = os.open(out / RUN_LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        line = _one_error_line(_run(["batch", "-i", tmp_path / "ds", "-o", out, "--members", "classical"]))
        assert "another deepisles batch" in line
    finally:
        os.close(fd)


# --- item 14: inputs first, then models ----------------------------------------------------------------------------
def test_a_mistyped_input_is_reported_before_any_model_loads(case, monkeypatch):
    import deepisles.members as members

    monkeypatch.setattr(members, "resolve_members", lambda *a, **k: pytest.fail("models loaded before inputs"))
    res = _run(["segment", "--dwi", case["dwi"], "--adc", case["dir"] / "adc-typo.nii.gz", "-o", case["out"]])
    line = _one_error_line(res)
    assert "adc-typo.nii.gz" in line and "not found" in line
    assert not case["out"].exists()


def test_an_unknown_member_is_reported_before_inputs_are_read(case, monkeypatch):
    import deepisles.io.load as load

    monkeypatch.setattr(load, "read_inputs", lambda *a, **k: pytest.fail("inputs read before the options check"))
    line = _one_error_line(_run(["segment", "--dwi", case["dwi"], "--adc", case["adc"], "-o", case["out"],
                                 "--members", "seals,nvauto,bogus"]))
    assert "bogus" in line


# --- found by the fuzz suite: an ADC that overlaps the DWI's box but not its brain ---------------------------------
def test_adc_not_covering_the_brain_is_an_input_error(case):
    dwi, adc = _case_arrays()
    adc[:, :, 8:] = 0  # values only in the lowest slices of the brain
    adc_path = _save(case["dir"] / "adc_partial.nii.gz", adc)
    res = _run(["segment", "--dwi", case["dwi"], "--adc", adc_path, "-o", case["out"], "--members", "classical",
                "--device", "cpu"])
    line = _one_error_line(res)
    assert "adc_partial.nii.gz" in line and "of the DWI brain" in line
    assert not case["out"].exists()
