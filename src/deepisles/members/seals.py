"""SEALS: the ISLES'22 winning method (nnU-Net v1, 3D full resolution, DWI + ADC), as DeepISLES runs it.

The reference chain (DeepISLES ``src/SEALS``: ``nnunet_launcher.sh`` and the nnU-Net v1.7 fork it ships):

1. ``Task500_Ischemic_Stroke_Test.py``: the DWI is resampled by SimpleITK to 1 mm (linear, identity transform,
   same origin and direction, size ``uint8(size * spacing)``, output pixel type = the DWI file's), the ADC
   linearly onto that grid (float32);
2. ``nnUNet_predict -t 12 -tr nnUNetTrainerV2_DDP -m 3d_fullres -f K -z --disable_postprocessing`` for each
   fold K: nnU-Net's ``GenericPreprocessor`` (crop to the filled nonzero box of both channels, transpose,
   resample to the plans' spacing when it differs, per-channel normalization inside the nonzero mask where the
   plans say so), sliding window (step 0.5, Gaussian weights, 8 mirrorings averaged after softmax, fp16
   autocast on CUDA), softmax back to the cropped shape, stored as float16 ``.npz``;
3. ``recover_softmax.py``: the cropped softmax is put back into the 1 mm grid (background 1 outside the box)
   and each channel resampled by SimpleITK (linear) to the native DWI size and spacing;
4. ``ensemble_predictions.py``: mean over the folds, argmax; ``threshold_redirect.py`` gives it the DWI geometry.

``SealsMember`` does all of this in memory, on our own torch code, in the three stages of the member contract:
``preprocess`` = steps 1 and 2 (each inverse is defined next to its forward step: :func:`from_1mm` after
:func:`to_1mm`, :func:`uncrop` after :func:`crop_to_nonzero`, :func:`export_softmax` after
:func:`nnunet_preprocess`), ``infer`` = the sliding window per fold, ``export`` = 2b-4. The result is the mean
foreground probability on the DWI grid, adjusted by at most a float rounding where needed so that ``>= 0.5``
equals the reference argmax (which compares the two float16-rounded channels). The SimpleITK resamplings run on the same
origin, direction and spacing doubles that SimpleITK reads from the DWI file (pixdim spacing, sform
orientation): where a 1 mm sample falls exactly on a native voxel (2 mm data), whether a background voxel next
to the brain is exactly 0 depends on their float rounding, and it moves nnU-Net's crop box.

``fast=True``: no test-time mirroring (one forward pass per window instead of eight; all folds kept). Results
then differ from DeepISLES (usually slightly); the default reproduces it.

Deviation: DeepISLES computes the 1 mm grid size as ``uint8``; above 255 voxels it wraps around (a 260 mm field
of view becomes 4 mm) and the lesions outside are lost. deepisles keeps the full size there and says so in
the report info; below 256 (every ISLES'22 case) both are identical.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from deepisles.engine.sliding_window import (
    constant,
    nnunet_gaussian,
    nnunet_starts,
    pad_to_patch,
    sliding_window,
    with_mirroring,
)
from deepisles.io.image import Image
from deepisles.members.base import Case, Context, MemberResult, StoredMember, VoteCount, match_decision
from deepisles.members.config import ModelEntry, Settings, check_decision_threshold, check_sizes, require

log = logging.getLogger(__name__)

NAME = "seals"


# --- settings (member.json "settings"): nnU-Net's plans vocabulary ------------------------------------
@dataclass(frozen=True)
class SealsPreprocessing:
    """What nnU-Net v1's GenericPreprocessor takes from the plans (read by ``weights import`` from plans.pkl)."""

    deepisles_spacing_mm: tuple[float, ...]  # DeepISLES' own resampling before nnU-Net (1 mm)
    target_spacing: tuple[float, ...]
    transpose_forward: tuple[int, ...]
    transpose_backward: tuple[int, ...]
    normalization_schemes: tuple[str, ...]  # per channel: nonCT/MRI (z-score), CT, CT2, noNorm
    use_mask_for_norm: tuple[bool, ...]
    intensity_properties: tuple[dict | None, ...] | None = None  # per channel (CT schemes only)
    resample_order_data: int = 3
    resample_order_seg: int = 1
    separate_z_anisotropy_threshold: float = 3.0

    def validate(self, where: str) -> None:
        check_sizes(self.deepisles_spacing_mm, f"{where}.deepisles_spacing_mm")
        check_sizes(self.target_spacing, f"{where}.target_spacing")
        for key in ("transpose_forward", "transpose_backward"):
            require(sorted(getattr(self, key)) == [0, 1, 2], f"{where}.{key}",
                    f"expected a permutation of 0, 1, 2, got {list(getattr(self, key))}")
        require(len(self.normalization_schemes) == len(self.use_mask_for_norm) == 2, where,
                "normalization_schemes and use_mask_for_norm need one entry per channel (DWI, ADC)")
        ct = [c for c, s in enumerate(self.normalization_schemes) if s in ("CT", "CT2")]
        props = self.intensity_properties or ()
        require(all(c < len(props) and isinstance(props[c], dict) for c in ct), f"{where}.intensity_properties",
                "CT normalization needs the intensity properties of its channel")


