"""DICOM series reading, pure Python: pydicom for the tags, SimpleITK (its bundled GDCM) for the pixels.

Rules
-----
* **Which files.** Every file under the folder (recursively) that pydicom reads as DICOM; other files are
  ignored. Files are grouped by SeriesInstanceUID.
* **Which series.** One series -> that one. Several -> the role's keywords are matched against
  SeriesDescription, ProtocolName and ImageType (upper case, see :data:`ROLE_KEYWORDS`):
  ``dwi``: DWI / TRACE(W) / B1000 / DIFF(USION) and *not* ADC / Apparent / FA / eADC / EXP;
  ``adc``: ADC / Apparent; ``flair``: FLAIR / dark-fluid / TIRM; ``mask``: SEG / MASK / LABEL.
  Exactly one matching series is used; none or several -> :class:`InputError` listing every series as
  ``UID 'description' (N files)``.
* **b-values.** Per file: DiffusionBValue (0018,9087), else the vendor private tags Siemens (0019,100C),
  GE (0043,1039, first value, minus the 10^9 GE sometimes adds) or Philips (2001,1003). Files whose
  b-values lie within 20 s/mm^2 of each other form one volume. A series with several b-values (e.g. b0 and
  b1000 in one series) is split into one volume per b-value, stacked as a 4D image (ascending b) with
  ``meta['bvals']``; :func:`deepisles.io.read.select_dwi_volume` then picks b~1000. If the volumes do not
  share a grid, the DWI role keeps only the volume closest to b=1000.
* **Slice order.** Within a volume, slices are sorted by their position along the slice normal
  (ImagePositionPatient . (row x column cosines)); two images at one position in one volume (several
  diffusion directions, echoes...) are refused: export the trace/one-echo series instead.
* **Size.** Before any pixel is read, rows x columns x frames summed over the chosen files must stay within
  ``max_voxels`` (:data:`~deepisles.io.validate.DEFAULT_MAX_VOXELS`); the pixels are read by GDCM only (no other
  ITK ImageIO gets to guess).
* **Source files.** ``meta['dicom_files']`` lists, per volume (one list for a 3D image, one per b-value
  volume of a 4D one, in the order of the 4th axis), the file paths in slice order (``data[:, :, k]`` is
  file ``k``). :mod:`deepisles.outputs.dicom_seg` uses them to reference the source instances.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from deepisles.errors import InputError
from deepisles.io.image import Image
from deepisles.io.validate import DEFAULT_MAX_VOXELS, check_declared_size, role_label

#: role -> (include tokens/substrings, exclude tokens)
ROLE_KEYWORDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "dwi": (
        ("DWI", "TRACE", "TRACEW", "B1000", "DIFF", "DIFFUSION"),
        ("ADC", "APPARENT", "FA", "EADC", "EXP"),
    ),
    "adc": (("ADC", "APPARENT"), ("EADC",)),
    "flair": (("FLAIR", "DARK-FLUID", "DARKFLUID", "TIRM"), ()),
    "mask": (("SEG", "MASK", "LABEL", "SEGMENTATION"), ()),
}

B_TOLERANCE = 20.0  # s/mm^2: b-values closer than this are one volume


@dataclass
class _File:
    path: Path
    series_uid: str
    description: str
    protocol: str
    image_type: tuple[str, ...]
    modality: str
    position: float | None
    bvalue: float | None
    instance: int
    rows: int = 0
    columns: int = 0
    frames: int = 1


@dataclass
class DicomSeries:
    uid: str
    description: str
    files: list[_File] = field(default_factory=list)

    @property
    def text(self) -> str:
        f = self.files[0]
        return " ".join([f.description, f.protocol, "\\".join(f.image_type), f.modality]).upper()

    def summary(self) -> str:
        return f"{self.uid} '{self.description}' ({len(self.files)} files)"


# --- tags -------------------------------------------------------------------------------------------
def _num(value) -> float | None:
    """First number of a DICOM value (str, number, multi-value, or raw bytes of an UN element)."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        raw = bytes(value)
        txt = raw.rstrip(b"\x00 ").decode("ascii", errors="ignore")
        if txt and re.fullmatch(r"[\s0-9+\-.eE\\]+", txt):
            value = txt
        elif len(raw) == 8:
            return float(struct.unpack("<d", raw)[0])
        elif len(raw) == 4:
            return float(struct.unpack("<f", raw)[0])
        else:
            return None
    if isinstance(value, str):
        parts = [p for p in value.replace("\\", " ").split() if p]
        if not parts:
            return None
        try:
            return float(parts[0])
        except ValueError:
            return None
    if isinstance(value, list | tuple) or hasattr(value, "__getitem__") and not isinstance(value, str):
        try:
            return _num(value[0]) if len(value) else None
        except (TypeError, IndexError):
            return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _private(ds, group: int, elem: int, creator_word: str, manufacturer: str) -> float | None:
    if (group, elem) not in ds:
        return None
    creator = ds.get((group, 0x0010))
    creator_txt = str(creator.value).upper() if creator is not None else ""
    if creator_word not in creator_txt and creator_word not in manufacturer:
        return None
    return _num(ds[(group, elem)].value)


