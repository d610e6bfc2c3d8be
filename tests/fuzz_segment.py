"""Property-based fuzzing of `deepisles segment` on random-but-plausible NIfTI / MetaImage inputs.

Run by ``tests/test_fuzz_inputs.py`` in a child process (so that its peak RSS can be measured alone):

    python tests/fuzz_segment.py --examples 100 --seed 4

Each example writes a DWI and an ADC whose headers and data are drawn at random (format, dtype, shape including
0/1/4D/huge declared sizes, voxel sizes including 0/negative/non-finite, qform/sform codes and affines,
scl_slope/inter, NaNs, ADC units, detached MetaImage data files pointing anywhere) and runs the CLI in-process with
the classical member. The property, for every example: exit 0 with a mask and a probability on the DWI grid, or
exit 2 with exactly one line ``error: ...`` on stderr and nothing written; never a traceback, never another exit
code. Hostile detached headers must be refused. Exits 1 with the falsifying example on failure; prints one JSON
line of counts on success.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from deepisles.cli import app
from deepisles.io.image import Image

RUNNER = CliRunner()
STATS = {"examples": 0, "exit0": 0, "exit2": 0}
SPACINGS = [2.0, 1.0, 0.9, 3.5, 0.0, -2.0, 1e-9, 1e6, float("nan"), float("inf")]
SHAPES = [(30, 34, 22), (24, 28, 20), (20, 20, 16), (1, 30, 30), (30, 0, 20), (20, 20, 16, 2), (16, 16),
          (20, 20, 16, 1)]
HOSTILE_DATA_FILES = ["/etc/passwd", "../outside.raw", "sub/x.raw", "..", "LIST", "x%03d.raw", "link.raw"]


def _brain(shape3, rng, adc: bool) -> np.ndarray:
    ii = np.indices(shape3).astype(np.float32)
    c = np.array(shape3, np.float32)[:, None, None, None] / 2
    r = np.maximum(np.array(shape3, np.float32) * 0.42, 1)[:, None, None, None]
    brain = (((ii - c) / r) ** 2).sum(0) < 1
    lesion = (((ii - c * 1.2) / np.maximum(r * 0.3, 1)) ** 2).sum(0) < 1
    if adc:
        v = np.where(brain, 0.8 + 0.03 * rng.standard_normal(shape3), 0)
        v[lesion & brain] *= 0.55
    else:
        v = np.where(brain, 230 + 10 * rng.standard_normal(shape3), 0)
        v[lesion & brain] *= 2
    return v.astype(np.float64)


@st.composite
def image_specs(draw, role: str):
    if draw(st.integers(0, 2)) == 0:  # a third are plausible scans, so that the exit-0 branch is well exercised
        return {
            "role": role, "fmt": draw(st.sampled_from(["nii.gz", "nii", "mha", "mhd"])),
            "shape": draw(st.sampled_from(SHAPES[:3])), "dtype": draw(st.sampled_from(["float32", "int16"])),
            "spacing": [draw(st.sampled_from(SPACINGS[:4])) for _ in range(3)], "rotate": draw(st.booleans()),
            "codes": draw(st.sampled_from([(1, 1), (0, 1), (1, 0)])), "slope": None, "inter": None,
            "nan_fraction": draw(st.sampled_from([0.0, 0.01])), "adc_scale": 1.0, "declared": None,
            "data_file": None,
        }
    return {
        "role": role,
        "fmt": draw(st.sampled_from(["nii.gz", "nii", "mha", "mhd"])),
        "shape": draw(st.sampled_from(SHAPES[:3]) if draw(st.booleans()) else st.sampled_from(SHAPES)),
        "dtype": draw(st.sampled_from(["float32", "int16", "uint8", "float64", "uint16", "int32", "int8",
                                       "complex64"])),
        "spacing": [draw(st.sampled_from(SPACINGS[:4]) if draw(st.booleans()) else st.sampled_from(SPACINGS))
                    for _ in range(3)],
        "rotate": draw(st.booleans()),
        "codes": draw(st.sampled_from([(1, 1), (0, 0), (2, 0), (0, 4), (1, 0)])),
        "slope": draw(st.sampled_from([None, None, 1.0, 2.5, 0.0, -1.0, float("nan"), float("inf")])),
        "inter": draw(st.sampled_from([None, 0.0, 10.0, float("nan")])),
        "nan_fraction": draw(st.sampled_from([0.0, 0.0, 0.01, 1.0])),
        "adc_scale": draw(st.sampled_from([1.0, 1e-3, 1e3, 1e-6])),
        "declared": draw(st.sampled_from([None] * 6 + [(1100, 1100, 1100), (2**15 - 1,) * 3, (50, 50, 50)])),
        "data_file": draw(st.sampled_from([None] * 4 + HOSTILE_DATA_FILES)),
    }


def _array(spec, rng) -> np.ndarray:
    shape = spec["shape"]
    shape3 = tuple(shape[:3]) if len(shape) >= 3 else tuple(shape)
    if len(shape3) == 3 and min(shape3) > 0:
        base = _brain(shape3, rng, spec["role"] == "adc")
        if spec["role"] == "adc":
            base = base * spec["adc_scale"]
        if len(shape) == 4:
            base = np.stack([base * (0.5 + 0.5 * t) for t in range(shape[3])], axis=-1)
    else:
        base = rng.random(shape) * 100
    dt = np.dtype(spec["dtype"])
    if dt.kind in "iu":
        info = np.iinfo(dt)
        if base.size and np.nanmax(np.abs(base)) > 0 and np.nanmax(np.abs(base)) < 50:
            base = base * (min(info.max, 2000) / np.nanmax(np.abs(base)))  # keep some dynamic range
        base = np.clip(np.nan_to_num(base), info.min, info.max)
    arr = base.astype(dt)
    if dt.kind == "f" and spec["nan_fraction"] and arr.size:
        m = rng.random(arr.shape) < spec["nan_fraction"]
        arr[m] = np.nan
    return arr


def _affine(spec, rng) -> np.ndarray:
    a = np.diag([*spec["spacing"], 1.0])
    if spec["rotate"]:
        q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
        with np.errstate(invalid="ignore"):
            a[:3, :3] = q @ a[:3, :3]
    a[:3, 3] = [-30.0, -35.0, -20.0]
    return a


def _write_nifti(path: Path, arr, spec, affine) -> None:
    img = nib.Nifti1Image(arr, None)
    hdr = img.header
    zooms = [float(z) for z in spec["spacing"]] + [1.0] * (arr.ndim - 3)
    pix = hdr["pixdim"].copy()
    pix[1 : 1 + min(arr.ndim, 7)] = (zooms + [1.0] * 7)[: min(arr.ndim, 7)]
    hdr["pixdim"] = pix
    q, s = spec["codes"]
    if q and np.all(np.isfinite(affine)) and abs(np.linalg.det(affine[:3, :3])) > 0:
        try:
            hdr.set_qform(affine, code=q)
        except Exception:  # nibabel refuses some affines for the qform; leave it unset
            hdr["qform_code"] = 0
    else:
        hdr["qform_code"] = 0
    if s:
        hdr.set_sform(affine, code=s)
    else:
        hdr["sform_code"] = 0
    if spec["slope"] is not None:
        hdr["scl_slope"] = spec["slope"]
    if spec["inter"] is not None:
        hdr["scl_inter"] = spec["inter"]
    data = np.ascontiguousarray(arr).tobytes(order="F")
    if spec["declared"] is not None and arr.ndim >= 3:
        hdr["dim"][1:4] = spec["declared"]
    hdr["vox_offset"] = 352
    raw = hdr.binaryblock + b"\0" * 4 + data
    if path.name.endswith(".gz"):
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def _write_meta(path: Path, arr, spec, affine) -> None:
    if arr.ndim != 3 or min(arr.shape) == 0 or arr.dtype.kind == "c":
        # SimpleITK cannot write these: a hand-made header with the raw bytes (what a hostile file would be)
        raw = path.with_suffix(".raw")
        raw.write_bytes(np.ascontiguousarray(arr.real if arr.dtype.kind == "c" else arr).tobytes(order="F"))
        dims = " ".join(str(d) for d in arr.shape) or "0"
        text = (f"ObjectType = Image\nNDims = {max(arr.ndim, 1)}\nDimSize = {dims}\n"
                f"ElementSpacing = {' '.join(str(v) for v in spec['spacing'][: max(arr.ndim, 1)])}\n"
                f"ElementType = MET_FLOAT\nElementDataFile = {raw.name}\n")
        path.write_text(text)
        if spec["declared"] is not None or spec["data_file"] is not None:
            _patch_meta(path, spec)
        return
    ok = np.all(np.isfinite(affine)) and abs(np.linalg.det(affine[:3, :3])) > 1e-12
    img = Image(np.asarray(arr), affine if ok else np.diag([1.0, 1.0, 1.0, 1.0])).to_sitk() if ok else None
    if img is None:
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(arr).transpose(2, 1, 0)))
    sitk.WriteImage(img, str(path))
    if spec["declared"] is not None or spec["data_file"] is not None or not ok:
        _patch_meta(path, spec)


def _patch_meta(path: Path, spec) -> None:
    """Rewrite header fields in place (declared sizes, voxel sizes, the data file)."""
    header_path = path
    raw = path.read_bytes()
    cut = raw.find(b"ElementDataFile")
    end = raw.find(b"\n", cut) + 1
    head, tail = raw[:end].decode("latin-1"), raw[end:]
    lines = head.splitlines()
    out = []
    for ln in lines:
        key = ln.split("=")[0].strip()
        if key == "DimSize" and spec["declared"] is not None:
            ln = "DimSize = " + " ".join(str(d) for d in spec["declared"])
        elif key == "ElementSpacing":
            ln = "ElementSpacing = " + " ".join(str(v) for v in spec["spacing"])
        elif key == "ElementDataFile" and spec["data_file"] is not None:
            if spec["data_file"] == "link.raw":
                os.symlink("/etc/passwd", path.parent / "link.raw")
            ln = f"ElementDataFile = {spec['data_file']}"
            if path.suffix == ".mha":  # the voxels move to a detached file
                (path.parent / "payload.raw").write_bytes(tail)
                tail = b""
        out.append(ln)
    header_path.write_bytes(("\n".join(out) + "\n").encode("latin-1") + tail)


def write_spec(folder: Path, spec, rng) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    arr = _array(spec, rng)
    affine = _affine(spec, rng)
    path = folder / f"{spec['role']}.{spec['fmt']}"
    if spec["fmt"].startswith("nii"):
        _write_nifti(path, arr, spec, affine)
    else:
        _write_meta(path, arr, spec, affine)
    return path


def check_example(dwi_spec, adc_spec, rng_seed: int) -> None:
    rng = np.random.default_rng(rng_seed)
    work = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        dwi = write_spec(work / "dwi", dwi_spec, rng)
        adc = write_spec(work / "adc", adc_spec, rng)
        out = work / "out"
        res = RUNNER.invoke(app, ["segment", "--dwi", str(dwi), "--adc", str(adc), "-o", str(out), "--members",
                                  "classical", "--device", "cpu", "--no-html", "--no-preview"])
        STATS["examples"] += 1
        where = f"dwi={dwi_spec} adc={adc_spec}"
        text = (res.stdout or "") + (res.stderr or "")
        assert "Traceback" not in text, f"traceback: {text[-3000:]} ({where})"
        assert res.exit_code in (0, 2), f"exit {res.exit_code}: {res.exception!r} {text[-2000:]} ({where})"
        hostile = any(s["fmt"] in ("mha", "mhd") and s["data_file"] in HOSTILE_DATA_FILES
                      for s in (dwi_spec, adc_spec))
        if res.exit_code == 0:
            assert not hostile, f"a hostile detached header was accepted ({where})"
            STATS["exit0"] += 1
            mask = nib.load(out / "lesion_mask.nii.gz")
            prob = nib.load(out / "lesion_prob.nii.gz")
            rep = json.loads((out / "report.json").read_text())
            grid = tuple(rep["inputs"]["dwi"]["shape"][:3])
            assert mask.shape == grid == prob.shape, (mask.shape, prob.shape, grid, where)
            assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 1}
            assert np.isfinite(np.asarray(prob.dataobj)).all()
        else:
            STATS["exit2"] += 1
            lines = [ln for ln in (res.stderr or "").splitlines() if ln.strip()]
            assert len(lines) == 1 and lines[0].startswith("error:"), f"stderr {res.stderr!r} ({where})"
            assert not out.exists() or not any(out.iterdir()), f"written despite the error ({where})"
            assert "root:x:0:0" not in text  # /etc/passwd never shows up
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--examples", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink],
              print_blob=True)
    @given(image_specs("dwi"), image_specs("adc"), st.integers(0, 2**31 - 1))
    def fuzz(dwi_spec, adc_spec, rng_seed):
        check_example(dwi_spec, adc_spec, rng_seed)

    fuzz()
    print(json.dumps(STATS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