@dataclass(frozen=True)
class SealsInference:
    patch_size: tuple[int, ...]
    step_size: float = 0.5
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    gaussian_sigma_scale: float = 0.125
    mixed_precision: bool = True  # fp16 autocast on CUDA

    def validate(self, where: str) -> None:
        check_sizes(self.patch_size, f"{where}.patch_size")
        require(0 < self.step_size <= 1, f"{where}.step_size", f"expected a value in (0, 1], got {self.step_size}")
        require(all(a in (0, 1, 2) for a in self.mirror_axes), f"{where}.mirror_axes",
                f"expected spatial axes 0, 1, 2, got {list(self.mirror_axes)}")


@dataclass(frozen=True)
class SealsExport:
    """nnU-Net's ``segmentation_export_params``."""

    interpolation_order: int = 1
    interpolation_order_z: int = 0
    force_separate_z: bool | None = None
    softmax_dtype: str = "float16"  # nnU-Net -z stores each fold's softmax as float16

    def validate(self, where: str) -> None:
        require(self.softmax_dtype == "float16", f"{where}.softmax_dtype",
                f"only float16 (nnU-Net's .npz) is supported, got {self.softmax_dtype!r}")


@dataclass(frozen=True)
class SealsSettings(Settings):
    preprocessing: SealsPreprocessing
    inference: SealsInference
    export: SealsExport = SealsExport()
    # mask = mean foreground probability >= this. 0.5 is nnU-Net's argmax (the official models); the packaged
    # default model may set another, picked on synthetic validation (scripts/select_default_decision.py)
    decision_threshold: float = 0.5

    V1_KEYS = ("preprocessing", "inference", "export")

    def validate(self, where: str) -> None:
        check_decision_threshold(self.decision_threshold, where)

    @classmethod
    def migrate_v1(cls, meta: dict) -> dict:
        """Format 1 kept the fold numbers in ``folds`` (files ``fold_K.safetensors``)."""
        out = super().migrate_v1(meta)
        folds = out["provenance"].pop("folds", None) or []
        out["models"] = [SealsMember.model_entry(int(k)).to_json() for k in folds]
        return out


# The compact default recipe (deepisles train --init none, the packaged default model): nnU-Net's Generic_UNet
# with 8 base features, 4 poolings, at 2 mm with 64^3 windows and no mirroring.
COMPACT_RECIPE = {
    "inputs": ["dwi", "adc"],
    "network": {
        "input_channels": 2, "base_num_features": 8, "num_classes": 2,
        "pool_op_kernel_sizes": [[2, 2, 2]] * 4, "conv_kernel_sizes": [[3, 3, 3]] * 5,
        "conv_per_stage": 2, "feat_map_mul_on_downscale": 2.0, "max_num_features": 128,
        "norm_eps": 1e-5, "negative_slope": 0.01,
    },
    "settings": {
        "preprocessing": {
            "deepisles_spacing_mm": [1.0, 1.0, 1.0], "target_spacing": [2.0, 2.0, 2.0],
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "normalization_schemes": ["nonCT", "nonCT"], "use_mask_for_norm": [True, True],
            "intensity_properties": None, "resample_order_data": 3, "resample_order_seg": 1,
            "separate_z_anisotropy_threshold": 3.0,
        },
        "inference": {"patch_size": [64, 64, 64], "step_size": 0.5, "mirror_axes": [], "gaussian_sigma_scale": 0.125,
                      "mixed_precision": True},
        "export": {"interpolation_order": 1, "interpolation_order_z": 0, "force_separate_z": None,
                   "softmax_dtype": "float16"},
    },
    "models": [],
}  # fmt: skip


