"""read_image (NIfTI, MetaImage, DICOM series), b-values and the 4D DWI volume choice."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from deepisles.errors import InputError
from deepisles.io.image import Image
from deepisles.io.read import find_bvals, read_bvals_file, read_image, select_dwi_volume
from deepisles.preprocess.inputs import load_inputs

OBLIQUE = np.array(
    [
        [-1.9, 0.3, 0.2, 60.0],
        [0.25, 1.95, -0.3, -70.0],
        [0.15, 0.2, 3.4, -20.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _volume(shape=(12, 10, 8), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(1, 2000, size=shape).astype(np.int16)


def _orthonormal_affine(
    spacing=(1.5, 1.2, 3.0), origin=(40.0, -60.0, 10.0), angle=0.3, left_handed=False
) -> np.ndarray:
    """An oblique affine whose axes are orthogonal (DICOM slices can only be stacked that way)."""
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if left_handed:
        rot = np.diag([-1.0, 1.0, 1.0]) @ rot
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(spacing)
    aff[:3, 3] = origin
    return aff


# --- DICOM writing (pydicom, from scratch) ---------------------------------------------------------
def write_dicom_series(
    folder: Path,
    data: np.ndarray,
    affine: np.ndarray,
    *,
    description: str,
    image_type=("ORIGINAL", "PRIMARY", "M", "ND"),
    series_uid: str | None = None,
    study_uid: str = "1.2.826.0.1.3680043.8.498.1",
    bvalue: float | None = None,
    btag: str = "standard",
    prefix: str = "img",
    first_instance: int = 1,
    instance_step: int = 1,
) -> str:
    """One file per slice data[:, :, k] (int16), geometry from the RAS ``affine``."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    sx, sy = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    row, col = lps[:3, 0] / sx, lps[:3, 1] / sy
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = study_uid + ".9"
        ds.Modality = "MR"
        ds.PatientID = "TEST"
        ds.SeriesDescription = description
        ds.ImageType = list(image_type)
        ds.SeriesNumber = 1
        ds.InstanceNumber = first_instance + k * instance_step
        ds.ImagePositionPatient = [float(v) for v in (lps @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [float(v) for v in (*row, *col)]
        ds.PixelSpacing = [float(sy), float(sx)]
        ds.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(data[:, :, k].T.astype(np.int16)).tobytes()
        if bvalue is not None:
            if btag == "standard":
                ds.DiffusionBValue = float(bvalue)
            elif btag == "siemens":
                ds.Manufacturer = "SIEMENS"
                ds.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(
                    0x0C, "IS", str(int(bvalue))
                )
            elif btag == "ge":
                ds.Manufacturer = "GE MEDICAL SYSTEMS"
                ds.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(
                    0x39, "IS", [1000000000 + int(bvalue), 8, 0, 0]
                )
        ds.save_as(folder / f"{prefix}{k:03d}.dcm", enforce_file_format=True)
    return series_uid


# --- NIfTI / MetaImage -----------------------------------------------------------------------------
def test_nifti_and_mha_give_identical_images(tmp_path):
    data = np.random.default_rng(1).normal(100, 20, size=(9, 8, 7)).astype(np.float32)
    img = Image(data, OBLIQUE)
    nib.save(img.to_nifti(), tmp_path / "a.nii.gz")
    sitk.WriteImage(img.to_sitk(), str(tmp_path / "a.mha"))
    sitk.WriteImage(img.to_sitk(), str(tmp_path / "a.mhd"))
    a = read_image(tmp_path / "a.nii.gz", "dwi")
    b = read_image(tmp_path / "a.mha", "dwi")
    c = read_image(tmp_path / "a.mhd", "dwi")
    assert a.data.dtype == np.float32 and b.data.dtype == np.float32
    np.testing.assert_array_equal(a.data, data)
    np.testing.assert_array_equal(b.data, data)
    np.testing.assert_array_equal(c.data, data)
    # the NIfTI sform is stored as float32
    np.testing.assert_allclose(a.affine, OBLIQUE, atol=1e-5)
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-5)
    assert a.meta["format"] == "nifti" and b.meta["format"] == "metaimage"
    assert a.source == str(tmp_path / "a.nii.gz")


def test_sitk_round_trip_keeps_grid():
    img = Image(np.arange(60, dtype=np.float32).reshape(3, 4, 5), OBLIQUE)
    back = Image.from_sitk(img.to_sitk())
    np.testing.assert_array_equal(back.data, img.data)
    np.testing.assert_allclose(back.affine, img.affine, atol=1e-9)


def test_nifti_integer_data_becomes_float_and_records_dtype(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "adc.nii")
    img = read_image(tmp_path / "adc.nii", "adc")
    assert img.data.dtype == np.float32
    assert img.meta["original_dtype"] == "int16"
    np.testing.assert_array_equal(img.data, data)


def test_nifti_uses_sform(tmp_path):
    nimg = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), None)
    nimg.set_sform(OBLIQUE, code=2)
    nimg.set_qform(np.eye(4), code=0)
    nib.save(nimg, tmp_path / "x.nii.gz")
    np.testing.assert_allclose(read_image(tmp_path / "x.nii.gz", "dwi").affine, OBLIQUE, atol=1e-5)