def bvalue_of(ds) -> float | None:
    """b-value of one DICOM dataset (standard tag, then Siemens / GE / Philips private tags)."""
    if (0x0018, 0x9087) in ds:
        b = _num(ds[(0x0018, 0x9087)].value)
        if b is not None:
            return b
    manufacturer = str(ds.get("Manufacturer", "")).upper()
    b = _private(ds, 0x0019, 0x100C, "SIEMENS", manufacturer)
    if b is not None:
        return b
    b = _private(ds, 0x0043, 0x1039, "GE", manufacturer)
    if b is not None:
        return b % 1e9 if b >= 1e9 else b
    return _private(ds, 0x2001, 0x1003, "PHILIPS", manufacturer)


def _scan(folder: Path) -> tuple[list[_File], int]:
    """All DICOM image files under ``folder`` (recursive) and the number of files looked at."""
    found: list[_File] = []
    n_files = 0
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            p = Path(root) / name
            n_files += 1
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=True)
            except Exception:  # not DICOM (or unreadable): not part of any series
                continue
            if "Rows" not in ds:
                continue  # DICOMDIR, structured reports... no pixels
            found.append(_file_record(p, ds))
    return found, n_files


def _int_tag(ds, name: str, default: int = 0) -> int:
    try:
        v = ds.get(name, default)
        return int(v if v not in (None, "") else default)
    except (TypeError, ValueError):
        return default


def _file_record(p: Path, ds) -> _File:
    pos = None
    ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if ipp is not None and iop is not None and len(ipp) == 3 and len(iop) == 6:
        row, col = np.array(iop[:3], dtype=float), np.array(iop[3:], dtype=float)
        pos = float(np.dot(np.array(ipp, dtype=float), np.cross(row, col)))
    itype = ds.get("ImageType", ())
    itype = tuple(str(t) for t in itype) if not isinstance(itype, str) else (itype,)
    inst = ds.get("InstanceNumber", 0)
    try:
        inst = int(inst or 0)
    except (TypeError, ValueError):
        inst = 0
    return _File(
        rows=_int_tag(ds, "Rows"),
        columns=_int_tag(ds, "Columns"),
        frames=max(_int_tag(ds, "NumberOfFrames", 1), 1),
        path=p,
        series_uid=str(ds.get("SeriesInstanceUID", "(no SeriesInstanceUID)")),
        description=str(ds.get("SeriesDescription", "") or ""),
        protocol=str(ds.get("ProtocolName", "") or ""),
        image_type=itype,
        modality=str(ds.get("Modality", "") or ""),
        position=pos,
        bvalue=bvalue_of(ds),
        instance=inst,
    )


def role_matches(series: DicomSeries, role: str) -> bool:
    include, exclude = ROLE_KEYWORDS.get(role, ((), ()))
    text = series.text
    tokens = set(re.split(r"[^A-Z0-9]+", text))
    squashed = re.sub(r"[^A-Z0-9]", "", text)
    if any(t in tokens for t in exclude):
        return False
    if role == "mask" and series.files[0].modality.upper() == "SEG":
        return True
    for word in include:
        if word in tokens or (len(word) >= 4 and word.replace("-", "") in squashed):
            return True
    return False