# --- step 1: DeepISLES' 1 mm grid (SimpleITK, as Task500_Ischemic_Stroke_Test.py) ----------------------
def _pixdim_like(v: float) -> float:
    """The float32 a NIfTI header would hold for a voxel size measured as ``v`` from the affine.

    The column norms of a float32 sform are a few float32 steps away from the header's pixdim (1.9 may come
    out as 1.9000001); the pixdim is taken as the candidate within 3 steps with the shortest decimal form.
    """
    f = np.float32(v)
    cands = [f]
    up = down = f
    for _ in range(3):
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(0))
        cands += [up, down]
    best = min(cands, key=lambda c: (len(np.format_float_positional(c, unique=True, trim="-")), abs(float(c) - v)))
    return float(best)


def itk_spacing(img: Image) -> np.ndarray:
    """Voxel size as SimpleITK reads it from the DWI file (NIfTI pixdim, float32).

    Uses ``img.meta['zooms']`` (the header's voxel sizes) when the reader recorded them and they agree with the
    affine; otherwise recovers them from the affine with :func:`_pixdim_like`. The exact value matters:
    DeepISLES' 1 mm grid size is ``int(size * spacing)`` and the 1 mm samples fall on ``index / spacing``.
    """
    norms = np.asarray(img.spacing, dtype=np.float64)
    zooms = img.meta.get("zooms")
    if zooms is not None and len(zooms) >= 3 and np.allclose(np.asarray(zooms[:3], float), norms, rtol=1e-4):
        return np.asarray(zooms[:3], dtype=np.float32).astype(np.float64)
    return np.array([_pixdim_like(v) for v in norms])


def deepisles_grid_size(shape, spacing) -> tuple[list[int], bool]:
    """``respacing_file``'s ``(origin_size / (target / origin_spacing)).astype(np.uint8)`` for 1 mm.

    Returns the size and whether DeepISLES' uint8 would wrap around (then the unwrapped size is returned).
    """
    factor = np.array(np.array([1, 1, 1]) / np.asarray(spacing, dtype=np.float64))
    raw = np.asarray(shape, dtype=np.int64) / factor
    size = [int(v) for v in raw]  # truncation toward zero, as the uint8 cast does below 256
    return size, any(s > 255 for s in size)