def test_5d_singleton_nifti_is_squeezed_to_4d(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 1, 2), np.float32), np.eye(4)), tmp_path / "x.nii.gz")
    assert read_image(tmp_path / "x.nii.gz", "dwi").shape == (4, 4, 4, 2)


# --- bad files ---------------------------------------------------------------------------------------
def _write_good(tmp_path: Path) -> Path:
    p = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((16, 16, 16)).astype(np.float32), np.eye(4)), p)
    return p


def _assert_input_error(path: Path, role: str, *words: str) -> InputError:
    with pytest.raises(InputError) as ei:
        read_image(path, role)
    err = ei.value
    assert err.path == str(path)
    assert str(path) in str(err)
    assert "\n" not in str(err)
    for w in words:
        assert w in err.problem, err.problem
    return err


def test_missing_file(tmp_path):
    _assert_input_error(tmp_path / "nope.nii.gz", "dwi", "DWI file not found")


def test_truncated_gzip(tmp_path):
    good = _write_good(tmp_path)
    bad = tmp_path / "trunc.nii.gz"
    raw = good.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    _assert_input_error(bad, "adc", "ADC file", "not a readable NIfTI")


def test_truncated_uncompressed_nifti(tmp_path):
    p = tmp_path / "x.nii"
    nib.save(nib.Nifti1Image(np.ones((16, 16, 16), np.float32), np.eye(4)), p)
    p.write_bytes(p.read_bytes()[:1000])
    _assert_input_error(p, "dwi", "not a readable NIfTI")


def test_random_bytes_named_nifti(tmp_path):
    for name in ("junk.nii.gz", "junk.nii"):
        p = tmp_path / name
        p.write_bytes(np.random.default_rng(3).bytes(5000))
        _assert_input_error(p, "dwi", "DWI file", "not a readable NIfTI")


def test_gzip_of_garbage_named_nifti(tmp_path):
    p = tmp_path / "junk.nii.gz"
    p.write_bytes(gzip.compress(b"hello world" * 100))
    _assert_input_error(p, "flair", "FLAIR file")


def test_random_bytes_named_mha(tmp_path):
    p = tmp_path / "junk.mha"
    p.write_bytes(np.random.default_rng(4).bytes(3000))
    _assert_input_error(p, "adc", "ADC file", "not a readable image")


def test_truncated_mha(tmp_path):
    p = tmp_path / "x.mha"
    sitk.WriteImage(Image(np.ones((20, 20, 20), np.float32), np.eye(4)).to_sitk(), str(p))
    p.write_bytes(p.read_bytes()[:-5000])
    _assert_input_error(p, "adc", "not a readable image", "truncated")


def test_2d_mha_reads_and_is_rejected_by_check_3d(tmp_path):
    from deepisles.io.validate import check_3d

    p = tmp_path / "slice.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((5, 6), np.float32)), str(p))
    img = read_image(p, "dwi")
    assert img.shape == (6, 5)
    with pytest.raises(InputError, match="DWI image is 2D"):
        check_3d(img, "dwi")