# --- reading ----------------------------------------------------------------------------------------
def _group_bvalues(files: list[_File]) -> list[tuple[float | None, list[_File]]]:
    known = sorted({f.bvalue for f in files if f.bvalue is not None})
    if not known:
        return [(None, files)]
    centres: list[list[float]] = []
    for b in known:
        if centres and b - centres[-1][-1] <= B_TOLERANCE:
            centres[-1].append(b)
        else:
            centres.append([b])
    groups: list[tuple[float | None, list[_File]]] = []
    for c in centres:
        members = [f for f in files if f.bvalue is not None and c[0] - 1e-6 <= f.bvalue <= c[-1] + 1e-6]
        groups.append((float(np.median([f.bvalue for f in members])), members))
    unknown = [f for f in files if f.bvalue is None]
    if unknown:
        groups.append((None, unknown))
    return groups


def _read_volume(files: list[_File], path: Path, label: str, what: str) -> Image:
    if len(files) > 1 and all(f.position is not None for f in files):
        files = sorted(files, key=lambda f: (f.position, f.instance))
        positions = np.array([f.position for f in files])
        n_unique = len(np.unique(np.round(positions, 3)))
        if n_unique != len(files):
            raise InputError(
                path,
                f"{label} DICOM {what} has {len(files)} images at only {n_unique} slice positions "
                "(several volumes/directions in one series?); export one volume per series (e.g. the trace)",
            )
    else:
        files = sorted(files, key=lambda f: f.instance)
    names = [str(f.path) for f in files]
    try:
        with reader_output_captured():
            if len(names) == 1:
                simg = sitk.ReadImage(names[0], imageIO="GDCMImageIO")
            else:
                reader = sitk.ImageSeriesReader()
                reader.SetImageIO("GDCMImageIO")
                reader.SetFileNames(names)
                simg = reader.Execute()
    except RuntimeError as e:
        raise InputError(path, f"{label} DICOM {what} cannot be read ({sitk_problem(e)})") from None
    if simg.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(path, f"{label} DICOM {what} is not a greyscale image")
    if simg.GetDimension() == 2:
        simg = sitk.JoinSeries([simg])
    img = Image.from_sitk(simg, str(path))
    img.meta["dicom_files"] = [names]
    return img


# --- quiet readers ----------------------------------------------------------------------------------
_NOTE_SINKS: list[list[str]] = []  # innermost collect_reader_notes() list last
_QUIET_LOCK = threading.RLock()
_READER_LOGGERS = ("nibabel.global", "nibabel", "pydicom")
#: terminal control sequences: a line holding one comes from a progress display of another thread, not a reader
_ANSI = re.compile(r"\x1b[\[\]()][0-9;?]*[A-Za-z]?|\x1b")


class _Swallow(logging.Filter):
    def __init__(self, sink: list[str]):
        super().__init__()
        self.sink = sink

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            self.sink.append(record.getMessage())
        except Exception:  # a malformed log call must not break a read
            pass
        return False


@contextlib.contextmanager
def collect_reader_notes() -> Iterator[list[str]]:
    """Collect instead of print what the image libraries say while the block reads an image.

    nibabel / pydicom log records and Python warnings (not DeprecationWarnings) raised in the block, and what
    :func:`reader_output_captured` blocks inside it capture from ITK / MetaIO / GDCM, go to the yielded list
    (complete when the block ends). Nothing of it reaches stderr; the caller decides what to keep.
    """
    notes: list[str] = []
    with _QUIET_LOCK:
        swallow = _Swallow(notes)
        loggers = [logging.getLogger(n) for n in _READER_LOGGERS]
        for lg in loggers:
            lg.addFilter(swallow)
        _NOTE_SINKS.append(notes)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    yield notes
                finally:
                    for w in caught:
                        if not issubclass(w.category, DeprecationWarning | PendingDeprecationWarning):
                            notes.append(str(w.message))
        finally:
            _NOTE_SINKS.remove(notes)
            for lg in loggers:
                lg.removeFilter(swallow)