def _sitk_image(arr_zyx: np.ndarray, spacing, like: Image | None = None) -> sitk.Image:
    """An ITK image of ``arr_zyx`` with ``spacing`` and, when ``like`` is given, that image's origin and direction
    as SimpleITK reads them from its NIfTI file (``Image.to_sitk`` derives them from the affine the same way
    ITK does from the sform). Without ``like``: origin 0, identity direction."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr_zyx))
    img.SetSpacing([float(s) for s in spacing])
    if like is not None:
        geo = Image(np.zeros((1, 1, 1), dtype=np.uint8), like.affine).to_sitk()
        img.SetOrigin(geo.GetOrigin())
        img.SetDirection(geo.GetDirection())
    return img


def _resample(img: sitk.Image, size, spacing, pixel_type=None) -> sitk.Image:
    f = sitk.ResampleImageFilter()
    f.SetReferenceImage(img)
    f.SetOutputOrigin(img.GetOrigin())
    f.SetOutputDirection(img.GetDirection())
    f.SetOutputSpacing([float(s) for s in spacing])
    f.SetSize([int(s) for s in size])
    if pixel_type is not None:
        f.SetOutputPixelType(pixel_type)
    f.SetTransform(sitk.Transform(3, sitk.sitkIdentity))
    f.SetInterpolator(sitk.sitkLinear)
    return f.Execute(img)


def _dwi_voxels(dwi: Image) -> np.ndarray:
    """The DWI voxels in the pixel type DeepISLES' SimpleITK would read (integer files stay integer: the 1 mm
    resampling then truncates, as ITK casts to the input pixel type)."""
    data = np.asarray(dwi.data)
    original = dwi.meta.get("original_dtype")
    try:
        odt = np.dtype(original) if original else None
    except TypeError:
        odt = None
    if odt is not None and np.issubdtype(odt, np.integer) and not np.issubdtype(data.dtype, np.integer):
        info = np.iinfo(odt)
        if np.all(data == np.round(data)) and data.min() >= info.min and data.max() <= info.max:
            return data.astype(odt)
    return data


def to_1mm(case: Case) -> tuple[np.ndarray, list[int], np.ndarray, bool]:
    """DWI and ADC on DeepISLES' 1 mm grid: (2, z, y, x) float32, the grid size (x, y, z), the DWI spacing."""
    spacing = itk_spacing(case.dwi)
    size, wrapped = deepisles_grid_size(case.dwi.shape, spacing)
    # same origin and direction as DeepISLES' SimpleITK sees: they cancel out mathematically, but decide the float
    # rounding of the sample positions, and so which background voxels next to the brain get exactly 0
    dwi = _resample(_sitk_image(_dwi_voxels(case.dwi).transpose(2, 1, 0), spacing, case.dwi), size, [1.0] * 3)
    adc_in = _sitk_image(np.asarray(case.adc.data).transpose(2, 1, 0), spacing, case.dwi)
    adc = _resample(adc_in, size, [1.0, 1.0, 1.0], sitk.sitkFloat32)
    data = np.stack([sitk.GetArrayFromImage(dwi), sitk.GetArrayFromImage(adc)]).astype(np.float32)
    return data, size, spacing, wrapped


def label_to_1mm(label: np.ndarray, dwi: Image, size, spacing) -> np.ndarray:
    """A DWI-grid label on the 1 mm grid (z, y, x): linear like the ADC, then ``>= 0.5``."""
    lab_in = _sitk_image(np.asarray(label, dtype=np.float32).transpose(2, 1, 0), spacing, dwi)
    return sitk.GetArrayFromImage(_resample(lab_in, size, [1.0, 1.0, 1.0], sitk.sitkFloat32)) >= 0.5


def from_1mm(channels_1mm: np.ndarray, shape, spacing) -> np.ndarray:
    """The inverse of :func:`to_1mm` as ``recover_softmax.py`` does it: each channel (z, y, x) of the 1 mm grid,
    taken in index space (spacing 1, origin 0, identity), linearly resampled by SimpleITK to the DWI's size and
    spacing; returned as (C, x, y, z) float32 on the DWI grid."""
    native = []
    for c in range(channels_1mm.shape[0]):
        img = sitk.GetImageFromArray(channels_1mm[c])
        native.append(sitk.GetArrayFromImage(_resample(img, shape, spacing, sitk.sitkFloat32)).transpose(2, 1, 0))
    return np.stack(native)


# --- step 2: nnU-Net v1 GenericPreprocessor ---------------------------------------------------------
def crop_to_nonzero(data: np.ndarray):
    """nnU-Net ``crop_to_nonzero``: box of the hole-filled union of nonzero voxels; seg -1 outside the mask."""
    mask = np.zeros(data.shape[1:], dtype=bool)
    for c in range(data.shape[0]):
        mask |= data[c] != 0
    mask = ndimage.binary_fill_holes(mask)
    where = np.where(mask)
    bbox = [[int(np.min(w)), int(np.max(w)) + 1] for w in where]
    sl = tuple(slice(a, b) for a, b in bbox)
    data = np.stack([data[c][sl] for c in range(data.shape[0])])
    seg = mask[sl].astype(int)[None]
    seg[seg == 0] = -1
    seg[seg > 0] = 0
    return data, seg, bbox