def test_mhd_without_raw(tmp_path):
    img = Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    sitk.WriteImage(img.to_sitk(), str(tmp_path / "x.mhd"))
    (tmp_path / "x.raw").unlink()
    _assert_input_error(tmp_path / "x.mhd", "adc", "not a readable image")


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.nii.gz"
    p.write_bytes(b"")
    _assert_input_error(p, "dwi", "empty")


def test_unsupported_extension(tmp_path):
    p = tmp_path / "dwi.png"
    p.write_bytes(b"\x89PNG....")
    _assert_input_error(p, "dwi", "unsupported", ".png")


def test_empty_folder(tmp_path):
    d = tmp_path / "dicom"
    d.mkdir()
    _assert_input_error(d, "dwi", "DWI folder is empty")


def test_folder_without_dicom(tmp_path):
    d = tmp_path / "notdicom"
    d.mkdir()
    (d / "readme.txt").write_text("hello")
    _assert_input_error(d, "adc", "no DICOM")


def test_corrupt_dicom_file(tmp_path):
    p = tmp_path / "x.dcm"
    p.write_bytes(b"not dicom at all" * 20)
    _assert_input_error(p, "dwi", "not readable DICOM")


# --- DICOM -------------------------------------------------------------------------------------------
def test_dicom_series_matches_nifti(tmp_path):
    data = _volume()
    aff = _orthonormal_affine()
    write_dicom_series(tmp_path / "dwi", data, aff, description="ep2d_diff_trace", bvalue=1000)
    nib.save(Image(data, aff).to_nifti(), tmp_path / "dwi.nii.gz")
    d = read_image(tmp_path / "dwi", "dwi")
    n = read_image(tmp_path / "dwi.nii.gz", "dwi")
    assert d.meta["format"] == "dicom" and d.meta["original_dtype"] == "int16"
    assert d.meta["bvals"] == [1000.0]
    assert d.data.dtype == np.float32 and d.shape == data.shape
    np.testing.assert_array_equal(d.data, n.data)
    np.testing.assert_allclose(d.affine, n.affine, atol=1e-4)


def test_dicom_left_handed_grid_is_the_same_physical_image(tmp_path):
    """DICOM stacks slices along row x column; a left-handed NIfTI grid comes back with k reversed."""
    data = _volume()
    aff = _orthonormal_affine(left_handed=True)
    write_dicom_series(tmp_path / "dwi", data, aff, description="dwi")
    d = read_image(tmp_path / "dwi", "dwi")
    np.testing.assert_array_equal(d.data, data[:, :, ::-1])
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1, data.shape[2] - 1
    np.testing.assert_allclose(d.affine, aff @ flip, atol=1e-4)


def test_dicom_single_file_reads_its_series(tmp_path):
    data = _volume()
    write_dicom_series(tmp_path / "s", data, _orthonormal_affine(), description="t2_flair")
    img = read_image(tmp_path / "s" / "img003.dcm", "flair")
    np.testing.assert_array_equal(img.data, data)


def test_dicom_slices_in_shuffled_instance_order(tmp_path):
    data = _volume()
    # instance numbers run backwards: the slice order must come from the positions
    write_dicom_series(
        tmp_path / "s", data, _orthonormal_affine(), description="dwi", first_instance=100, instance_step=-1
    )
    np.testing.assert_array_equal(read_image(tmp_path / "s", "dwi").data, data)


