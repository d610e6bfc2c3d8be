"""DICOM SEG output: real ISLES'22 case as a PACS-style DICOM study -> segment -> SEG -> back to the mask."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from deepisles.errors import DeepIslesError
from deepisles.io.image import Image
from deepisles.io.read import read_image, select_dwi_volume
from deepisles.outputs.dicom_seg import SEG_FILENAME, write_dicom_seg, write_result_seg

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS
STUDY = "1.2.826.0.1.3680043.8.498.77"


def write_series(
    folder: Path,
    volumes: list[tuple[np.ndarray, float | None]],
    affine: np.ndarray,
    *,
    description: str,
    image_type: tuple[str, ...],
    series_number: int,
    slope: float = 1.0,
    intercept: float = 0.0,
    dtype=np.int16,
) -> list[list[str]]:
    """Classical single-frame MR: one file per slice ``vol[:, :, k]`` (pixel rows = j, columns = i), all
    ``volumes`` (b-value or None) in ONE series with interleaved instance numbers, geometry from the RAS
    ``affine`` (orthogonal axes), stored = round((value - intercept) / slope). Returns SOP UIDs per volume."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid, lps = generate_uid(), LPS @ affine
    sx, sy, sz = np.linalg.norm(lps[:3, :3], axis=0)
    row, col = lps[:3, 0] / sx, lps[:3, 1] / sy
    uids: list[list[str]] = []
    for v, (vol, bvalue) in enumerate(volumes):
        uids.append([])
        for k in range(vol.shape[2]):
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = MRImageStorage
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = STUDY, series_uid, STUDY + ".1"
            ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Stroke", "STROKE01", "", "O"
            ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", ""
            ds.ReferringPhysicianName, ds.Manufacturer = "", "SIEMENS"
            ds.Modality, ds.SeriesDescription, ds.ImageType = "MR", description, list(image_type)
            ds.SeriesNumber, ds.InstanceNumber = series_number, 1 + k * len(volumes) + v
            ds.ImagePositionPatient = [float(x) for x in (lps @ [0, 0, k, 1])[:3]]
            ds.ImageOrientationPatient = [float(x) for x in (*row, *col)]
            ds.PixelSpacing, ds.SliceThickness = [float(sy), float(sx)], float(sz)
            ds.Rows, ds.Columns = vol.shape[1], vol.shape[0]
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            signed = np.issubdtype(dtype, np.signedinteger)
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, int(signed)
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
            stored = np.rint((vol[:, :, k].T - intercept) / slope).astype(dtype)
            ds.PixelData = np.ascontiguousarray(stored).tobytes()
            if bvalue is not None:
                ds.DiffusionBValue = float(bvalue)
            ds.save_as(folder / f"s{series_number}_{ds.InstanceNumber:04d}.dcm", enforce_file_format=True)
            uids[-1].append(ds.SOPInstanceUID)
    return uids