def uncrop(softmax: np.ndarray, full_shape, bbox) -> np.ndarray:
    """The inverse of the crop (``recover_softmax.py``): the cropped softmax back into the full 1 mm grid,
    background probability 1 outside the box."""
    full = np.zeros((softmax.shape[0], *full_shape), dtype=np.float32)
    full[0] = 1.0
    full[(slice(None), *(slice(a, b) for a, b in bbox))] = softmax
    return full


def sk_resize(img: np.ndarray, new_shape, order: int) -> np.ndarray:
    """``skimage.transform.resize(img, new_shape, order, mode='edge', anti_aliasing=False)`` (clip=True) for a
    float64 image, through the same ``scipy.ndimage.zoom(grid_mode=True)`` call scikit-image makes."""
    factors = np.divide(img.shape, new_shape)
    out = ndimage.zoom(img, [1 / f for f in factors], order=order, mode="nearest", cval=0.0, grid_mode=True)
    np.clip(out, np.min(img), np.max(img), out=out)
    return out


def resize_segmentation(seg: np.ndarray, new_shape, order: int) -> np.ndarray:
    """batchgenerators 0.24 ``resize_segmentation`` (label by label, ``>= 0.5`` wins, later labels override)."""
    tpe = seg.dtype
    if order == 0:
        return sk_resize(seg.astype(float), new_shape, 0).astype(tpe)
    out = np.zeros(new_shape, dtype=seg.dtype)
    for c in np.unique(seg):
        out[sk_resize((seg == c).astype(float), new_shape, order) >= 0.5] = c
    return out


def get_do_separate_z(spacing, threshold: float = 3.0) -> bool:
    return bool((np.max(spacing) / np.min(spacing)) > threshold)


def get_lowres_axis(spacing) -> np.ndarray:
    return np.where(max(spacing) / np.array(spacing) == 1)[0]


def resample_data_or_seg(data, new_shape, is_seg, axis=None, order=3, do_separate_z=False, order_z=0):
    """nnU-Net v1 ``resample_data_or_seg`` (data is (c, x, y, z))."""
    if is_seg:
        def resize_fn(a, shp, o):
            return resize_segmentation(a, shp, o)
    else:
        resize_fn = sk_resize
    dtype_data = data.dtype
    shape = np.array(data[0].shape)
    new_shape = np.array(new_shape)
    if not np.any(shape != new_shape):
        return data
    data = data.astype(float)
    if do_separate_z:
        axis = axis[0]
        new_shape_2d = np.delete(new_shape, axis)
        final = []
        for c in range(data.shape[0]):
            slices = []
            for s in range(shape[axis]):
                sl = [slice(None)] * 3
                sl[axis] = s
                slices.append(resize_fn(data[c][tuple(sl)], new_shape_2d, order).astype(dtype_data))
            reshaped = np.stack(slices, axis)
            if shape[axis] != new_shape[axis]:
                rows, cols, dim = new_shape
                orig_rows, orig_cols, orig_dim = reshaped.shape
                map_rows, map_cols, map_dims = np.mgrid[:rows, :cols, :dim]
                map_rows = float(orig_rows) / rows * (map_rows + 0.5) - 0.5
                map_cols = float(orig_cols) / cols * (map_cols + 0.5) - 0.5
                map_dims = float(orig_dim) / dim * (map_dims + 0.5) - 0.5
                coords = np.array([map_rows, map_cols, map_dims])
                if not is_seg or order_z == 0:
                    final.append(ndimage.map_coordinates(reshaped, coords, order=order_z, mode="nearest")[None]
                                 .astype(dtype_data))
                else:
                    out = np.zeros(new_shape, dtype=dtype_data)
                    for cl in np.unique(reshaped):
                        hot = np.round(ndimage.map_coordinates((reshaped == cl).astype(float), coords,
                                                               order=order_z, mode="nearest"))
                        out[hot > 0.5] = cl
                    final.append(out[None].astype(dtype_data))
            else:
                final.append(reshaped[None].astype(dtype_data))
        result = np.vstack(final)
    else:
        result = np.vstack([resize_fn(data[c], new_shape, order)[None].astype(dtype_data)
                            for c in range(data.shape[0])])
    return result.astype(dtype_data)