def _two_series_folder(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    folder = tmp_path / "study"
    dwi, adc = _volume(seed=1), _volume(seed=2)
    aff = _orthonormal_affine()
    write_dicom_series(
        folder,
        dwi,
        aff,
        description="ep2d_diff_3scan_trace_p2",
        image_type=("DERIVED", "PRIMARY", "DIFFUSION", "TRACEW"),
        prefix="dwi",
    )
    write_dicom_series(
        folder,
        adc,
        aff,
        description="ep2d_diff_3scan_trace_p2_ADC",
        image_type=("DERIVED", "PRIMARY", "DIFFUSION", "ADC"),
        prefix="adc",
    )
    return folder, dwi, adc


def test_dicom_folder_with_two_series_picks_by_role(tmp_path):
    folder, dwi, adc = _two_series_folder(tmp_path)
    d = read_image(folder, "dwi")
    a = read_image(folder, "adc")
    np.testing.assert_array_equal(d.data, dwi)
    np.testing.assert_array_equal(a.data, adc)
    assert "ADC" in a.meta["series_description"] and d.meta["n_series_in_folder"] == 2


def test_dicom_folder_ambiguous_lists_series(tmp_path):
    folder, _, _ = _two_series_folder(tmp_path)
    err = _assert_input_error(folder, "flair", "FLAIR folder holds 2 DICOM series", "none matches")
    assert "ep2d_diff_3scan_trace_p2_ADC" in err.problem and "(8 files)" in err.problem
    # two DWI-looking series -> several match
    other = tmp_path / "two_dwi"
    aff = _orthonormal_affine()
    write_dicom_series(other, _volume(), aff, description="DWI b1000", prefix="a")
    write_dicom_series(other, _volume(), aff, description="DWI b1000 repeat", prefix="b")
    _assert_input_error(other, "dwi", "2 match")


def test_dicom_subfolders_are_scanned(tmp_path):
    folder = tmp_path / "export"
    data = _volume()
    write_dicom_series(folder / "series1", data, _orthonormal_affine(), description="t2_tirm_tra_dark-fluid")
    np.testing.assert_array_equal(read_image(folder, "flair").data, data)


@pytest.mark.parametrize("btag", ["standard", "siemens", "ge"])
def test_dicom_dwi_series_with_b0_and_b1000(tmp_path, btag):
    folder = tmp_path / "dwi"
    aff = _orthonormal_affine()
    b0, b1000 = _volume(seed=5), _volume(seed=6)
    uid = generate_uid()
    # one series, interleaved instance numbers: b0 slice k = 2k+1, b1000 slice k = 2k+2
    write_dicom_series(
        folder,
        b0,
        aff,
        description="ep2d_diff",
        series_uid=uid,
        bvalue=0,
        btag=btag,
        prefix="b0_",
        first_instance=1,
        instance_step=2,
    )
    write_dicom_series(
        folder,
        b1000,
        aff,
        description="ep2d_diff",
        series_uid=uid,
        bvalue=1000,
        btag=btag,
        prefix="b1000_",
        first_instance=2,
        instance_step=2,
    )
    img = read_image(folder, "dwi")
    assert img.shape == (*b0.shape, 2)
    assert img.meta["bvals"] == [0.0, 1000.0]
    vol, warnings = select_dwi_volume(img, img.meta["bvals"])
    assert warnings == []
    np.testing.assert_array_equal(vol.data, b1000)
    assert vol.meta["dwi_volume"]["chosen"] == [1]


def test_load_inputs_from_dicom_study(tmp_path):
    folder = tmp_path / "study"
    aff = _orthonormal_affine()
    uid = generate_uid()
    b0, b1000 = _volume(seed=5), _volume(seed=6)
    adc = np.random.default_rng(7).integers(600, 1200, size=b0.shape).astype(np.int16)  # 10^-6 mm^2/s
    write_dicom_series(folder, b0, aff, description="ep2d_diff", series_uid=uid, bvalue=0, prefix="b0_")
    write_dicom_series(
        folder,
        b1000,
        aff,
        description="ep2d_diff",
        series_uid=uid,
        bvalue=1000,
        prefix="b1_",
        first_instance=50,
    )
    write_dicom_series(
        folder, adc, aff, description="ep2d_diff_ADC", image_type=("DERIVED", "ADC"), prefix="adc"
    )
    out = load_inputs(folder, folder)  # one folder, two roles: allowed (different series)
    np.testing.assert_array_equal(out.dwi.data, b1000)
    assert out.steps["dwi_volume"]["bvals_source"] == "DICOM tags"
    assert out.steps["adc_unit"]["unit_detected"] == "1e-6 mm2/s"
    np.testing.assert_allclose(out.adc.data, adc * 1e-3, rtol=1e-6)
    assert out.steps["adc_resampled"] is False


def test_pydicom_reads_back_private_bvalue(tmp_path):
    from deepisles.io.dicom import bvalue_of

    write_dicom_series(
        tmp_path / "s", _volume(shape=(4, 4, 2)), np.eye(4), description="x", bvalue=1000, btag="ge"
    )
    ds = pydicom.dcmread(tmp_path / "s" / "img000.dcm")
    assert bvalue_of(ds) == 1000.0


# --- b-values and 4D DWI -----------------------------------------------------------------------------
def _dwi4d(n: int) -> Image:
    data = np.stack([np.full((4, 4, 4), float(10 * (t + 1)), np.float32) for t in range(n)], axis=-1)
    return Image(data, np.eye(4), "/x/dwi.nii.gz")


def test_find_bvals_bval_file(tmp_path):
    p = tmp_path / "sub_dwi.nii.gz"
    p.write_bytes(b"")
    assert find_bvals(p) is None
    (tmp_path / "sub_dwi.bval").write_text("0 1000\n")
    assert find_bvals(p) == [0.0, 1000.0]


def test_find_bvals_json_sidecar(tmp_path):
    p = tmp_path / "dwi.mha"
    (tmp_path / "dwi.json").write_text(json.dumps({"bvals": [0, 500, 1000]}))
    assert find_bvals(p) == [0.0, 500.0, 1000.0]
    (tmp_path / "dwi.json").write_text(json.dumps({"RepetitionTime": 3}))
    assert find_bvals(p) is None


def test_read_bvals_file_errors(tmp_path):
    p = tmp_path / "x.bval"
    p.write_text("0 abc")
    with pytest.raises(InputError, match="not a list of numbers"):
        read_bvals_file(p)
    with pytest.raises(InputError, match="not found"):
        read_bvals_file(tmp_path / "missing.bval")


def test_select_3d_passes_through():
    img = Image(np.ones((3, 3, 3)), np.eye(4))
    assert select_dwi_volume(img, None) == (img, [])


def test_select_single_volume():
    out, warn = select_dwi_volume(_dwi4d(1), None)
    assert out.shape == (4, 4, 4) and warn == []


def test_select_two_volumes_with_bvals_takes_b1000_wherever_it_is():
    out, warn = select_dwi_volume(_dwi4d(2), [1000, 0])
    assert warn == [] and out.data[0, 0, 0] == 10
    assert out.meta["dwi_volume"]["bvalue"] == 1000


def test_select_two_volumes_without_bvals_takes_last_with_warning():
    out, warn = select_dwi_volume(_dwi4d(2), None)
    assert out.data[0, 0, 0] == 20
    assert len(warn) == 1 and "last volume" in warn[0]


def test_select_many_volumes_without_bvals_fails():
    with pytest.raises(InputError, match="4D with 5 volumes and no b-values") as ei:
        select_dwi_volume(_dwi4d(5), None)
    assert ei.value.path == "/x/dwi.nii.gz"


def test_select_many_volumes_averages_those_closest_to_1000():
    out, warn = select_dwi_volume(_dwi4d(5), [0, 995, 1000, 1005, 2000])
    assert warn == []
    assert out.data[0, 0, 0] == pytest.approx((20 + 30 + 40) / 3)
    assert out.meta["dwi_volume"]["chosen"] == [1, 2, 3]


def test_select_far_bvalue_warns_and_b0_only_fails():
    out, warn = select_dwi_volume(_dwi4d(2), [0, 3000])
    assert out.data[0, 0, 0] == 20 and "no b~1000" in warn[0]
    with pytest.raises(InputError, match="no diffusion-weighted volume"):
        select_dwi_volume(_dwi4d(2), [0, 5])
    with pytest.raises(InputError, match="2 volumes but 3 b-values"):
        select_dwi_volume(_dwi4d(2), [0, 1000, 1000])