def _native_notes(text: str) -> list[str]:
    """ITK/MetaIO/GDCM messages in captured stderr text: a ``WARNING: In file, line N`` block becomes its
    message (without the ``Class (0x...):`` prefix); other non-blank lines are kept as they are, except those
    holding terminal control sequences (a progress display drawn meanwhile by another thread)."""
    out: list[str] = []
    lines = [ln.strip() for ln in text.replace("\r\n", "\n").split("\n")]
    i = 0
    while i < len(lines):
        ln = lines[i]
        i += 1
        if not ln or _ANSI.search(ln) or "\r" in ln:
            continue
        if re.match(r"^(WARNING|ERROR): In ", ln):
            body = []
            while i < len(lines) and lines[i]:
                body.append(lines[i])
                i += 1
            msg = re.sub(r"^\w+ \(0x[0-9a-fA-F]+\):\s*", "", " ".join(body))
            if msg:
                out.append(msg)
        else:
            out.append(ln)
    return out


@contextlib.contextmanager
def reader_output_captured() -> Iterator[None]:
    """Run a SimpleITK call with the process's stderr (file descriptor 2) sent to a temporary file.

    ITK warnings, MetaIO and GDCM write to ``std::cerr`` directly; this keeps them off the terminal (the
    user sees one ``error:`` line or clean output). Their messages go to the innermost
    :func:`collect_reader_notes` list, else they are dropped. If fd 2 cannot be redirected, ITK's own warning
    display is switched off instead.
    """
    with _QUIET_LOCK:
        saved = tmp = None
        prev_display = sitk.ProcessObject.GetGlobalWarningDisplay()
        try:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            tmp = tempfile.TemporaryFile()
            saved = os.dup(2)
            os.dup2(tmp.fileno(), 2)
        except (OSError, ValueError):
            if saved is not None:
                os.close(saved)
            saved = None
            if tmp is not None:
                tmp.close()
                tmp = None
            sitk.ProcessObject.SetGlobalWarningDisplay(False)
        try:
            yield
        finally:
            text = ""
            if saved is not None and tmp is not None:
                with contextlib.suppress(Exception):
                    sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                tmp.seek(0)
                text = tmp.read(64 * 1024).decode("utf-8", "replace")
                tmp.close()
            sitk.ProcessObject.SetGlobalWarningDisplay(prev_display)
            if text and _NOTE_SINKS:
                _NOTE_SINKS[-1].extend(_native_notes(text))


def sitk_problem(e: BaseException) -> str:
    """A short reason from a (multi-line) SimpleITK/ITK exception message."""
    text = str(e)
    if "Unable to determine ImageIO" in text:
        return "unknown or corrupt image format"
    if "cannot be read" in text or "not read completely" in text:
        return "header or voxel data cannot be read: truncated, corrupt or missing data file"
    lines = [ln.strip() for ln in text.splitlines() if "ERROR" in ln]
    msg = lines[0] if lines else (text.strip().splitlines() or [type(e).__name__])[-1]
    msg = re.sub(r"^.*?ERROR:\s*(\w+\(0x[0-9a-f]+\):\s*)?", "", msg)
    return msg[:160]