def resample_patient(data, seg, original_spacing, target_spacing, pre: SealsPreprocessing):
    """nnU-Net v1 ``resample_patient`` with GenericPreprocessor's orders (data 3, seg 1, z 0), separate z auto."""
    thr = pre.separate_z_anisotropy_threshold
    shape = np.array(data[0].shape)
    new_shape = np.round((np.array(original_spacing) / np.array(target_spacing)).astype(float) * shape).astype(int)
    if get_do_separate_z(original_spacing, thr):
        do_separate_z, axis = True, get_lowres_axis(original_spacing)
    elif get_do_separate_z(target_spacing, thr):
        do_separate_z, axis = True, get_lowres_axis(target_spacing)
    else:
        do_separate_z, axis = False, None
    if axis is not None and len(axis) in (2, 3):
        do_separate_z = False
    data = resample_data_or_seg(data, new_shape, False, axis, pre.resample_order_data, do_separate_z, 0)
    seg = resample_data_or_seg(seg, new_shape, True, axis, pre.resample_order_seg, do_separate_z, 0)
    return data, seg


def normalize(data: np.ndarray, seg: np.ndarray, pre: SealsPreprocessing) -> np.ndarray:
    """GenericPreprocessor.resample_and_normalize, normalization part (in place on float32 data)."""
    schemes, use_mask = pre.normalization_schemes, pre.use_mask_for_norm
    props = pre.intensity_properties
    for c in range(len(data)):
        scheme = schemes[c]
        if scheme == "CT":
            p = props[c]
            data[c] = np.clip(data[c], p["percentile_00_5"], p["percentile_99_5"])
            data[c] = (data[c] - p["mean"]) / p["sd"]
            if use_mask[c]:
                data[c][seg[-1] < 0] = 0
        elif scheme == "CT2":
            p = props[c]
            lb, ub = p["percentile_00_5"], p["percentile_99_5"]
            m = (data[c] > lb) & (data[c] < ub)
            data[c] = np.clip(data[c], lb, ub)
            mn, sd = data[c][m].mean(), data[c][m].std()
            data[c] = (data[c] - mn) / sd
            if use_mask[c]:
                data[c][seg[-1] < 0] = 0
        elif scheme == "noNorm":
            pass
        elif use_mask[c]:
            m = seg[-1] >= 0
            data[c][m] = (data[c][m] - data[c][m].mean()) / (data[c][m].std() + 1e-8)
            data[c][m == 0] = 0
        else:
            mn, sd = data[c].mean(), data[c].std()
            data[c] = (data[c] - mn) / (sd + 1e-8)
    return data


def nnunet_preprocess(data_1mm: np.ndarray, pre: SealsPreprocessing):
    """``GenericPreprocessor.preprocess_test_case`` on the 1 mm (z, y, x) arrays; returns data and properties."""
    props = OrderedDict(original_size_of_raw_data=np.array(data_1mm.shape[1:]),
                        original_spacing=np.array(pre.deepisles_spacing_mm, dtype=float))
    data, seg, bbox = crop_to_nonzero(data_1mm)
    props["crop_bbox"] = bbox
    props["size_after_cropping"] = data[0].shape
    tf = list(pre.transpose_forward)
    data = data.transpose((0, *[i + 1 for i in tf]))
    seg = seg.transpose((0, *[i + 1 for i in tf]))
    target = np.array(pre.target_spacing, dtype=float)
    data[np.isnan(data)] = 0
    data, seg = resample_patient(data, seg, props["original_spacing"][tf], target, pre)
    props["spacing_after_resampling"] = target
    data = normalize(data, seg, pre)
    return data.astype(np.float32), props


def label_to_network(label_1mm: np.ndarray, shape, props: dict, pre: SealsPreprocessing) -> np.ndarray:
    """A 1 mm label through the same geometry as the data: cropped to nnU-Net's box, transposed and resampled
    as nnU-Net resamples its segmentations (order 1); uint8 0/1 of the network input's spatial shape."""
    lab = label_1mm[tuple(slice(a, b) for a, b in props["crop_bbox"])].astype(np.float32)
    lab = lab.transpose(list(pre.transpose_forward))
    if lab.shape != tuple(shape):
        lab = resize_segmentation(lab, shape, pre.resample_order_seg)
    return (lab >= 0.5).astype(np.uint8)


