"""DICOM SEG output: the lesion mask as a binary DICOM Segmentation referencing the source DWI series.

Entry points (the lead wires them into ``write_outputs`` / ``--output-type dicom-seg``)::

    require_dicom_dwi(dwi: Image) -> list[str]
        # the DWI source files (slice order); DeepIslesError when the DWI was not read from DICOM.
        # Cheap: call it right after read_inputs() to fail before the members run.
    write_result_seg(mask: Image, dwi: Image, outdir: Path, *, members: Sequence[str] = ()) -> Path
        # writes outdir / SEG_FILENAME ("lesion_seg.dcm") with algorithm version = deepisles.__version__
    write_dicom_seg(mask: Image, dwi: Image, out_path: Path, *, algorithm_version: str,
                    description: str = DEFAULT_DESCRIPTION, parameters: dict[str, str] | None = None) -> Path

``mask`` is on the DWI grid (``mask.same_grid(dwi)``); ``dwi`` is the DWI ``Image`` returned by
:func:`deepisles.io.load.read_inputs` (its ``meta['dicom_files']`` comes from :mod:`deepisles.io.dicom`).

How frames are placed: every source instance of the DWI volume that was segmented (the b~1000 volume of a
b0+b1000 series) becomes one SEG frame. Its pixel ``(row r, column c)`` lies at
``IPP + c * PixelSpacing[1] * IOP[:3] + r * PixelSpacing[0] * IOP[3:]`` (LPS mm); that point is mapped into the
mask's voxel grid through the (RAS) affine and must land on a voxel centre (within
:data:`GRID_TOLERANCE` voxel) inside the grid, else nothing is written. No assumption is made about the
array's axis order, flips or slice order: each frame is sampled from the mask at its own source geometry,
and highdicom copies that geometry (plane position, orientation, pixel spacing) and the source
SOP Instance UID into the frame. An empty mask gives a valid SEG whose frames are all empty (one per source
slice), so "no lesion" is explicit in the PACS.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deepisles.errors import DeepIslesError
from deepisles.io.image import RAS_FROM_LPS, Image

SEG_FILENAME = "lesion_seg.dcm"
SEGMENT_LABEL = "Ischemic stroke lesion"
DEFAULT_DESCRIPTION = "deepisles stroke lesion (research use only)"
GRID_TOLERANCE = 0.05  # voxel: how far a source pixel centre may sit from a mask voxel centre


def require_dicom_dwi(dwi: Image) -> list[str]:
    """The source files (slice order) of the DWI volume that was segmented; DeepIslesError if not DICOM."""
    volumes = dwi.meta.get("dicom_files")
    if dwi.meta.get("format") != "dicom" or not volumes:
        what = dwi.meta.get("format", "non-DICOM")
        raise DeepIslesError(
            f"DICOM SEG output needs a DICOM DWI input (a series folder); the DWI {dwi.source or ''} was read "
            f"as {what}. Use the NIfTI outputs, or give the DWI as a DICOM series"
        )
    if len(volumes) == 1:
        return list(volumes[0])
    chosen = (dwi.meta.get("dwi_volume") or {}).get("chosen")
    if not chosen:
        raise DeepIslesError(
            f"DICOM SEG output: the DWI series {dwi.source} holds {len(volumes)} volumes and none was chosen"
        )
    return list(volumes[int(chosen[0])])


def _read_sources(files: Sequence[str]) -> list:
    import pydicom

    out = []
    for f in files:
        try:
            out.append(pydicom.dcmread(f, stop_before_pixels=True))
        except Exception as e:  # moved, deleted or changed since it was read
            raise DeepIslesError(f"{f}: DWI DICOM file cannot be read again for the SEG ({e})") from None
        ds = out[-1]
        if int(ds.get("NumberOfFrames", 1) or 1) > 1 or "ImagePositionPatient" not in ds:
            raise DeepIslesError(
                f"{f}: DICOM SEG output supports DWI series of single-frame images (one file per slice, "
                "with ImagePositionPatient); this one is multi-frame or has no slice position"
            )
    return out


def _frame(mask: np.ndarray, affine_inv: np.ndarray, ds) -> np.ndarray:
    """The mask sampled on the pixel centres of one source instance, as a (Rows, Columns) array."""
    iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    pixel_to_lps = np.eye(4)
    pixel_to_lps[:3, 0] = iop[:3] * col_spacing  # along a row: column index c
    pixel_to_lps[:3, 1] = iop[3:] * row_spacing  # down a column: row index r
    pixel_to_lps[:3, 3] = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
    m = affine_inv @ RAS_FROM_LPS @ pixel_to_lps
    cols, rows = np.meshgrid(np.arange(int(ds.Columns)), np.arange(int(ds.Rows)))
    ijk = m[:3, :1, None] * cols + m[:3, 1:2, None] * rows + m[:3, 3:4, None]  # (3, Rows, Columns)
    idx = np.rint(ijk).astype(np.int64)
    off = float(np.abs(ijk - idx).max())
    inside = all((idx[a] >= 0).all() and (idx[a] < mask.shape[a]).all() for a in range(3))
    if off > GRID_TOLERANCE or not inside:
        where = "outside the mask grid" if not inside else f"{off:.2f} voxel off the mask voxel centres"
        raise DeepIslesError(
            f"DICOM SEG output: source instance {ds.SOPInstanceUID} lies {where}; the mask is not on the grid "
            "of the DWI series"
        )
    return mask[idx[0], idx[1], idx[2]]


def write_dicom_seg(
    mask: Image,
    dwi: Image,
    out_path: Path,
    *,
    algorithm_version: str,
    description: str = DEFAULT_DESCRIPTION,
    parameters: dict[str, str] | None = None,
) -> Path:
    """Write ``mask`` (0/1 on the DWI grid) as a binary DICOM SEG referencing the DWI source instances.

    One segment, "Ischemic stroke lesion": category SCT 49755003 "Morphologically abnormal structure", type
    SCT 55641003 "Infarct", anatomic region SCT 12738006 "Brain", algorithm type AUTOMATIC, algorithm
    "deepisles" ``algorithm_version`` (family DCM 123110 "Artificial Intelligence", optional ``parameters``).
    Patient/study come from the source series; ContentQualification RESEARCH; ``description`` is the
    SeriesDescription. Written atomically. DeepIslesError when the DWI is not DICOM or the grids disagree.
    """
    import highdicom as hd
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    from deepisles.io.write import write_with_atomic

    files = require_dicom_dwi(dwi)
    if not mask.same_grid(dwi):
        raise DeepIslesError("DICOM SEG output: the mask is not on the DWI grid (shape or affine differ)")
    data = np.asarray(mask.data)
    if data.ndim != 3:
        raise DeepIslesError(f"DICOM SEG output: the mask is {data.ndim}D; expected 3D")
    binary = data > 0
    sources = _read_sources(files)
    affine_inv = np.linalg.inv(mask.affine)
    frames = np.stack([_frame(binary, affine_inv, ds) for ds in sources])

    algorithm = hd.AlgorithmIdentificationSequence(
        name="deepisles",
        family=codes.cid7162.ArtificialIntelligence,
        version=algorithm_version,
        parameters=parameters or None,
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=CodedConcept("55641003", "SCT", "Infarct"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=[codes.SCT.Brain],
        display_color=hd.color.CIELabColor.from_string("red"),
    )
    src_series = sources[0].get("SeriesNumber")
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment],
            series_instance_uid=hd.UID(),
            series_number=1000 + int(src_series or 0),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="deepisles",
            manufacturer_model_name="deepisles",
            software_versions=algorithm_version,
            device_serial_number="none",
            content_label="LESION",
            content_description=description[:64],
            series_description=description[:64],
            content_qualification=hd.ContentQualificationValues.RESEARCH,
            omit_empty_frames=bool(binary.any()),  # an empty mask keeps every (empty) frame, explicitly
        )
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise DeepIslesError(f"DICOM SEG output: cannot build the SEG from the DWI series {dwi.source} ({e})") from None
    return write_with_atomic(Path(out_path), lambda tmp: seg.save_as(tmp, enforce_file_format=True))


def write_result_seg(mask: Image, dwi: Image, outdir: Path, *, members: Sequence[str] = ()) -> Path:
    """``outdir / SEG_FILENAME`` for ``write_outputs``: the ensemble mask, algorithm version = deepisles."""
    from deepisles import __version__

    params = {"members": ",".join(members)} if members else None
    return write_dicom_seg(mask, dwi, Path(outdir) / SEG_FILENAME, algorithm_version=__version__, parameters=params)
