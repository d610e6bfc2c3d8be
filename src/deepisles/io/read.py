"""Reading input images (NIfTI, MetaImage, NRRD, DICOM series) and choosing the b~1000 volume of a 4D DWI.

:func:`read_image` returns an :class:`Image` whose data is float32 (float64 stays float64), with
``meta = {format, original_dtype, source_files, ...}`` (DICOM adds the series and ``bvals`` when the tags give
them). Every problem with the file itself (missing, unreadable, corrupt, unsupported type, empty folder) raises
:class:`InputError` with the path and a one-line problem starting with the role ("DWI file ...").

Safety rules, all checked on the header before any voxel data is read:

* **Detached headers.** ``.mhd`` / ``.mha`` (``ElementDataFile``) and ``.nhdr`` / ``.nrrd`` (``data file``) are
  parsed here before SimpleITK sees them (at most :data:`HEADER_LIMIT` bytes). A data file they name must be a
  regular file in the header's own folder, named plainly: no ``/``, ``\\`` or ``:``, not ``..`` or ``-``, no
  ``LIST`` or ``%d`` pattern, and a symbolic link must not lead out of the folder. ``ElementDataFile = LOCAL``
  and NRRD data attached after the header are fine. SimpleITK is then forced to use the MetaImage / NRRD reader
  (no other ImageIO gets to guess). :func:`image_files` lists the files whose bytes make up an image.
* **Declared size.** No axis of length 0 and at most ``max_voxels`` voxels (all volumes and components,
  default :data:`DEFAULT_MAX_VOXELS`): NIfTI from ``dim``, MetaImage/NRRD from ITK's header-only read, DICOM from
  rows x columns x frames of the chosen files. Uncompressed voxel data shorter than declared is refused as
  truncated (gzip NIfTI: counted by streaming through the file, in bounded memory).
* **NIfTI voxel sizes.** Those that define the grid (the sform's columns when ``sform_code > 0``, else
  ``pixdim[1:4]``) must be finite, non-zero and within 1e-4..1e3 mm; nibabel would silently use 1 mm for 0.
* **Quiet readers.** Log records of nibabel/pydicom, Python warnings and what ITK/MetaIO/GDCM print on stderr
  are captured (:func:`~deepisles.io.dicom.collect_reader_notes`): after a successful read they become
  ``meta['read_warnings']`` (role and file first); when the read fails, the InputError is the only message.

4D DWI volume choice (:func:`select_dwi_volume`):

* one volume -> it;
* b-values known (``bval_path`` of :func:`~deepisles.io.load.load_inputs`, else a ``.bval`` file or JSON
  sidecar next to the image, else the DICOM tags): among the diffusion-weighted volumes (b >= 100 s/mm^2),
  the one whose b is closest to 1000 s/mm^2; all volumes within 20 s/mm^2 of that b (e.g. three directions
  at b=1000) are averaged (arithmetic mean). A warning when that b is outside 500..2000; an InputError when
  every volume has b < 100 (no diffusion weighting) or the number of b-values differs from the volumes;
* no b-values and 2 volumes -> the last one (b0 then b1000 is the usual order), with a warning;
* no b-values and more than 2 volumes -> InputError (we will not guess).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import stat
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from deepisles.errors import InputError
from deepisles.io.dicom import (
    collect_reader_notes,
    dicom_files,
    read_dicom,
    reader_output_captured,
    sitk_problem,
)
from deepisles.io.image import Image
from deepisles.io.validate import (
    DEFAULT_MAX_VOXELS,
    check_declared_size,
    check_voxel_sizes,
    role_label,
)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
DICOM_SUFFIXES = (".dcm", ".ima", ".dicom")
SUPPORTED = ".nii, .nii.gz, .mha, .mhd, .nrrd or a DICOM series folder"

#: bytes of a MetaImage / NRRD header that are parsed; a longer header is refused
HEADER_LIMIT = 64 * 1024
#: reader messages (deduplicated) kept as warnings after a successful read
MAX_READER_NOTES = 3

TARGET_B = 1000.0
B_SAME = 20.0  # s/mm^2: volumes whose b differs less than this from the chosen b are averaged
BVAL_JSON_KEYS = ("bvals", "bval", "BValues", "bvalues", "b_values", "DiffusionBValue", "DiffusionBValues")


def _short(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    msg = lines[-1] if lines else ""
    msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return msg[:160]


def _suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def stem(path: Path) -> Path:
    """``/a/b/x.nii.gz`` -> ``/a/b/x`` (the path without its image suffix)."""
    path = Path(path)
    suf = _suffix(path)
    return path.with_name(path.name[: len(path.name) - len(suf)]) if suf else path


def read_image(path: str | Path, role: str, max_voxels: int | None = DEFAULT_MAX_VOXELS) -> Image:
    """Read one input image. ``role`` is 'dwi' | 'adc' | 'flair' | 'mask' (used in messages).

    ``max_voxels``: refuse a file whose header declares more voxels than this (all volumes; checked before its
    data is read; None means :data:`DEFAULT_MAX_VOXELS`). The safety rules are in the module docstring.
    """
    path = Path(path)
    label = role_label(role)
    limit = DEFAULT_MAX_VOXELS if max_voxels is None else int(max_voxels)
    if not path.exists():
        raise InputError(path, f"{label} file not found")
    with collect_reader_notes() as notes:
        if path.is_dir():
            img = read_dicom(path, role, max_voxels=limit)
        else:
            suf = _suffix(path)
            if path.stat().st_size == 0:
                raise InputError(path, f"{label} file is empty (0 bytes)")
            if suf in NIFTI_SUFFIXES:
                img = _read_nifti(path, label, limit)
            elif suf in SITK_SUFFIXES:
                img = _read_sitk(path, label, limit)
            elif suf in DICOM_SUFFIXES or _is_dicom_file(path):
                img = read_dicom(path, role, max_voxels=limit)
            else:
                raise InputError(
                    path, f"{label} file has an unsupported type '{suf or path.name}' (expected {SUPPORTED})"
                )
    if notes:
        img.meta["read_warnings"] = [
            *img.meta.get("read_warnings", []),
            *(f"{label} {path}: message from the image reader: {n}" for n in _dedupe(notes)),
        ]
    img.source = str(path)
    return img


def _dedupe(notes: list[str]) -> list[str]:
    seen: list[str] = []
    for n in notes:
        n = " ".join(str(n).split())[:300]
        if n and n not in seen:
            seen.append(n)
    if len(seen) > MAX_READER_NOTES:
        return [*seen[:MAX_READER_NOTES], f"(and {len(seen) - MAX_READER_NOTES} more)"]
    return seen


def image_files(path: str | Path, role: str | None = None, *, dicom_series: bool = False) -> list[Path]:
    """Every file whose bytes make up the image at ``path`` (for hashing inputs, and so that no output
    overwrites an input). No voxel data is read.

    * a detached MetaImage / NRRD header -> ``[header, data file]`` (the data file as the header names it,
      next to the header). The reference is checked by the rules of the module docstring: an invalid one
      raises :class:`InputError`, as :func:`read_image` would;
    * ``.mha`` with ``ElementDataFile = LOCAL``, ``.nrrd`` with attached data, NIfTI and anything else ->
      ``[path]``;
    * a DICOM folder -> every regular file under it, sorted (what the DICOM reader looks at); with
      ``dicom_series=True`` only the files of the series that ``role`` reads (sorted; tags are read);
    * a single DICOM file -> the files of its series in its folder (sorted; what the reader uses).

    ``role`` ('dwi', 'adc', ...) starts the messages ("DWI header ..."; "image" without it). A path that does
    not exist raises :class:`InputError`.
    """
    path = Path(path)
    label = role_label(role) if role else "image"
    if not path.exists():
        raise InputError(path, f"{label} file not found")
    with collect_reader_notes():
        if path.is_dir():
            return dicom_files(path, (role or "image") if dicom_series else None)
        suf = _suffix(path)
        if suf in SITK_SUFFIXES and path.stat().st_size > 0:
            head = _parse_header(path, label)
            return [path] if head.data_file is None else [path, head.data_file]
        if suf not in NIFTI_SUFFIXES and (suf in DICOM_SUFFIXES or _is_dicom_file(path)):
            return dicom_files(path, role or "image")
    return [path]


def _as_float(data: np.ndarray) -> np.ndarray:
    return data if data.dtype == np.float64 else data.astype(np.float32)


def _squeeze_beyond_4d(data: np.ndarray) -> np.ndarray:
    """NIfTI 5D with singleton axes (x, y, z, 1, n) -> (x, y, z, n); leaves 3D/4D alone."""
    while data.ndim > 4:
        singles = [ax for ax in range(3, data.ndim) if data.shape[ax] == 1]
        if not singles:
            break
        data = np.squeeze(data, axis=singles[0])
    return data


def _dims(shape) -> str:
    return " x ".join(str(int(s)) for s in shape)


# --- NIfTI ----------------------------------------------------------------------------------------------
@dataclass
class _NiftiHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int  # first byte of the voxel data
    sform_code: int
    qform_code: int
    pixdim: np.ndarray
    srow: np.ndarray  # 3 x 4


def _nifti_header(path: Path, label: str) -> _NiftiHeader:
    """The raw NIfTI-1/2 header fields, as stored (nibabel's fixes not applied)."""
    bad = f"{label} file is not a readable NIfTI image"
    opener = gzip.open if _suffix(path) == ".nii.gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read(540)
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(path, f"{bad} ({_short(e)})") from None
    if len(raw) < 348:
        raise InputError(path, f"{bad} (header truncated: {len(raw)} of 348 bytes)")
    for endian in "<>":
        sizeof_hdr = struct.unpack(endian + "i", raw[:4])[0]
        if sizeof_hdr in (348, 540):
            break
    else:
        raise InputError(path, f"{bad} (sizeof_hdr is {sizeof_hdr}; expected 348 or 540)")
    hdr_dtype = (nib.nifti1.header_dtype if sizeof_hdr == 348 else nib.nifti2.header_dtype).newbyteorder(endian)
    if len(raw) < hdr_dtype.itemsize:
        raise InputError(path, f"{bad} (header truncated: {len(raw)} of {hdr_dtype.itemsize} bytes)")
    h = np.frombuffer(raw[: hdr_dtype.itemsize], dtype=hdr_dtype)[0]
    dim = [int(d) for d in h["dim"]]
    if not 1 <= dim[0] <= 7:
        raise InputError(path, f"{bad} (dim[0] = {dim[0]}; expected 1..7)")
    try:
        dtype = np.dtype(nib.nifti1.data_type_codes.dtype[int(h["datatype"])])
    except KeyError:
        raise InputError(path, f"{bad} (unknown voxel type code {int(h['datatype'])})") from None
    vox_offset = float(h["vox_offset"])
    if not np.isfinite(vox_offset) or vox_offset < 0:
        raise InputError(path, f"{bad} (invalid vox_offset {vox_offset:g})")
    return _NiftiHeader(
        shape=tuple(dim[1 : dim[0] + 1]),
        dtype=dtype,
        offset=max(int(vox_offset), sizeof_hdr + 4),
        sform_code=int(h["sform_code"]),
        qform_code=int(h["qform_code"]),
        pixdim=np.array(h["pixdim"], dtype=np.float64),
        srow=np.array([h["srow_x"], h["srow_y"], h["srow_z"]], dtype=np.float64),
    )


def _gzip_bytes_at_least(path: Path, need: int, label: str) -> int:
    """Decompressed bytes of a gzip file, counted by streaming until ``need`` (bounded memory)."""
    total = 0
    try:
        with gzip.open(path, "rb") as fh:
            while total < need:
                chunk = fh.read(min(1 << 20, need - total))
                if not chunk:
                    break
                total += len(chunk)
    except EOFError:  # the stream stops early: truncated
        pass
    except (OSError, zlib.error) as e:
        raise InputError(path, f"{label} file is not a readable NIfTI image ({_short(e)})") from None
    return total


def _check_nifti_header(path: Path, label: str, h: _NiftiHeader, max_voxels: int) -> None:
    n = check_declared_size(path, label, h.shape, max_voxels, itemsize=h.dtype.itemsize)
    n_sp = min(len(h.shape), 3)
    if h.sform_code > 0:
        if not np.all(np.isfinite(h.srow)):
            raise InputError(path, f"{label} file has a non-finite sform (voxel-to-world matrix)")
        sizes = np.linalg.norm(h.srow[:, :3], axis=0)[:n_sp]
        check_voxel_sizes(path, label, sizes, f"sform columns, sform_code {h.sform_code}")
    else:
        where = f"qform_code {h.qform_code}" if h.qform_code > 0 else "no sform/qform"
        check_voxel_sizes(path, label, h.pixdim[1 : 1 + n_sp], f"header pixdim[1:{1 + n_sp}], {where}")
    need = h.offset + n * h.dtype.itemsize
    gz = _suffix(path) == ".nii.gz"
    have = _gzip_bytes_at_least(path, need, label) if gz else path.stat().st_size
    if have < need:
        where = "decompressed, the file holds" if gz else "the file holds"
        raise InputError(
            path,
            f"{label} file is not a readable NIfTI image (truncated: its header declares {_dims(h.shape)} "
            f"{h.dtype} voxels = {n * h.dtype.itemsize:,} bytes from byte {h.offset}; {where} only "
            f"{max(have - h.offset, 0):,})",
        )


def _read_nifti(path: Path, label: str, max_voxels: int = DEFAULT_MAX_VOXELS) -> Image:
    h = _nifti_header(path, label)
    _check_nifti_header(path, label, h, max_voxels)
    try:
        nimg = nib.load(str(path))
        if not isinstance(nimg, nib.Nifti1Image | nib.Nifti2Image):
            raise InputError(path, f"{label} file is not a NIfTI image ({type(nimg).__name__})")
        original = nimg.get_data_dtype()
        data = np.asarray(nimg.dataobj)
        if data.dtype.fields is not None:
            raise InputError(
                path, f"{label} file holds RGB/structured voxels ({original}); expected greyscale"
            )
        if np.issubdtype(data.dtype, np.complexfloating):
            raise InputError(path, f"{label} file holds complex voxels; expected real values")
        affine = nimg.affine
        sform, qform = int(nimg.header["sform_code"]), int(nimg.header["qform_code"])
        zooms = [float(z) for z in nimg.header.get_zooms()[:3]]
    except InputError:
        raise
    except Exception as e:  # any parser failure on a user file is the file's fault (corrupt, truncated...)
        raise InputError(path, f"{label} file is not a readable NIfTI image ({_short(e)})") from None
    meta = {"format": "nifti", "original_dtype": str(original), "sform_code": sform, "qform_code": qform,
            "zooms": zooms, "source_files": [str(path)]}
    if sform == 0 and qform == 0:
        meta["read_warnings"] = [
            f"{label} {path}: NIfTI header has no orientation (sform and qform codes 0); using voxel sizes only"
        ]
    return Image(_as_float(_squeeze_beyond_4d(data)), affine, str(path), meta)


# --- MetaImage / NRRD headers ------------------------------------------------------------------------
@dataclass
class _Header:
    fmt: str  # "metaimage" | "nrrd"
    fields: dict[str, str] = field(default_factory=dict)  # MetaImage: exact keys; NRRD: lower case, no spaces
    data_file: Path | None = None  # detached voxel data (checked), None when they follow the header
    data_offset: int | None = None  # where attached voxel data start in the header file, when known


_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # control bytes other than tab (line ends removed first)
_NRRD_LINE_END = re.compile(rb"\r\n|\r|\n")


def _head_bytes(path: Path, label: str) -> tuple[bytes, bool]:
    """The first HEADER_LIMIT bytes and whether the file is longer."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(HEADER_LIMIT + 1)
    except OSError as e:
        raise InputError(path, f"{label} file cannot be read ({_short(e)})") from None
    return raw[:HEADER_LIMIT], len(raw) > HEADER_LIMIT


def _parse_header(path: Path, label: str) -> _Header:
    suf = _suffix(path)
    return _parse_metaimage(path, label) if suf in (".mha", ".mhd") else _parse_nrrd(path, label)


def _parse_metaimage(path: Path, label: str) -> _Header:
    """``Key = Value`` lines up to ``ElementDataFile`` (MetaIO stops there; for ``LOCAL`` the voxels follow).

    Stricter than MetaIO so that we never read a header differently from it: every non-blank line must hold
    ``=`` or ``:`` and no control byte (MetaIO would read a value across lines, or cut a key at a NUL).
    """
    bad = f"{label} file is not a readable image (MetaImage header"
    raw, more = _head_bytes(path, label)
    head = _Header("metaimage")
    pos, line_no = 0, 0
    while pos < len(raw):
        nl = raw.find(b"\n", pos)
        if nl < 0 and more:
            break
        end = len(raw) if nl < 0 else nl + 1
        line = raw[pos : end].rstrip(b"\n")
        line = line[:-1] if line.endswith(b"\r") else line
        pos, line_no = end, line_no + 1
        if not line.strip(b" \t"):
            continue
        if _CONTROL.search(line):
            raise InputError(path, f"{bad} line {line_no} holds binary/control characters)")
        text = line.decode("latin-1")
        sep = re.search(r"[=:]", text)
        if sep is None:
            raise InputError(path, f"{bad} line {line_no} has no '=': {text[:60]!r})")
        key = text[: sep.start()].strip(" \t")
        head.fields[key] = text[sep.start() :].lstrip(" \t=:").rstrip(" \t")
        if key == "ElementDataFile":
            value = head.fields[key]
            if value.upper() != "LOCAL":
                head.data_file = _check_data_file(path, label, value, "ElementDataFile")
            else:
                head.data_offset = end
            return head
    where = f" in its first {HEADER_LIMIT // 1024} KiB" if more else ""
    raise InputError(path, f"{bad} has no ElementDataFile field{where})")


def _parse_nrrd(path: Path, label: str) -> _Header:
    """NRRD header lines (``\\n``, ``\\r\\n`` or ``\\r`` ends, as teem reads them) up to the first blank line.

    A field is what comes before the first ``": "`` (teem's rule, so a ``:=`` later in the line does not hide a
    ``data file`` field); ``data file``/``datafile`` in any case or spacing is the data file.
    """
    bad = f"{label} file is not a readable image (NRRD header"
    raw, more = _head_bytes(path, label)
    if not raw.startswith(b"NRRD000"):
        raise InputError(path, f"{label} file is not a readable image (no NRRD magic line 'NRRD000x')")
    head = _Header("nrrd")
    first = _NRRD_LINE_END.search(raw)
    pos, line_no, data_file = (first.end() if first else len(raw)), 1, None
    while pos < len(raw):
        m = _NRRD_LINE_END.search(raw, pos)
        if m is None or (more and m.end() == len(raw)):
            if more:
                raise InputError(path, f"{bad} is longer than {HEADER_LIMIT // 1024} KiB)")
            line, end = raw[pos:], len(raw)  # the last line of a detached header
        else:
            line, end = raw[pos : m.start()], m.end()
        line_no += 1
        if not line:
            head.data_offset = end  # a blank line ends the header; attached voxel data follow
            break
        if _CONTROL.search(line):
            raise InputError(path, f"{bad} line {line_no} holds binary/control characters)")
        text = line.decode("latin-1")
        if not text.startswith("#"):
            cut = text.find(": ")
            key, value = (text[:cut], text[cut + 2 :]) if cut >= 0 else (text.partition(":")[0], text.partition(":")[2])
            norm = re.sub(r"[\s_-]+", "", key).lower()
            if norm == "datafile":
                data_file = value.lstrip(" \t")
            elif cut >= 0 and ":=" not in key:
                head.fields.setdefault(norm, value.strip())
        pos = end
    if data_file is not None:
        if data_file != data_file.rstrip():
            _refuse_data_file(path, label, data_file, "data file", "with trailing spaces")
        head.data_file = _check_data_file(path, label, data_file, "data file")
        head.data_offset = None
    return head


def _refuse_data_file(path: Path, label: str, value: str, field_name: str, why: str) -> None:
    shown = value if len(value) <= 120 else value[:117] + "..."
    raise InputError(
        path,
        f"{label} header ({field_name}) names the data file '{shown}' {why}; a detached header may only name "
        "a regular file in its own folder, by its plain file name",
    )


def _check_data_file(path: Path, label: str, value: str, field_name: str) -> Path:
    """The detached data file named by a header, if it is a plain name of a regular file next to the header."""
    def refuse(why: str) -> None:
        _refuse_data_file(path, label, value, field_name, why)

    if not value:
        refuse("as an empty name")
    if value.upper().startswith("LIST"):
        refuse("as a LIST of files")
    if "%" in value:
        refuse("as a numbered file pattern")
    if value.startswith(("/", "\\")) or value[1:2] == ":":
        refuse("by an absolute path")
    if ".." in re.split(r"[/\\]", value):
        refuse("in a parent folder ('..')")
    if any(c in value for c in "/\\:"):
        refuse("in another folder")
    if value in (".", "-"):
        refuse("as '.' or '-' (standard input)")
    if len(value) > 255:
        refuse("(the name is too long)")
    folder = path.parent
    cand = folder / value
    try:
        st = os.stat(cand)
    except OSError:
        if os.path.lexists(cand):  # a dangling symbolic link
            refuse("through a symbolic link to nothing")
        raise InputError(
            path, f"{label} file is not a readable image: its header ({field_name}) names the data file "
            f"'{value}', which does not exist in the header's folder",
        ) from None
    real = os.path.realpath(cand)
    if os.path.dirname(real) != os.path.realpath(folder):
        refuse(f"through a symbolic link that leads out of the header's folder (to {real})")
    if not stat.S_ISREG(st.st_mode):
        refuse("which is not a regular file")
    return cand


def _itemsize(pixel_id: int) -> int:
    """Bytes of one pixel component of a SimpleITK pixel type ('32-bit float' -> 4, complex -> twice)."""
    text = sitk.GetPixelIDValueAsString(pixel_id)
    m = re.search(r"(\d+)-bit", text)
    size = int(m.group(1)) // 8 if m else 1
    return 2 * size if "complex" in text else size


def _attached_bytes(path: Path, head: _Header) -> int | None:
    """Bytes of voxel data present for an uncompressed MetaImage / NRRD, None when we cannot tell."""
    if head.fmt == "metaimage":
        f = head.fields
        if f.get("CompressedData", "False").strip().lower() in ("true", "1") or "HeaderSize" in f:
            return None
    else:
        f = head.fields
        if f.get("encoding", "").lower() != "raw" or "byteskip" in f or "lineskip" in f:
            return None
    if head.data_file is not None:
        return head.data_file.stat().st_size
    if head.data_offset is None:
        return None
    return path.stat().st_size - head.data_offset


def _read_sitk(path: Path, label: str, max_voxels: int = DEFAULT_MAX_VOXELS) -> Image:
    head = _parse_header(path, label)
    fmt = head.fmt
    reader = sitk.ImageFileReader()
    reader.SetImageIO("MetaImageIO" if fmt == "metaimage" else "NrrdImageIO")
    reader.SetFileName(str(path))
    try:
        with reader_output_captured():
            reader.ReadImageInformation()  # header only: sizes, type, geometry
    except RuntimeError as e:
        raise InputError(path, f"{label} file is not a readable image ({sitk_problem(e)})") from None
    size = tuple(int(s) for s in reader.GetSize())
    ncomp = int(reader.GetNumberOfComponents())
    itemsize = _itemsize(reader.GetPixelID())
    shape = size + ((ncomp,) if ncomp > 1 else ())
    n = check_declared_size(path, label, shape, max_voxels, itemsize=itemsize)
    have = _attached_bytes(path, head)
    need = n * itemsize
    if have is not None and have < need:
        where = f"the data file {head.data_file.name} holds" if head.data_file is not None else "the file holds"
        raise InputError(
            path,
            f"{label} file is not a readable image (truncated: its header declares {_dims(shape)} voxels of "
            f"{itemsize} bytes = {need:,} bytes; {where} only {max(have, 0):,})",
        )
    try:
        with reader_output_captured():
            simg = reader.Execute()
    except RuntimeError as e:
        raise InputError(path, f"{label} file is not a readable image ({sitk_problem(e)})") from None
    original = sitk.GetArrayViewFromImage(simg).dtype
    dim = simg.GetDimension()
    if dim == 2:
        arr = sitk.GetArrayFromImage(simg)
        data = arr.T if arr.ndim == 2 else None
        if data is None:
            raise InputError(
                path, f"{label} file is a 2D multi-component image; expected a 3D greyscale image"
            )
        aff = np.eye(4)
        aff[:2, :2] = (
            np.diag([-1.0, -1.0]) @ np.array(simg.GetDirection()).reshape(2, 2) @ np.diag(simg.GetSpacing())
        )
        aff[:2, 3] = -np.array(simg.GetOrigin())
        img = Image(data, aff, str(path))
    elif dim in (3, 4):
        img = Image.from_sitk(simg, str(path))
    else:
        raise InputError(path, f"{label} file is {dim}D; expected a 3D image")
    files = [str(path)] + ([str(head.data_file)] if head.data_file is not None else [])
    meta = {"format": fmt, "original_dtype": str(original), "zooms": [float(v) for v in simg.GetSpacing()[:3]],
            "source_files": files}
    if simg.GetNumberOfComponentsPerPixel() != 1:
        meta["components"] = simg.GetNumberOfComponentsPerPixel()
    return Image(_as_float(np.asarray(img.data)), img.affine, str(path), meta)


# --- b-values & 4D DWI ------------------------------------------------------------------------------
def read_bvals_file(path: str | Path) -> list[float]:
    """b-values from an FSL ``.bval`` text file (whitespace separated) or a JSON sidecar."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "b-value file not found")
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"b-value file cannot be read ({_short(e)})") from None
    if path.suffix.lower() == ".json":
        vals = _bvals_from_json(text, path)
        if vals is None:
            raise InputError(path, f"JSON file has no b-value list (keys tried: {', '.join(BVAL_JSON_KEYS)})")
        return vals
    try:
        vals = [float(t) for t in text.split()]
    except ValueError:
        raise InputError(path, "b-value file is not a list of numbers") from None
    if not vals or not all(np.isfinite(vals)):
        raise InputError(path, "b-value file holds no (finite) numbers")
    return vals