# --- step 2b: export of the softmax (segmentation_export.save_segmentation_nifti_from_softmax) -------
def export_softmax(softmax: np.ndarray, props: dict, pre: SealsPreprocessing, export: SealsExport) -> np.ndarray:
    """The inverse of :func:`nnunet_preprocess`'s transpose and resampling: softmax (classes, *transposed shape)
    -> un-transposed, at the cropped 1 mm shape, float16-rounded."""
    tb = list(pre.transpose_backward)
    softmax = softmax.transpose([0] + [i + 1 for i in tb])
    target_shape = props["size_after_cropping"]
    if any(i != j for i, j in zip(softmax.shape[1:], target_shape, strict=True)):
        fsz = export.force_separate_z
        if fsz is None:
            if get_do_separate_z(props["original_spacing"]):
                do_separate_z, axis = True, get_lowres_axis(props["original_spacing"])
            elif get_do_separate_z(props["spacing_after_resampling"]):
                do_separate_z, axis = True, get_lowres_axis(props["spacing_after_resampling"])
            else:
                do_separate_z, axis = False, None
        else:
            do_separate_z = fsz
            axis = get_lowres_axis(props["original_spacing"]) if fsz else None
        if axis is not None and len(axis) != 1:
            do_separate_z = False
        softmax = resample_data_or_seg(softmax, target_shape, False, axis, export.interpolation_order,
                                       do_separate_z, export.interpolation_order_z)
    # DeepISLES stores each fold's softmax in a float16 .npz (nnU-Net -z) before recover_softmax reads it
    return softmax.astype(np.float16).astype(np.float32)


# --- the member ----------------------------------------------------------------------------------
@dataclass
class SealsContext(Context):
    size: list[int] | None = None  # the 1 mm grid (x, y, z)
    spacing: np.ndarray | None = None  # the DWI's voxel size as SimpleITK reads it
    props: dict | None = None  # nnU-Net's properties (crop box, shapes); None when the 1 mm image is empty