def _short(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    msg = lines[-1] if lines else type(e).__name__
    return msg[:160]


def _select_series(path: Path, role: str) -> tuple[DicomSeries, str, list[DicomSeries]]:
    """(chosen series, rule, all series) for a DICOM folder or file (the rules of the module docstring)."""
    path = Path(path)
    label = role_label(role)
    if path.is_dir():
        files, n_files = _scan(path)
        if n_files == 0:
            raise InputError(path, f"{label} folder is empty")
        if not files:
            raise InputError(
                path, f"{label} folder holds no DICOM images ({n_files} files, none readable as DICOM)"
            )
        wanted_uid = None
    else:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as e:  # any parser failure is the file's fault
            raise InputError(path, f"{label} file is not readable DICOM ({_short(e)})") from None
        wanted_uid = str(ds.get("SeriesInstanceUID", "(no SeriesInstanceUID)"))
        files, _ = _scan(path.parent)
    series: dict[str, DicomSeries] = {}
    for f in files:
        series.setdefault(f.series_uid, DicomSeries(f.series_uid, f.description)).files.append(f)
    all_series = list(series.values())
    if wanted_uid is not None:
        chosen = series.get(wanted_uid)
        if chosen is None:
            raise InputError(path, f"{label} file is not a DICOM image")
        return chosen, "series of the given file", all_series
    if len(all_series) == 1:
        return all_series[0], "only series in the folder", all_series
    matches = [s for s in all_series if role_matches(s, role)]
    listing = "; ".join(s.summary() for s in all_series)
    if len(matches) != 1:
        how = "none matches" if not matches else f"{len(matches)} match"
        raise InputError(
            path,
            f"{label} folder holds {len(all_series)} DICOM series and {how} {label} by description/image type; "
            f"pass the folder of one series. Series: {listing}",
        )
    return matches[0], f"only series whose description/image type matches {label}", all_series


def dicom_files(path: Path, role: str | None = None) -> list[Path]:
    """The files a DICOM input is read from (sorted), without reading any pixel.

    A folder with ``role``: the files of the series that role selects. A folder without ``role``: every regular
    file under it (what the reader looks at; no tag is read). A single file: the files of its series in its
    folder.
    """
    path = Path(path)
    if path.is_dir() and role is None:
        out = []
        for root, dirs, names in os.walk(path):
            dirs.sort()
            out.extend(Path(root) / n for n in names if os.path.isfile(os.path.join(root, n)))
        return sorted(out)
    chosen, _, _ = _select_series(path, role or "image")
    return sorted(f.path for f in chosen.files)


def read_dicom(path: Path, role: str, max_voxels: int = DEFAULT_MAX_VOXELS) -> Image:
    """Read a DICOM series from a folder (or the series a single DICOM file belongs to). See module doc.

    ``max_voxels``: the chosen files may declare (rows x columns x frames, summed) at most this many voxels;
    checked before any pixel is read.
    """
    path = Path(path)
    label = role_label(role)
    chosen, rule, all_series = _select_series(path, role)
    first = chosen.files[0]
    n_decl = sum(max(f.rows, 0) * max(f.columns, 0) * max(f.frames, 1) for f in chosen.files)
    if all(f.rows == first.rows and f.columns == first.columns and f.frames == first.frames
           for f in chosen.files):
        shape = (first.columns, first.rows, len(chosen.files) * first.frames)
    else:
        shape = (n_decl,)  # mixed image sizes: the total is what counts
    check_declared_size(path, label, shape, max_voxels, what="DICOM series")
    groups = _group_bvalues(chosen.files)
    meta = {
        "format": "dicom",
        "series_uid": chosen.uid,
        "series_description": chosen.description,
        "series_rule": rule,
        "n_files": len(chosen.files),
        "n_series_in_folder": len(all_series),
        "source_files": sorted(str(f.path) for f in chosen.files),
    }
    if len(groups) == 1:
        img = _read_volume(groups[0][1], path, label, "series")
        b = groups[0][0]
        return _finish(img, meta, [b] if b is not None else None)

    if any(b is None for b, _ in groups):
        raise InputError(path, f"{label} DICOM series mixes images with and without a b-value")
    vols = [_read_volume(fs, path, label, f"b={b:g} volume") for b, fs in groups]
    bvals = [float(b) for b, _ in groups]
    if all(v.same_grid(vols[0]) and v.data.ndim == 3 for v in vols):
        data = np.stack([np.asarray(v.data) for v in vols], axis=-1)
        img = Image(data, vols[0].affine, str(path))
        files = [v.meta["dicom_files"][0] for v in vols]
        return _finish(img, {**meta, "split_by_bvalue": True, "dicom_files": files}, bvals)
    if role != "dwi":
        raise InputError(path, f"{label} DICOM series holds volumes with b-values {bvals} on different grids")
    best = int(np.argmin([abs(b - 1000.0) for b in bvals]))
    meta["read_warnings"] = [
        f"{label} {path}: the b-value volumes {bvals} of the series are on different grids; "
        f"kept only b={bvals[best]:g}"
    ]
    return _finish(vols[best], {**meta, "split_by_bvalue": True, "all_bvals": bvals}, [bvals[best]])


def _finish(img: Image, meta: dict, bvals: list[float] | None) -> Image:
    data = np.asarray(img.data)
    meta = {**meta, "original_dtype": str(data.dtype)}
    if bvals is not None:
        meta["bvals"] = bvals
    out = data.astype(np.float32) if data.dtype != np.float64 else data
    return Image(out, img.affine, img.source, {**img.meta, **meta})
