"""Reading input images (NIfTI, MetaImage, DICOM series) and choosing the b~1000 volume of a 4D DWI.

:func:`read_image` returns an :class:`Image` whose data is float32 (float64 stays float64), with
``meta = {format, original_dtype, ...}`` (DICOM adds the series and ``bvals`` when the tags give them).
Every problem with the file itself (missing, unreadable, corrupt, unsupported type, empty folder) raises
:class:`InputError` with the path and a one-line problem starting with the role ("DWI file ...").

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

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from deepisles.errors import InputError
from deepisles.io.dicom import read_dicom, sitk_problem
from deepisles.io.image import Image
from deepisles.io.validate import role_label

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
DICOM_SUFFIXES = (".dcm", ".ima", ".dicom")
SUPPORTED = ".nii, .nii.gz, .mha, .mhd, .nrrd or a DICOM series folder"

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


def read_image(path: str | Path, role: str) -> Image:
    """Read one input image. ``role`` is 'dwi' | 'adc' | 'flair' | 'mask' (used in messages)."""
    path = Path(path)
    label = role_label(role)
    if not path.exists():
        raise InputError(path, f"{label} file not found")
    if path.is_dir():
        img = read_dicom(path, role)
    else:
        suf = _suffix(path)
        if path.stat().st_size == 0:
            raise InputError(path, f"{label} file is empty (0 bytes)")
        if suf in NIFTI_SUFFIXES:
            img = _read_nifti(path, label)
        elif suf in SITK_SUFFIXES:
            img = _read_sitk(path, label)
        elif suf in DICOM_SUFFIXES or _is_dicom_file(path):
            img = read_dicom(path, role)
        else:
            raise InputError(
                path, f"{label} file has an unsupported type '{suf or path.name}' (expected {SUPPORTED})"
            )
    img.source = str(path)
    return img


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


def _read_nifti(path: Path, label: str) -> Image:
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
            "zooms": zooms}
    if sform == 0 and qform == 0:
        meta["read_warnings"] = [
            f"{label} {path}: NIfTI header has no orientation (sform and qform codes 0); using voxel sizes only"
        ]
    return Image(_as_float(_squeeze_beyond_4d(data)), affine, str(path), meta)


def _read_sitk(path: Path, label: str) -> Image:
    try:
        simg = sitk.ReadImage(str(path))
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
    fmt = "metaimage" if _suffix(path) in (".mha", ".mhd") else "nrrd"
    meta = {"format": fmt, "original_dtype": str(original), "zooms": [float(v) for v in simg.GetSpacing()[:3]]}
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