def _bvals_from_json(text: str, path: Path) -> list[float] | None:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(path, f"JSON sidecar is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(obj, dict):
        return None
    for key in BVAL_JSON_KEYS:
        if key in obj:
            v = obj[key]
            v = v if isinstance(v, list) else [v]
            try:
                vals = [float(x) for x in v]
            except (TypeError, ValueError):
                raise InputError(path, f"JSON key '{key}' is not a list of numbers") from None
            return vals or None
    return None


def find_bvals(path: str | Path) -> list[float] | None:
    """b-values for an image file: ``<stem>.bval`` next to it, else a ``<stem>.json`` sidecar with a b-value
    list (keys: bvals, bval, BValues, b_values, DiffusionBValue, ...), else None. Folders (DICOM) -> None
    (their b-values come from the tags, see ``Image.meta['bvals']``)."""
    path = Path(path)
    if path.is_dir():
        return None
    base = stem(path)
    for suf in (".bval", ".bvals"):
        cand = base.with_name(base.name + suf)
        if cand.is_file():
            return read_bvals_file(cand)
    cand = base.with_name(base.name + ".json")
    if cand.is_file():
        try:
            return _bvals_from_json(cand.read_text(encoding="utf-8"), cand)
        except (OSError, UnicodeDecodeError):
            return None
    return None


def select_dwi_volume(img: Image, bvals: list[float] | None) -> tuple[Image, list[str]]:
    """Reduce a 4D DWI to its b~1000 volume (rules in the module docstring); 3D images pass through.

    The result's ``meta['dwi_volume']`` records ``{n_volumes, bvals, chosen, bvalue, rule}``.
    """
    data = np.asarray(img.data)
    path = img.source or None
    if data.ndim != 4:
        return img, []
    n = data.shape[3]
    if n == 1:
        info = {
            "n_volumes": 1,
            "bvals": bvals,
            "chosen": [0],
            "bvalue": bvals[0] if bvals else None,
            "rule": "single volume",
        }
        return Image(data[..., 0], img.affine.copy(), img.source, {**img.meta, "dwi_volume": info}), []
    warnings: list[str] = []
    if bvals is not None:
        bv = np.asarray(bvals, dtype=np.float64).ravel()
        if bv.size != n:
            raise InputError(path, f"DWI file has {n} volumes but {bv.size} b-values were given")
        if np.all(bv < 100):
            raise InputError(
                path, f"DWI file has no diffusion-weighted volume (b-values {bv.tolist()}); expected b~1000"
            )
        weighted = bv[bv >= 100]  # b0 volumes are never the answer, even when "closer" to 1000 than b3000
        best = weighted[np.argmin(np.abs(weighted - TARGET_B))]
        chosen = [int(i) for i in np.flatnonzero(np.abs(bv - best) <= B_SAME)]
        vol = data[..., chosen].mean(axis=-1) if len(chosen) > 1 else data[..., chosen[0]]
        bvalue = float(bv[chosen].mean())
        rule = "b closest to 1000" + (f" (mean of {len(chosen)} volumes)" if len(chosen) > 1 else "")
        if not 500 <= bvalue <= 2000:
            warnings.append(
                f"DWI {img.source}: no b~1000 volume (b-values {bv.tolist()}); using b={bvalue:g}"
            )
        info = {"n_volumes": n, "bvals": bv.tolist(), "chosen": chosen, "bvalue": bvalue, "rule": rule}
    elif n == 2:
        vol = data[..., 1]
        warnings.append(
            f"DWI {img.source}: 4D with 2 volumes and no b-values (no .bval file next to it); "
            "assumed the last volume is b~1000"
        )
        info = {
            "n_volumes": n,
            "bvals": None,
            "chosen": [1],
            "bvalue": None,
            "rule": "last of 2 (no b-values)",
        }
    else:
        raise InputError(
            path,
            f"DWI file is 4D with {n} volumes and no b-values; give a .bval file (same name, next to it, or "
            "--bval) or a 3D b~1000 image",
        )
    vol = np.asarray(vol, dtype=data.dtype if data.dtype == np.float64 else np.float32)
    return Image(vol, img.affine.copy(), img.source, {**img.meta, "dwi_volume": info}), warnings