class SealsMember(StoredMember):
    """SEALS (nnU-Net v1, DWI + ADC) exactly as DeepISLES runs it; see the module docstring.

    ``fast=True`` skips test-time mirroring (8x fewer network evaluations, all folds kept); the default
    (``fast=False``) reproduces DeepISLES. On CUDA the networks run under fp16 autocast (nnU-Net's mixed
    precision, DeepISLES' default); on CPU in fp32.
    """

    name = NAME
    settings_cls = SealsSettings
    modalities = ("dwi", "adc")
    required = ("dwi", "adc")
    description = "SEALS: nnU-Net v1 3D full-resolution ensemble of folds (DWI + ADC), ISLES'22 winner"

    def __init__(self, config, networks: list[torch.nn.Module], device: str = "cpu", fast: bool = False,
                 window_batch: int | None = None, mirror_batch: int | None = None):
        super().__init__(config, networks, device, fast)
        self.window_batch = window_batch or 1
        # the 8 mirrored copies of a window go through the network in chunks of `mirror_batch`
        # (4 on CUDA: one fold at patch 128^3 with fp16 peaked at 4.1 GiB against 7.7 GiB for 8, ~5 % slower;
        # 2 on CPU to bound host memory)
        self.mirror_batch = mirror_batch or (4 if self.device.type == "cuda" else 2)

    @property
    def window(self) -> list[int]:
        return [int(p) for p in self.settings.inference.patch_size]

    @property
    def out_channels(self) -> int:
        return int(self.config.network["num_classes"])

    @classmethod
    def build_network(cls, config, entry: ModelEntry) -> torch.nn.Module:
        from deepisles.members.nets.generic_unet import build

        return build(config.network_of(entry))

    @classmethod
    def model_entry(cls, fold: int, arch: str | None = None) -> ModelEntry:
        return ModelEntry(file=f"fold_{fold}.safetensors", name=f"fold_{fold}", fold=fold)

    # -- stage 1: DeepISLES' 1 mm grid, then nnU-Net's preprocessing --------------------------------------
    def preprocess(self, case: Case, label: np.ndarray | None = None) -> tuple[np.ndarray | None, SealsContext]:
        pre = self.settings.preprocessing
        data_1mm, size, spacing, wrapped = to_1mm(case)
        mirroring = bool(not self.fast and self.settings.inference.mirror_axes)  # the default model has no axes
        info = {"grid_1mm": size, "folds": [m.fold for m in self.config.models], "mirroring": mirroring,
                "device": str(self.device)}
        if wrapped:
            info["deviation"] = ("DeepISLES would wrap the 1 mm grid size modulo 256 (uint8) here and lose part "
                                 "of the field of view; deepisles keeps the full grid")
            log.warning("SEALS: %s", info["deviation"])
        ctx = SealsContext(tuple(case.dwi.shape), info=info, size=size, spacing=spacing)
        if not np.any(data_1mm != 0):  # nnU-Net cannot crop an empty image; DeepISLES then writes an empty mask
            if label is not None:
                raise ValueError("empty image: nothing to crop")
            return None, ctx
        data, ctx.props = nnunet_preprocess(data_1mm, pre)
        if label is not None:
            ctx.label = label_to_network(label_to_1mm(label, case.dwi, size, spacing), data.shape[1:], ctx.props, pre)
        return data, ctx

    # -- stage 2: every fold's softmax on the preprocessed array (lazily, one fold at a time) ----------
    def infer(self, x: np.ndarray | None):
        for net in self.networks if x is not None else []:
            yield self._predict_preprocessed(net, x)

    def _predict_preprocessed(self, net: torch.nn.Module, data: np.ndarray) -> np.ndarray:
        inf = self.settings.inference
        patch = [int(p) for p in inf.patch_size]
        x, slicer = pad_to_patch(torch.from_numpy(np.ascontiguousarray(data)), patch, value=0.0)
        starts = [nnunet_starts(s, p, inf.step_size) for s, p in zip(x.shape[1:], patch, strict=True)]
        tiles = int(np.prod([len(s) for s in starts]))
        weight = nnunet_gaussian(patch, inf.gaussian_sigma_scale) if tiles > 1 else constant(patch)

        def softmax(t: torch.Tensor) -> torch.Tensor:
            return torch.softmax(t, dim=1)

        if self.fast:
            def predict(b):
                return softmax(net(b))
        else:
            predict = with_mirroring(net, axes=inf.mirror_axes, nonlin=softmax, max_batch=self.mirror_batch)
        amp = inf.mixed_precision and self.device.type == "cuda"
        out = sliding_window(x, predict, patch, starts, weight, self.out_channels,
                             batch_size=self.window_batch, device=self.device, amp=amp)
        return out[slicer].cpu().numpy()

    # -- stage 3: each fold exported (2b), mean over folds, back into the 1 mm grid and onto the DWI -------
    # A fold's vote: the same way back and argmax applied to that fold's exported softmax alone.
    def export(self, softmaxes, context: SealsContext) -> MemberResult:
        votes = VoteCount()
        if context.props is None:
            for _ in self.networks:
                votes.add(np.zeros(context.shape, dtype=bool))
            return self.result(np.zeros(context.shape, dtype=np.float32), context, votes)
        pre, export = self.settings.preprocessing, self.settings.export
        size, bbox = context.props["original_size_of_raw_data"], context.props["crop_bbox"]
        acc, n = None, 0
        for sm in softmaxes:
            sm = export_softmax(sm, context.props, pre, export)
            fold_bg, fold_fg = from_1mm(uncrop(sm, size, bbox), context.shape, context.spacing)
            votes.add(self.decide(fold_fg, fold_fg > fold_bg))
            acc = sm if acc is None else acc + sm
            n += 1
        mean = acc / n
        full = uncrop(mean, size, bbox)
        bg, fg = from_1mm(full, context.shape, context.spacing)
        prob = np.ascontiguousarray(fg, dtype=np.float32)
        # at 0.5 the reference argmax (ties -> background)
        return self.result(match_decision(prob, self.decide(prob, fg > bg), self.threshold), context, votes)