def orthonormal(affine: np.ndarray) -> np.ndarray:
    """Nearest affine with orthogonal axes (same spacing, origin, handedness): what a scanner writes."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    u, _, vt = np.linalg.svd(affine[:3, :3] / spacing)
    out = affine.copy()
    out[:3, :3] = (u @ vt) @ np.diag(spacing)
    return out


def rotated(shape_spacing=(1.5, 1.2, 3.0), angle=0.2, left_handed=False) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if left_handed:
        rot = rot @ np.diag([1.0, 1.0, -1.0])
    aff = np.eye(4)
    aff[:3, :3], aff[:3, 3] = rot @ np.diag(shape_spacing), (30.0, -40.0, 12.0)
    return aff


def resample_exact(arr: np.ndarray, aff_from: np.ndarray, aff_to: np.ndarray, shape) -> np.ndarray:
    """``arr`` (grid ``aff_from``) onto grid ``aff_to`` when the two grids share voxel centres."""
    m = np.linalg.inv(aff_to) @ aff_from
    ijk = np.indices(arr.shape).reshape(3, -1).astype(np.float64)
    dst = m[:3, :3] @ ijk + m[:3, 3:]
    idx = np.rint(dst).astype(int)
    assert np.abs(dst - idx).max() < 0.05, "grids do not share voxel centres"
    assert all((idx[a] >= 0).all() and (idx[a] < shape[a]).all() for a in range(3))
    out = np.zeros(shape, dtype=arr.dtype)
    out[idx[0], idx[1], idx[2]] = arr.ravel()
    return out


def seg_to_grid(seg: hd.seg.Segmentation, affine: np.ndarray, shape) -> np.ndarray:
    """The SEG's volume (from its frames' plane positions) on the RAS grid (affine, shape), physically."""
    vol = seg.get_volume(segment_numbers=[1], combine_segments=True, dtype=np.uint8)
    return resample_exact(np.asarray(vol.array), LPS @ vol.affine, affine, shape)


def seg_by_source(seg, uids: list[str], affine_written: np.ndarray, affine: np.ndarray, shape) -> np.ndarray:
    """The SEG read frame by frame through the referenced source instances: frame of source slice k is
    written ``vol[:, :, k].T`` on ``affine_written``; returned on the grid (affine, shape)."""
    px = seg.get_pixels_by_source_instance(uids, segment_numbers=[1], assert_missing_frames_are_empty=True)
    vol = np.ascontiguousarray(px[..., 0].transpose(2, 1, 0)).astype(np.uint8)  # (k, row, col) -> (i, j, k)
    return resample_exact(vol, affine_written, affine, shape)


# --- the real case -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_study(isles22_case, tmp_path_factory):
    """PACS-style export of the real case: DWI series (b0 + b1000) and ADC series (10^-6 mm^2/s) in one folder."""
    dwi_nii, adc_nii = nib.load(isles22_case["dwi"]), nib.load(isles22_case["adc"])
    aff = orthonormal(dwi_nii.affine)
    dwi = np.asarray(dwi_nii.dataobj, dtype=np.float64)
    adc = np.asarray(adc_nii.dataobj, dtype=np.float64) * 1000.0
    folder = tmp_path_factory.mktemp("pacs") / "study"
    dwi_uids = write_series(
        folder, [(2.0 * dwi, 0.0), (dwi, 1000.0)], aff, description="ep2d_diff_3scan_trace_p2",
        image_type=("ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW"), series_number=5,
        slope=0.1, intercept=-20.0, dtype=np.uint16,
    )
    write_series(
        folder, [(adc, None)], aff, description="ep2d_diff_3scan_trace_p2_ADC",
        image_type=("DERIVED", "PRIMARY", "DIFFUSION", "ADC"), series_number=6,
    )
    return {"folder": folder, "affine": aff, "dwi": dwi, "b1000_uids": dwi_uids[1], "b0_uids": dwi_uids[0]}


def test_real_case_dicom_study_to_seg_round_trip(real_study, tmp_path):
    from deepisles.api import segment

    folder = real_study["folder"]
    res = segment(folder, folder, outdir=tmp_path / "out", members="classical", device="cpu", preview=False)
    assert res.report["preprocessing"]["dwi_volume"]["bvalue"] == 1000.0
    mask_nii = nib.load(tmp_path / "out" / "lesion_mask.nii.gz")
    mask = np.asarray(mask_nii.dataobj)
    assert mask.any()
    from deepisles.io.load import read_inputs

    # the DICOM DWI read back is the real b1000 volume, on the grid the series was written from (up to the
    # 0.1 storage step; k runs the other way: the NIfTI grid is left-handed, DICOM stacks along row x column)
    dwi_img = read_inputs(folder, folder).dwi
    assert dwi_img.same_grid(res.mask)
    np.testing.assert_allclose(
        resample_exact(dwi_img.data, dwi_img.affine, real_study["affine"], dwi_img.shape),
        real_study["dwi"], atol=0.051,
    )

    out = write_dicom_seg(res.mask, dwi_img, tmp_path / "out" / "lesion_seg.dcm", algorithm_version="9.9")
    seg = hd.seg.segread(out)
    # every frame references a b1000 instance (never a b0 one) and sits at that instance's position
    refs = [
        f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for f in seg.PerFrameFunctionalGroupsSequence
    ]
    assert set(refs) <= set(real_study["b1000_uids"]) and len(set(refs)) == len(refs) == seg.NumberOfFrames
    assert seg.NumberOfFrames == int(np.count_nonzero(mask.any(axis=(0, 1))))  # empty slices omitted
    by_uid = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(p, stop_before_pixels=True)
                                                 for p in folder.iterdir())}
    for f, uid in zip(seg.PerFrameFunctionalGroupsSequence, refs, strict=True):
        np.testing.assert_allclose(
            [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in by_uid[uid].ImagePositionPatient], atol=1e-4,
        )
    # the mask, reconstructed two independent ways, equals lesion_mask.nii.gz voxel by voxel
    recon_pos = seg_to_grid(seg, mask_nii.affine, mask.shape)
    recon_src = seg_by_source(seg, real_study["b1000_uids"], real_study["affine"], mask_nii.affine, mask.shape)
    assert np.array_equal(recon_pos, mask) and np.array_equal(recon_src, mask)
    # header content
    assert seg.StudyInstanceUID == STUDY and seg.PatientID == "STROKE01" and seg.Modality == "SEG"
    assert seg.SegmentationType == "BINARY" and seg.ContentQualification == "RESEARCH"
    sd = seg.SegmentSequence[0]
    assert sd.SegmentLabel == "Ischemic stroke lesion" and sd.SegmentAlgorithmType == "AUTOMATIC"
    assert sd.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert sd.SegmentedPropertyTypeCodeSequence[0].CodeValue == "55641003"
    alg = sd.SegmentationAlgorithmIdentificationSequence[0]
    assert alg.AlgorithmName == "deepisles" and alg.AlgorithmVersion == "9.9"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == by_uid[refs[0]].SeriesInstanceUID


# --- synthetic, oblique --------------------------------------------------------------------------
def _synthetic(tmp_path: Path, left_handed: bool, b0: bool):
    rng = np.random.default_rng(3)
    shape = (14, 11, 9)
    aff = rotated(left_handed=left_handed)
    vol = rng.uniform(100, 1000, size=shape)
    vols = [(vol * 2, 0.0), (vol, 1000.0)] if b0 else [(vol, 1000.0)]
    uids = write_series(tmp_path / "dwi", vols, aff, description="DWI", image_type=("ORIGINAL", "PRIMARY"),
                        series_number=3)
    img, _ = select_dwi_volume(read_image(tmp_path / "dwi", "dwi"), [b for _, b in vols])
    mask_written = np.zeros(shape, np.uint8)
    mask_written[3:9, 2:7, 2:5] = rng.integers(0, 2, size=(6, 5, 3))
    mask_written[0, 0, 0] = 1  # a corner voxel: off-by-one mapping would lose it
    mask_img = img.with_data(resample_exact(mask_written, aff, img.affine, img.shape))
    return aff, uids[-1], img, mask_img, mask_written


@pytest.mark.parametrize(("left_handed", "b0"), [(False, False), (True, True)])
def test_oblique_synthetic_round_trip(tmp_path, left_handed, b0):
    aff, uids, img, mask_img, mask_written = _synthetic(tmp_path, left_handed, b0)
    out = write_dicom_seg(mask_img, img, tmp_path / "seg" / "x.dcm", algorithm_version="1.0")
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.dcm"]  # no temp file left behind
    seg = hd.seg.segread(out)
    assert np.array_equal(seg_to_grid(seg, img.affine, img.shape), mask_img.data)
    assert np.array_equal(seg_by_source(seg, uids, aff, aff, mask_written.shape), mask_written)


def test_empty_mask_gives_seg_with_all_frames_empty(tmp_path):
    _, uids, img, mask_img, _ = _synthetic(tmp_path, False, False)
    empty = mask_img.with_data(np.zeros(mask_img.shape, np.uint8))
    seg = hd.seg.segread(write_result_seg(empty, img, tmp_path / "out", members=["classical"]))
    assert seg.NumberOfFrames == len(uids) == img.shape[2]
    px = seg.get_pixels_by_source_instance(uids, segment_numbers=[1])
    assert px.shape == (img.shape[2], img.shape[1], img.shape[0], 1) and not px.any()
    params = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    assert "classical" in params and (tmp_path / "out" / SEG_FILENAME).is_file()


def test_non_dicom_dwi_is_refused(tmp_path):
    img = Image(np.ones((4, 4, 4), np.float32), np.eye(4), str(tmp_path / "dwi.nii.gz"), {"format": "nifti"})
    with pytest.raises(DeepIslesError, match="needs a DICOM DWI input"):
        write_dicom_seg(img.with_data(np.zeros((4, 4, 4), np.uint8)), img, tmp_path / "s.dcm",
                        algorithm_version="1")
    assert not (tmp_path / "s.dcm").exists()


def test_mask_off_the_dwi_grid_is_refused(tmp_path):
    _, _, img, mask_img, _ = _synthetic(tmp_path, False, False)
    shifted = Image(mask_img.data, img.affine.copy(), img.source, img.meta)
    shifted.affine[:3, 3] += 0.7  # mm
    with pytest.raises(DeepIslesError, match="not on the DWI grid"):
        write_dicom_seg(shifted, img, tmp_path / "s.dcm", algorithm_version="1")
    # same grid claimed but the DWI geometry changed underneath: caught per source instance
    moved = Image(img.data, shifted.affine, img.source, img.meta)
    with pytest.raises(DeepIslesError, match="voxel off|outside the mask grid"):
        write_dicom_seg(shifted, moved, tmp_path / "s.dcm", algorithm_version="1")


def test_cli_output_type_dicom_seg(real_study, tmp_path):
    """`segment --output-type dicom-seg` on DICOM input writes lesion_seg.dcm next to the NIfTI mask, equal to it."""
    import json

    from typer.testing import CliRunner

    from deepisles.cli import app

    folder, out = real_study["folder"], tmp_path / "cli"
    res = CliRunner().invoke(app, ["segment", "--dwi", str(folder), "--adc", str(folder), "-o", str(out),
                                   "--members", "classical", "--device", "cpu", "--no-preview", "--no-html",
                                   "--output-type", "dicom-seg"])  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["outputs"]["dicom_seg"] == "lesion_seg.dcm" and "report.html" not in report["outputs"]
    mask_nii = nib.load(out / "lesion_mask.nii.gz")
    seg = hd.seg.segread(out / "lesion_seg.dcm")
    assert np.array_equal(seg_to_grid(seg, mask_nii.affine, mask_nii.shape), np.asarray(mask_nii.dataobj))


def test_cli_dicom_seg_of_nifti_input_fails_before_writing(isles22_case, tmp_path):
    from typer.testing import CliRunner

    from deepisles.cli import app

    out = tmp_path / "x"
    res = CliRunner().invoke(app, ["segment", "--dwi", str(isles22_case["dwi"]), "--adc", str(isles22_case["adc"]),
                                   "-o", str(out), "--members", "classical", "--output-type", "dicom-seg"])  # fmt: skip
    assert res.exit_code == 2 and "DICOM" in res.output
    assert not out.exists() or not any(out.iterdir())
