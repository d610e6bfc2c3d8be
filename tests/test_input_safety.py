"""Input hardening: detached headers, declared sizes, zero voxel sizes, exact grid reordering, clean messages.

Issue items 1 (local file disclosure through detached headers), 10 (zero voxel size), 11 (memory from declared
dimensions), 12 (physically identical grids) and 15 (raw library lines, misleading messages). The library
modules are reached as ``rd.<name>`` inside the tests so that each test fails on its own on code without them.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from deepisles.errors import InputError
from deepisles.io import load as ld
from deepisles.io import read as rd
from deepisles.io import validate as vd
from deepisles.io.image import Image
from deepisles.preprocess import resample as rs
from deepisles.preprocess.inputs import load_inputs

OBLIQUE = np.array(
    [[-1.9, 0.3, 0.2, 60.0], [0.25, 1.95, -0.3, -70.0], [0.15, 0.2, 3.4, -20.0], [0.0, 0.0, 0.0, 1.0]]
)


def _err(path, role="dwi", **kw) -> InputError:
    with pytest.raises(InputError) as ei:
        rd.read_image(path, role, **kw)
    err = ei.value
    assert err.path == str(path) and "\n" not in str(err)
    return err


def _vol(shape=(6, 5, 4), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 20, size=shape).astype(np.float32)


def _meta_header(data_file: str, dims=(4, 4, 4), etype="MET_FLOAT", extra="") -> str:
    return (f"ObjectType = Image\nNDims = {len(dims)}\nDimSize = {' '.join(map(str, dims))}\n"
            f"ElementType = {etype}\n{extra}ElementDataFile = {data_file}\n")


def _nrrd_header(data_file: str | None, dims=(4, 4, 4), extra="") -> str:
    text = (f"NRRD0004\ntype: float\ndimension: {len(dims)}\nsizes: {' '.join(map(str, dims))}\n"
            f"encoding: raw\nendian: little\n{extra}")
    return text + (f"data file: {data_file}\n" if data_file is not None else "\n")


# --- item 1: detached headers -------------------------------------------------------------------------
def test_mhd_naming_etc_passwd_is_refused(tmp_path):
    p = tmp_path / "leak.mhd"
    p.write_text(_meta_header("/etc/passwd", dims=(8, 8, 8), etype="MET_UCHAR"))
    err = _err(p)
    assert "/etc/passwd" in err.problem and "absolute path" in err.problem
    assert "root:" not in str(err)
    with pytest.raises(InputError, match="/etc/passwd"):
        rd.image_files(p)
    with pytest.raises(InputError, match=": DWI header \\(ElementDataFile\\)"):
        rd.image_files(p, "dwi")


def _hostile(tmp_path: Path, ref: str) -> str:
    """Set the scene for one hostile reference; return the value to put in the header."""
    outside = tmp_path / "outside.raw"
    outside.write_bytes(np.ones(64, np.float32).tobytes())
    (tmp_path / "case" / "sub").mkdir(parents=True)
    (tmp_path / "case" / "sub" / "x.raw").write_bytes(np.ones(64, np.float32).tobytes())
    if ref == "abs":
        return str(outside)
    if ref == "link":
        os.symlink(outside, tmp_path / "case" / "link.raw")
        return "link.raw"
    if ref == "dangling":
        os.symlink(tmp_path / "nowhere.raw", tmp_path / "case" / "dangling.raw")
        return "dangling.raw"
    return {"parent": "../outside.raw", "sub": "sub/x.raw", "backslash": "sub\\x.raw", "dotdot": "..",
            "list": "LIST", "pattern": "x%03d.raw 0 2 1", "stdin": "-", "drive": "C:x.raw"}[ref]


@pytest.mark.parametrize("fmt", ["mhd", "mha", "nhdr", "nrrd"])
@pytest.mark.parametrize(
    "ref", ["abs", "parent", "sub", "backslash", "dotdot", "link", "dangling", "list", "pattern", "stdin", "drive"]
)
def test_hostile_detached_references_are_refused(tmp_path, fmt, ref):
    value = _hostile(tmp_path, ref)
    p = tmp_path / "case" / f"adc.{fmt}"
    p.write_text(_meta_header(value) if fmt in ("mhd", "mha") else _nrrd_header(value))
    err = _err(p, "adc")
    assert err.problem.startswith("ADC header") and value.split()[0] in err.problem, err.problem
    assert "names the data file" in err.problem
    with pytest.raises(InputError):
        rd.image_files(p)


@pytest.mark.parametrize(
    "header",
    [
        b"ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementType = MET_UCHAR\nElementDataFile\n= /etc/passwd\n",
        b"ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementType = MET_UCHAR\nElementDataFile\0x = /etc/passwd\n",
        b"ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementType = MET_UCHAR\nElementDataFile\r= /etc/passwd\n",
        b"ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementType = MET_UCHAR\nelementdatafile = LOCAL\n"
        b"ElementDataFile = /etc/passwd\n",
    ],
    ids=["value-on-next-line", "nul-in-key", "cr-in-key", "case-decoy"],
)
def test_metaimage_header_tricks_are_refused(tmp_path, header):
    p = tmp_path / "x.mhd"
    p.write_bytes(header)
    err = _err(p)
    assert "root:" not in str(err)


def test_nrrd_data_file_hidden_behind_key_value_separator_is_refused(tmp_path):
    p = tmp_path / "x.nhdr"
    p.write_text(_nrrd_header("/etc/passwd :=x"))  # teem: field 'data file' (first ': '), not a key/value
    assert "/etc/passwd" in _err(p).problem


def test_overlong_metaimage_header_is_refused(tmp_path):
    p = tmp_path / "x.mhd"
    (tmp_path / "x.raw").write_bytes(np.ones(64, np.float32).tobytes())
    comments = "".join(f"Comment{i} = {'x' * 60}\n" for i in range(1200))  # ~80 KiB before ElementDataFile
    p.write_text(_meta_header("x.raw", extra=comments))
    assert "64 KiB" in _err(p).problem


def test_plain_detached_headers_and_attached_data_are_read(tmp_path):
    data = _vol()
    img = Image(data, OBLIQUE)
    sitk.WriteImage(img.to_sitk(), str(tmp_path / "a.mhd"))  # a.mhd + a.raw
    sitk.WriteImage(img.to_sitk(), str(tmp_path / "b.mha"))  # LOCAL
    sitk.WriteImage(img.to_sitk(), str(tmp_path / "c.nhdr"))  # c.nhdr + c.raw
    sitk.WriteImage(img.to_sitk(), str(tmp_path / "d.nrrd"))  # attached
    # a detached .mha naming a plain file, through a symbolic link that stays in the folder
    os.symlink("a.raw", tmp_path / "e.raw")
    (tmp_path / "e.mha").write_text((tmp_path / "a.mhd").read_text().replace("a.raw", "e.raw"))
    expected = {
        "a.mhd": ["a.mhd", "a.raw"], "b.mha": ["b.mha"], "c.nhdr": ["c.nhdr", "c.raw"], "d.nrrd": ["d.nrrd"],
        "e.mha": ["e.mha", "e.raw"],
    }
    for name, files in expected.items():
        out = rd.read_image(tmp_path / name, "dwi")
        np.testing.assert_array_equal(out.data, data)
        np.testing.assert_allclose(out.affine, OBLIQUE, atol=1e-5)
        assert rd.image_files(tmp_path / name) == [tmp_path / f for f in files]
        assert out.meta["source_files"] == [str(tmp_path / f) for f in files]


def test_image_files_nifti_and_dicom(tmp_path):
    from test_io_read import write_dicom_series

    p = tmp_path / "x.nii.gz"
    nib.save(Image(_vol(), np.eye(4)).to_nifti(), p)
    assert rd.image_files(p) == [p]
    folder = tmp_path / "study"
    aff = np.diag([1.5, 1.5, 3.0, 1.0])
    write_dicom_series(folder, _vol().astype(np.int16), aff, description="ep2d_diff_trace", prefix="dwi")
    write_dicom_series(folder, _vol().astype(np.int16), aff, description="ep2d_diff_ADC", prefix="adc")
    (folder / "notes.txt").write_text("not DICOM")
    everything = rd.image_files(folder)
    assert everything == sorted(folder.iterdir()) and len(everything) == 9
    assert rd.image_files(folder, "adc") == everything
    adc = rd.image_files(folder, "adc", dicom_series=True)
    assert adc == sorted(folder.glob("adc*.dcm"))
    assert rd.image_files(folder / "dwi002.dcm") == sorted(folder.glob("dwi*.dcm"))
    assert rd.read_image(folder, "adc").meta["source_files"] == [str(f) for f in adc]
    with pytest.raises(InputError, match="not found"):
        rd.image_files(tmp_path / "missing.nii.gz")


# --- item 2 (10): zero / absurd voxel sizes ---------------------------------------------------------
def _nifti_bytes(shape=(6, 5, 4), pixdim=(1.0, 1.0, 1.0), qform=0, sform=0, srow=None, dtype=np.float32,
                 data: bytes | None = None) -> bytes:
    h = nib.Nifti1Header()
    h.set_data_shape(shape)
    h.set_data_dtype(dtype)
    h["pixdim"][1:4] = pixdim
    h["qform_code"], h["sform_code"] = qform, sform
    if srow is not None:
        h["srow_x"], h["srow_y"], h["srow_z"] = srow[0], srow[1], srow[2]
    h["vox_offset"] = 352
    if data is None:
        data = np.ones(int(np.prod(shape)), dtype).tobytes()
    return h.binaryblock + b"\0" * 4 + data


@pytest.mark.parametrize(
    "kw,words",
    [
        ({"pixdim": (0.0, 0.0, 0.0)}, ["voxel size of 0", "pixdim", "no sform/qform"]),
        ({"pixdim": (2.0, 2.0, 0.0), "qform": 1}, ["voxel size of 0", "qform_code 1"]),
        ({"pixdim": (-0.0, 1.0, 1.0)}, ["voxel size of 0"]),
        ({"pixdim": (np.nan, 1.0, 1.0)}, ["non-finite voxel sizes"]),
        ({"pixdim": (1e6, 1.0, 1.0)}, ["absurd voxel sizes"]),
        ({"sform": 1, "srow": np.array([[2.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 2.0, 0]])},
         ["voxel size of 0", "sform"]),
        ({"sform": 1, "srow": np.array([[2.0, 0, 0, 0], [0, np.inf, 0, 0], [0, 0, 2.0, 0]])}, ["non-finite sform"]),
    ],
    ids=["pixdim-0", "qform-pixdim-0", "negative-zero", "nan", "absurd", "sform-zero-column", "sform-inf"],
)
def test_nifti_unusable_voxel_sizes_are_refused(tmp_path, kw, words):
    for name in ("x.nii", "x.nii.gz"):
        p = tmp_path / name
        raw = _nifti_bytes(**kw)
        p.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
        err = _err(p)
        for w in words:
            assert w in err.problem, err.problem


def test_nibabel_messages_do_not_reach_stderr(tmp_path, capfd):
    p = tmp_path / "neg.nii"
    p.write_bytes(_nifti_bytes(pixdim=(-2.0, 2.0, 2.0)))  # valid; nibabel logs a fix of the sign
    capfd.readouterr()
    img = rd.read_image(p, "dwi")
    out = capfd.readouterr()
    assert out.err == "" and out.out == ""
    assert img.spacing == pytest.approx((2.0, 2.0, 2.0))
    assert any("pixdim" in w and str(p) in w for w in img.meta["read_warnings"])


# --- item 3 (11): declared sizes, truncated data, bounded memory --------------------------------------
def _tiny_nifti_gz(path: Path, shape, dtype=np.float32) -> Path:
    h = nib.Nifti1Header()
    h.set_data_shape(shape)
    h.set_data_dtype(dtype)
    h.set_zooms((1.0,) * len(shape))
    bio = io.BytesIO()
    h.write_to(bio)
    bio.write(b"\0" * 4)
    path.write_bytes(gzip.compress(bio.getvalue()))
    return path


def _run_measured(body: str, tmp_path: Path) -> dict:
    """Run ``body`` (which sets ``result``) in a child Python; return result + peak RSS growth (MiB) + time."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent("""
        import json, resource, time
        from deepisles.errors import InputError
        from deepisles.io.read import read_image
        from deepisles.io.load import read_inputs
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        result = {}
    """) + textwrap.dedent(body) + textwrap.dedent("""
        result["seconds"] = time.perf_counter() - t0
        result["rss_growth_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        print(json.dumps(result))
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_huge_declared_nifti_is_refused_fast_in_bounded_memory(tmp_path):
    p = _tiny_nifti_gz(tmp_path / "dwi.nii.gz", (1100, 1100, 1100))
    assert p.stat().st_size < 200
    res = _run_measured(f"""
        try:
            read_image({str(p)!r}, "dwi")
        except InputError as e:
            result["error"] = str(e)
    """, tmp_path)
    msg = res.get("error", "")
    assert "1100 x 1100 x 1100" in msg and "1,331,000,000 voxels" in msg and "--max-voxels" in msg, res
    assert res["rss_growth_mib"] < 200 and res["seconds"] < 10, res


def test_truncated_data_under_the_limit_is_refused_in_bounded_memory(tmp_path):
    gz = _tiny_nifti_gz(tmp_path / "adc.nii.gz", (1000, 1000, 1000), np.uint8)  # 1 GB declared, ~none present
    raw = tmp_path / "raw.nii"
    raw.write_bytes(_nifti_bytes(shape=(1000, 1000, 1000), dtype=np.uint8, data=b"\0" * 1000))
    mha = tmp_path / "t.mha"
    mha.write_bytes(_meta_header("LOCAL", dims=(1000, 1000, 1000), etype="MET_UCHAR").encode() + b"\0" * 1000)
    res = _run_measured(f"""
        for name in ({str(gz)!r}, {str(raw)!r}, {str(mha)!r}):
            try:
                read_image(name, "adc")
            except InputError as e:
                result[name] = e.problem
    """, tmp_path)
    for p in (gz, raw, mha):
        assert "truncated" in res.get(str(p), "") and "1,000,000,000 bytes" in res[str(p)], res
    assert res["rss_growth_mib"] < 200, res


def test_metaimage_and_nrrd_declared_size_checked_before_reading(tmp_path):
    mha = tmp_path / "big.mha"
    mha.write_bytes(_meta_header("LOCAL", dims=(1100, 1100, 1100), etype="MET_UCHAR").encode() + b"\0" * 64)
    nrrd = tmp_path / "big.nrrd"
    nrrd.write_bytes(_nrrd_header(None, dims=(1100, 1100, 1100)).encode() + b"\0" * 64)
    for p in (mha, nrrd):
        err = _err(p)
        assert "1100 x 1100 x 1100" in err.problem and "--max-voxels" in err.problem, err.problem


def test_max_voxels_keyword(tmp_path):
    assert rd.DEFAULT_MAX_VOXELS == 1 << 30 == vd.DEFAULT_MAX_VOXELS
    p = tmp_path / "dwi.nii.gz"
    nib.save(Image(_vol((10, 10, 10)), np.eye(4)).to_nifti(), p)
    assert rd.read_image(p, "dwi", max_voxels=1000).shape == (10, 10, 10)
    err = _err(p, max_voxels=999)
    assert "10 x 10 x 10 = 1,000 voxels" in err.problem and "limit of 999" in err.problem
    p4 = tmp_path / "dwi4d.nii.gz"
    nib.save(Image(_vol((10, 10, 10, 2)), np.eye(4)).to_nifti(), p4)
    assert "10 x 10 x 10 x 2 = 2,000 voxels" in _err(p4, max_voxels=1999).problem  # all volumes count
    mha = tmp_path / "adc.mha"
    sitk.WriteImage(Image(_vol((10, 10, 10)), np.eye(4)).to_sitk(), str(mha))
    assert "limit of 999" in _err(mha, "adc", max_voxels=999).problem
    with pytest.raises(InputError, match="limit of 999") as ei:
        ld.read_inputs(p, mha, max_voxels=999)
    assert ei.value.path == str(p)


def test_dicom_declared_size_checked_before_reading(tmp_path):
    from test_io_read import write_dicom_series

    write_dicom_series(tmp_path / "s", _vol((12, 10, 8)).astype(np.int16), np.eye(4), description="dwi")
    err = _err(tmp_path / "s", max_voxels=959)
    assert "DICOM series declares 12 x 10 x 8 = 960 voxels" in err.problem
    assert rd.read_image(tmp_path / "s", "dwi", max_voxels=960).shape == (12, 10, 8)


# --- item 4 (12): the same grid stored with other axis order / direction ---------------------------
def _reordered(data: np.ndarray, affine: np.ndarray, axes, flips) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored with its axes in order ``axes`` and flipped where ``flips``: returns
    (array, affine) describing exactly the same voxels in space."""
    arr = np.transpose(data, axes)
    m = np.eye(4)  # new index -> old index
    for new_ax, old_ax in enumerate(axes):
        m[old_ax, :] = 0
        if flips[new_ax]:
            m[old_ax, new_ax], m[old_ax, 3] = -1, arr.shape[new_ax] - 1
        else:
            m[old_ax, new_ax] = 1
    for ax, f in enumerate(flips):
        if f:
            arr = np.flip(arr, axis=ax)
    return np.ascontiguousarray(arr), affine @ m


def test_flipped_and_permuted_adc_is_reordered_exactly(tmp_path):
    rng = np.random.default_rng(0)
    shape = (20, 18, 12)
    aff = np.array([[-1.1, 0.05, 0.02, 40.3], [0.04, 1.1, -0.03, -50.7], [0.01, 0.03, 3.3, -20.1], [0, 0, 0, 1]])
    dwi = np.where(rng.random(shape) > 0.2, rng.normal(300, 30, shape), 0).astype(np.float32)
    adc = np.where(dwi > 0, rng.normal(0.8, 0.2, shape), 0).astype(np.float32)
    nib.save(Image(dwi, aff).to_nifti(), tmp_path / "dwi.nii.gz")
    arr, aff2 = _reordered(adc, aff, (1, 0, 2), (True, False, False))
    assert arr.shape == (18, 20, 12)
    nib.save(Image(arr, aff2).to_nifti(), tmp_path / "adc.nii.gz")
    out = load_inputs(tmp_path / "dwi.nii.gz", tmp_path / "adc.nii.gz")
    assert np.array_equal(out.adc.data, adc)
    s = out.steps
    assert s["adc_to_dwi_grid"] == "reordered" and s["adc_resampled"] is False
    assert "reordered exactly, not interpolated" in s["adc_resample_reason"]
    assert out.warnings == []


@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize("axes,flips", [((0, 1, 2), (False, False, True)), ((2, 0, 1), (True, False, True)),
                                        ((1, 2, 0), (False, True, False))])
def test_resample_to_reorders_signed_permutations_exactly(axes, flips, order):
    data = np.random.default_rng(1).random((7, 6, 5, 2)).astype(np.float32)
    arr, aff2 = _reordered(data, OBLIQUE, (*axes, 3), (*flips, False))
    out = rs.resample_to(Image(arr, aff2), Image(np.zeros((7, 6, 5)), OBLIQUE), order=order)
    assert out.meta["resampled_from"]["method"] == "reordered"
    assert out.data.dtype == np.float32 and np.array_equal(out.data, data)


def test_resample_to_whole_voxel_shift_is_exact_and_subvoxel_interpolates():
    data = np.random.default_rng(2).random((8, 8, 8))
    src = Image(data, OBLIQUE)
    shifted = OBLIQUE.copy()
    shifted[:3, 3] += OBLIQUE[:3, :3] @ [2, -1, 0]  # reference starts 2 voxels further along i, 1 back along j
    out = rs.resample_to(src, Image(np.zeros((8, 8, 8)), shifted), fill=-1)
    assert out.meta["resampled_from"]["method"] == "reordered"
    assert np.array_equal(out.data[:6, 1:], data[2:, :7]) and np.all(out.data[6:] == -1) and np.all(out.data[:, 0] == -1)
    half = OBLIQUE.copy()
    half[:3, 3] += OBLIQUE[:3, :3] @ [0.5, 0, 0]
    assert rs.resample_to(src, Image(np.zeros((8, 8, 8)), half)).meta["resampled_from"]["method"] == "interpolated"
    assert rs.grid_permutation(src, Image(np.zeros((8, 8, 8)), half)) is None


# --- item 5 (15): messages -------------------------------------------------------------------------
def test_all_nan_adc_says_no_finite_values(tmp_path):
    shape = (12, 12, 8)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(Image(_vol(shape), aff).to_nifti(), tmp_path / "dwi.nii.gz")
    nib.save(Image(np.full(shape, np.nan, np.float32), aff).to_nifti(), tmp_path / "adc.nii.gz")
    with pytest.raises(InputError) as ei:
        ld.read_inputs(tmp_path / "dwi.nii.gz", tmp_path / "adc.nii.gz")
    assert ei.value.path == str(tmp_path / "adc.nii.gz")
    assert "no finite voxel values (all 1,152 voxels are NaN/inf)" in ei.value.problem
    assert "all voxels are 0" not in ei.value.problem


def test_zero_length_axis_says_so_with_the_real_shape(tmp_path):
    p = tmp_path / "adc.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((112, 0, 73), np.float32), np.eye(4)), p)
    err = _err(p, "adc")
    assert "axis of length 0" in err.problem and "112 x 0 x 73" in err.problem and "2D" not in err.problem
    with pytest.raises(InputError, match=r"axis of length 0 \(shape \(112, 0, 73\)\)"):
        vd.check_3d(Image(np.zeros((112, 0, 73)), np.eye(4), "x"), "adc")


def test_itk_messages_do_not_reach_stderr(tmp_path, capfd):
    p = tmp_path / "c.mha"  # MetaIO prints "Uncompress failed" on std::cerr for a bad zlib stream
    p.write_bytes(_meta_header("LOCAL", extra="CompressedData = True\nCompressedDataSize = 50\n").encode()
                  + np.random.default_rng(0).bytes(50))
    capfd.readouterr()
    img = rd.read_image(p, "dwi")
    out = capfd.readouterr()
    assert out.err == "" and out.out == ""
    assert any("Uncompress failed" in w for w in img.meta["read_warnings"])
    bad = tmp_path / "g.nrrd"  # a failing read: only our InputError, nothing printed
    bad.write_bytes(_nrrd_header(None).replace("raw", "gzip").encode() + np.random.default_rng(1).bytes(50))
    _err(bad)
    assert capfd.readouterr().err == ""
