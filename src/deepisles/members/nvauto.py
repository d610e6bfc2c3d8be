"""NVAUTO member: the ISLES'22 NVAUTO ensemble (15 MONAI SegResNets) as DeepISLES runs it.

The reference is DeepISLES ``src/NVAUTO/process.py`` on MONAI 0.9.0. Per case it

1. stacks [ADC, DWI] as channels (ADC first) on the DWI grid;
2. ``Spacingd(pixdim=1 mm, mode="bilinear")``: MONAI 0.9.0 keeps the rotation of the affine
   (``diagonal=False``), scales its columns to 1 mm (``zoom_affine``), keeps the centre of the *first voxel*
   (``compute_shape_offset``: the offset is the input corner that is lowest in the new grid) and gives each
   axis ``round((n - 1) * spacing + 1)`` voxels; trilinear sampling, ``padding_mode="border"``,
   ``align_corners=False``, affines in float32 and sampling in float64. (MONAI 1.x centres the new grid
   on the old field of view instead, which moves the 1 mm grid by a fraction of a voxel.)
3. ``NormalizeIntensityd(nonzero=True, channel_wise=True)``: z-score of the non-zero voxels per channel
   (population standard deviation);
4. ``SlidingWindowInferer(roi_size=(192, 192, 128), overlap=0.625, mode="gaussian", sw_batch_size=2)``:
   zero padding to the ROI, MONAI window placement, MONAI 0.9.0's Gaussian importance map (a delta at
   ``size // 2`` blurred with the erf-discretised Gaussian, sigma = 0.125 * size, clamped at >= 1e-3),
   logits blended in float32, fp16 autocast on CUDA, no test-time flips;
5. softmax per model, ``Invertd``: the inverse ``Spacing`` resamples the probabilities back onto the DWI
   grid (same rules, target spacing = the column norms of the DWI affine, shape = the DWI shape);
6. mean over the models, argmax.

The member contract's stages: ``preprocess`` = steps 1-3 (:func:`network_input`; its inverse, step 5, is
:func:`from_1mm` right after it), ``infer`` = step 4 and each model's softmax, ``export`` = steps 5-6 in the
reference's order of operations (each model's softmax inverted, summed in float32, divided by the number of
models). The result is the mean foreground probability on the DWI grid, nudged by at most a few ulps where
needed so that ``>= 0.5`` is exactly the reference argmax (ties go to background).

``fast=True`` (no counterpart in DeepISLES, which skips NVAUTO in its fast mode) runs the subset of models
listed as ``settings.fast_models`` in ``member.json`` (by default 5 of the 15: models 0, 3, 6, 9, 12).

The networks are deepisles' own: a MONAI ``SegResNet`` built from the ``network`` entry of ``member.json``
(``{"class": "SegResNet", "kwargs": {...}}``) with its tensors from ``model{i}.safetensors``. DeepISLES ships
the models as TorchScript archives, whose scripted code would run when TorchScript loads them and on every
forward pass; ``deepisles weights import`` reads only their tensors (``deepisles.weights.import_nvauto``)
and nothing here loads TorchScript. A store written by an older deepisles (``model{i}.ts``) makes the member
unavailable until the weights are imported again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from deepisles.engine.sliding_window import monai09_gaussian, monai_starts, pad_to_patch, sliding_window
from deepisles.members.base import (
    Case,
    Context,
    MemberResult,
    MemberUnavailable,
    StoredMember,
    VoteCount,
    match_decision,
)
from deepisles.members.config import ModelEntry, Settings, check_decision_threshold, check_sizes, require

log = logging.getLogger(__name__)

NAME = "nvauto"
AFFINE_TOL = 1e-3  # monai.data.utils.AFFINE_TOL (0.9.0)


# --- settings (member.json "settings"); the defaults are the reference (DeepISLES src/NVAUTO/process.py) -----
@dataclass(frozen=True)
class NvautoResample:
    mode: str = "bilinear"
    padding_mode: str = "border"
    align_corners: bool = False
    monai: str = "0.9.0"  # whose Spacing is reproduced (informative)

    def validate(self, where: str) -> None:
        require(self.mode in ("bilinear", "nearest"), f"{where}.mode",
                f"expected bilinear or nearest, got {self.mode!r}")
        require(self.padding_mode in ("zeros", "border", "reflection"), f"{where}.padding_mode",
                f"expected zeros, border or reflection, got {self.padding_mode!r}")
        require(not self.align_corners, f"{where}.align_corners", "only false (MONAI 0.9.0's default) is supported")


@dataclass(frozen=True)
class NvautoNormalize:
    nonzero: bool = True  # z-score of the non-zero voxels (false: no normalisation)
    channel_wise: bool = True

    def validate(self, where: str) -> None:
        require(self.channel_wise, f"{where}.channel_wise", "only true (per-channel statistics) is supported")


@dataclass(frozen=True)
class NvautoSettings(Settings):
    pixdim: tuple[float, ...] = (1.0, 1.0, 1.0)
    resample: NvautoResample = NvautoResample()
    normalize: NvautoNormalize = NvautoNormalize()
    roi_size: tuple[int, ...] = (192, 192, 128)
    overlap: float = 0.625
    blend_mode: str = "gaussian"
    sigma_scale: float = 0.125
    sw_batch_size: int = 2
    pad_value: float = 0.0
    amp: bool = True  # fp16 autocast on CUDA
    out_channels: int = 2
    foreground_channel: int = 1
    fast_models: tuple[int, ...] = (0, 3, 6, 9, 12)  # the models --fast runs (indices into "models")
    # mask = mean foreground probability >= this. 0.5 is the reference argmax (the official models); the packaged
    # default model may set another, picked on synthetic validation (scripts/select_default_decision.py)
    decision_threshold: float = 0.5

    def validate(self, where: str) -> None:
        check_decision_threshold(self.decision_threshold, where)
        check_sizes(self.pixdim, f"{where}.pixdim")
        check_sizes(self.roi_size, f"{where}.roi_size")
        require(0 <= self.overlap < 1, f"{where}.overlap", f"expected a value in [0, 1), got {self.overlap}")
        require(self.blend_mode == "gaussian", f"{where}.blend_mode",
                f"only gaussian is supported, got {self.blend_mode!r}")
        require(self.sigma_scale > 0 and self.sw_batch_size >= 1, where, "sigma_scale must be > 0, sw_batch_size >= 1")
        require(0 <= self.foreground_channel < self.out_channels, f"{where}.foreground_channel",
                f"expected a channel below out_channels ({self.out_channels}), got {self.foreground_channel}")

    @classmethod
    def migrate_v1(cls, meta: dict) -> dict:
        """Format 1 kept the settings (and a copy of the inputs) in a ``config`` block."""
        out = super().migrate_v1(meta)
        block = dict(out["provenance"].pop("config", None) or {})
        out.setdefault("inputs", block.get("inputs"))
        block.pop("inputs", None)
        out["settings"] = block
        return out


REFERENCE_INPUTS = ("adc", "dwi")  # the official models' channel order

# The reference configuration as format 1 stored it (its "config" block, inputs included).
DEFAULT_CONFIG: dict = {"inputs": list(REFERENCE_INPUTS), **NvautoSettings().to_json()}

# The compact default recipe (deepisles train --init none, the packaged default model): a SegResNet with 8
# initial filters at 2 mm, 64^3 windows.
COMPACT_RECIPE = {
    "inputs": ["adc", "dwi"],
    "network": {"class": "SegResNet", "kwargs": {
        "spatial_dims": 3, "in_channels": 2, "out_channels": 2, "init_filters": 8,
        "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1], "dropout_prob": None,
    }},
    "settings": {"pixdim": [2.0, 2.0, 2.0], "roi_size": [64, 64, 64], "overlap": 0.5, "sw_batch_size": 2,
                 "fast_models": [0]},
    "models": [],
    "provenance": {"architecture": "MONAI SegResNet"},
}  # fmt: skip


# --- MONAI 0.9.0 Spacing ------------------------------------------------------------------------
def affine_to_spacing(affine: np.ndarray) -> np.ndarray:
    """Column norms of the 3x3 part (``monai.data.utils.affine_to_spacing``, zeros -> 1)."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    sp = np.sqrt(np.sum(a * a, axis=0))
    sp[sp == 0] = 1.0
    return sp


def zoom_affine(affine: np.ndarray, scale: Sequence[float]) -> np.ndarray:
    """``monai.data.utils.zoom_affine(diagonal=False)`` of 0.9.0: keep the rotation, set the zooms, drop the
    shear and the translation."""
    affine = np.array(affine, dtype=float, copy=True)
    norm = affine_to_spacing(affine)
    s = np.array(scale, dtype=float, copy=True)[:3]
    s = np.where(s > 0, s, norm)
    rzs = affine[:-1, :-1]
    zs = np.linalg.cholesky(rzs.T @ rzs).T
    rotation = rzs @ np.linalg.inv(zs)
    s = np.sign(np.diag(zs)) * np.abs(s)
    new = np.eye(4)
    new[:-1, :-1] = rotation @ np.diag(s)
    return new


def compute_shape_offset(shape: Sequence[int], in_affine: np.ndarray, out_affine: np.ndarray):
    """``monai.data.utils.compute_shape_offset`` of 0.9.0: the output shape covering the input corners and,
    as offset, the world position of the input corner that is lowest along every output axis (the centre
    of the first voxel when the axes keep their directions)."""
    shape = np.array(shape, dtype=float)
    in_coords = [(0.0, d - 1.0) for d in shape]
    corners = np.asarray(np.meshgrid(*in_coords, indexing="ij")).reshape((len(shape), -1))
    corners = np.concatenate((corners, np.ones_like(corners[:1])))
    corners = np.asarray(in_affine, dtype=np.float64) @ corners
    inv_mat = np.linalg.inv(np.asarray(out_affine, dtype=np.float64))
    corners_out = inv_mat @ corners
    corners_out = corners_out[:-1] / corners_out[-1]
    out_shape = np.round(np.ptp(corners_out, axis=1) + 1.0)
    mat = inv_mat[:-1, :-1]
    k = 0
    for i in range(corners.shape[1]):
        min_corner = np.min(mat @ corners[:-1, :] - mat @ corners[:-1, i : i + 1], 1)
        if np.allclose(min_corner, 0.0, rtol=AFFINE_TOL):
            k = i
            break
    return out_shape.astype(int), corners[:-1, k]


def spacing_target(shape: Sequence[int], affine: np.ndarray, pixdim: Sequence[float]):
    """Target affine (float64) and shape of MONAI 0.9.0 ``Spacing(pixdim, diagonal=False)``."""
    affine = np.asarray(affine, dtype=np.float64)
    new = zoom_affine(affine, pixdim)
    out_shape, offset = compute_shape_offset(shape, affine, new)
    new[:3, 3] = offset
    return new, tuple(int(s) for s in out_shape)


def _normalize_transform(shape: Sequence[int]) -> torch.Tensor:
    """``monai.networks.utils.normalize_transform(align_corners=False)``: index -> [-1, 1]."""
    n = torch.tensor(list(shape), dtype=torch.float64)
    n[n <= 0.0] = 2.0
    norm = torch.diag(torch.cat((2.0 / n, torch.ones(1, dtype=torch.float64))))
    norm[:-1, -1] = 1.0 / torch.tensor(list(shape), dtype=torch.float64) - 1.0
    return norm


def resample(
    img: torch.Tensor,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    out_shape: Sequence[int],
    mode: str = "bilinear",
    padding_mode: str = "border",
) -> torch.Tensor:
    """``SpatialResample`` of MONAI 0.9.0 (align_corners=False, computation dtype float64).

    ``img`` is (C, *S); returns (C, *out_shape) float32 on ``img``'s device. As in 0.9.0 the affines are
    cast to float32 before ``xform = solve(src, dst)`` and nothing is resampled when the grids agree
    within ``AFFINE_TOL``.
    """
    in_shape = tuple(int(s) for s in img.shape[1:])
    out_shape = tuple(int(s) for s in out_shape)
    src = np.asarray(src_affine, dtype=np.float64)
    dst32 = np.asarray(dst_affine, dtype=np.float64).astype(np.float32)
    if np.allclose(src, dst32, atol=AFFINE_TOL) and in_shape == out_shape:
        return img.float()
    xform = np.linalg.solve(src.astype(np.float32), dst32)
    if np.allclose(xform, np.eye(4), atol=AFFINE_TOL) and in_shape == out_shape:
        return img.float()
    theta = torch.as_tensor(xform, dtype=torch.float64)
    theta = _normalize_transform(in_shape) @ theta @ torch.inverse(_normalize_transform(out_shape))
    rev = [2, 1, 0]
    theta[:3] = theta[rev]
    theta[:, :3] = theta[:, rev]
    theta = theta.to(img.device)
    grid = F.affine_grid(theta[None, :3], size=[1, img.shape[0], *out_shape], align_corners=False)
    out = F.grid_sample(
        img[None].to(torch.float64), grid, mode=mode, padding_mode=padding_mode, align_corners=False
    )
    return out[0].float()


# --- MONAI 0.9.0 NormalizeIntensity / importance map ---------------------------------------------
def normalize_nonzero(img: torch.Tensor) -> torch.Tensor:
    """``NormalizeIntensity(nonzero=True, channel_wise=True)`` of 0.9.0, in place on a float32 (C, *S)."""
    for c in range(img.shape[0]):
        x = img[c]
        m = x != 0
        if not bool(m.any()):
            continue
        v = x[m]
        mean = torch.mean(v.float()).item()
        std = torch.std(v.float(), unbiased=False).item()
        if std == 0.0:
            std = 1.0
        x[m] = (v - mean) / std
    return img


def network_input(settings: NvautoSettings, inputs: Sequence[str], case: Case, label: np.ndarray | None = None):
    """Steps 1-3: the ``inputs`` channels resampled to ``pixdim`` (MONAI 0.9.0 ``Spacing``) and z-scored on
    their non-zero voxels.

    Returns ``(image (C, *S1) float32, label (*S1) uint8 or None, target affine float64, native affine)``;
    ``label`` (on the DWI grid) goes through the same resampling and is thresholded at 0.5.
    """
    chans = [np.asarray(case.modality(m).data, dtype=np.float32) for m in inputs]
    img = torch.from_numpy(np.stack(chans, 0))
    affine = np.asarray(case.dwi.affine, dtype=np.float64)
    target, shape1 = spacing_target(img.shape[1:], affine, settings.pixdim)
    rs = settings.resample
    img1 = resample(img, affine, target, shape1, mode=rs.mode, padding_mode=rs.padding_mode)
    if settings.normalize.nonzero:
        img1 = normalize_nonzero(img1)
    lab1 = None
    if label is not None:
        lab = torch.from_numpy(np.asarray(label, dtype=np.float32))[None]
        lab1 = (resample(lab, affine, target, shape1, mode="bilinear", padding_mode="zeros")[0] >= 0.5)
        lab1 = lab1.numpy().astype(np.uint8)
    return img1, lab1, target, affine


def from_1mm(probs: torch.Tensor, affine1: np.ndarray, native_affine: np.ndarray, shape, rs: NvautoResample):
    """Step 5, the inverse of :func:`network_input`'s resampling (``Invertd``): ``Spacing`` back to the DWI's
    column norms, from the (float32) 1 mm affine, onto the DWI shape. ``probs`` is (C, *S1)."""
    back, _ = spacing_target(probs.shape[1:], affine1.astype(np.float64), affine_to_spacing(native_affine))
    if probs.device.type not in ("cpu", "cuda"):  # float64 grid sampling (e.g. not on MPS)
        probs = probs.cpu()
    return resample(probs, affine1, back, shape, mode=rs.mode, padding_mode=rs.padding_mode)


def build_segresnet(spec: dict) -> torch.nn.Module:
    """A MONAI ``SegResNet`` (random weights) from a stored ``network`` entry ``{"class": "SegResNet", "kwargs":
    {...}}``, the format ``deepisles weights import`` and ``deepisles train`` write."""
    from monai.networks.nets import SegResNet

    if spec.get("class") != "SegResNet":
        raise MemberUnavailable(NAME, f"unsupported network class {spec.get('class')!r} in member.json")
    kw = dict(spec.get("kwargs", {}))
    for k in ("blocks_down", "blocks_up", "act", "norm"):  # JSON lists -> the tuples MONAI takes
        if isinstance(kw.get(k), list):
            kw[k] = tuple(kw[k])
    return SegResNet(**kw)


# --- the member ---------------------------------------------------------------------------------
@dataclass
class NvautoContext(Context):
    affine1: np.ndarray | None = None  # the 1 mm grid's affine (float32, as MONAI 0.9.0 keeps it)
    affine: np.ndarray | None = None  # the DWI's affine


class NvautoMember(StoredMember):
    name = NAME
    settings_cls = NvautoSettings
    modalities = ("adc", "dwi")  # network channel order
    required = ("dwi", "adc")
    description = (
        "NVAUTO (ISLES'22): ensemble of MONAI SegResNets on [ADC, DWI] resampled to 1 mm, "
        "z-scored, Gaussian-blended 192x192x128 sliding windows, softmax averaged on the DWI grid"
    )

    def __init__(self, config, networks: list[torch.nn.Module], device: str | torch.device = "cpu",
                 fast: bool = False, amp: bool | None = None):  # fmt: skip
        super().__init__(config, networks, device, fast)
        self.model_names = [m.file for m in config.models]
        self.amp = bool(self.settings.amp) if amp is None else amp
        self._importance: torch.Tensor | None = None
        st = self.settings  # the description says what this store really runs (official 1 mm/192x192x128, or not)
        self.description = (
            f"NVAUTO (ISLES'22): ensemble of MONAI SegResNets on [ADC, DWI] resampled to "
            f"{'x'.join(f'{v:g}' for v in st.pixdim)} mm, z-scored, Gaussian-blended "
            f"{'x'.join(str(int(v)) for v in st.roi_size)} sliding windows, softmax averaged on the DWI grid"
        )

    @property
    def window(self) -> list[int]:
        return [int(r) for r in self.settings.roi_size]

    @property
    def out_channels(self) -> int:
        return int(self.settings.out_channels)

    @classmethod
    def build_network(cls, config, entry: ModelEntry) -> torch.nn.Module:
        return build_segresnet(config.network_of(entry))

    @classmethod
    def model_entry(cls, fold: int, arch: str | None = None) -> ModelEntry:
        return ModelEntry(file=f"model{fold}.safetensors", name=f"model{fold}", fold=fold)

    @classmethod
    def models_to_run(cls, config, fast: bool) -> tuple[ModelEntry, ...]:
        models = config.models
        if fast and models:
            chosen = [i for i in config.settings.fast_models if 0 <= i < len(models)] or [0]
            models = tuple(models[i] for i in chosen)
        return models

    # -- stage 1 (CPU, as the reference's data loader) -----------------------------------------------------
    def preprocess(self, case: Case, label: np.ndarray | None = None) -> tuple[torch.Tensor, NvautoContext]:
        """[ADC, DWI] on the 1 mm grid, z-scored (C, *S1) float32 on CPU; the context keeps both affines."""
        img1, lab1, target, affine = network_input(self.settings, self.config.inputs, case, label)
        return img1, NvautoContext(tuple(case.dwi.shape), lab1, affine1=target.astype(np.float32), affine=affine)

    def importance(self) -> torch.Tensor:
        if self._importance is None:
            self._importance = monai09_gaussian(self.settings.roi_size, self.settings.sigma_scale)
        return self._importance

    # -- stage 2: each model's softmax on the 1 mm grid (lazily, one model at a time) ---------------------------
    @torch.inference_mode()
    def infer(self, img1: torch.Tensor):
        """Yield each model's softmax (C, *S1) on the 1 mm grid, float32 on the device."""
        cfg = self.settings
        roi = self.window
        padded, unpad = pad_to_patch(img1, roi, value=float(cfg.pad_value))
        padded = padded.to(self.device)
        starts = [monai_starts(s, p, float(cfg.overlap)) for s, p in zip(padded.shape[1:], roi, strict=True)]
        for model in self.networks:
            logits = sliding_window(
                padded,
                model,
                roi,
                starts,
                self.importance(),
                int(cfg.out_channels),
                batch_size=int(cfg.sw_batch_size),
                device=self.device,
                amp=self.amp,
            )[unpad]
            yield torch.softmax(logits.float()[None], dim=1)[0]

    # -- stage 3: each softmax back on the DWI grid, mean, argmax -------------------------------------------
    @torch.inference_mode()
    def export(self, probabilities, context: NvautoContext) -> MemberResult:
        total, n = 0, 0
        fg = int(self.settings.foreground_channel)
        votes = VoteCount()  # a model's vote: the argmax of its own inverted softmax (or its probability >= threshold)
        for probs in probabilities:
            inv = from_1mm(probs, context.affine1, context.affine, context.shape, self.settings.resample)
            votes.add(self.decide(inv[fg], torch.argmax(inv, dim=0) == fg).cpu().numpy())
            total = total + inv  # as the reference: inverted per model, summed in float32, then divided
            n += 1
        mean = total / n
        prob = mean[fg].float()
        decision = self.decide(prob, torch.argmax(mean, dim=0) == fg)  # argmax ties go to the first channel
        return self.result(match_decision(prob.cpu().numpy(), decision.cpu().numpy(), self.threshold), context, votes)

    def report_info(self) -> dict:
        return {
            **super().report_info(),
            "models": len(self.networks),
            "fast": self.fast,
            "device": str(self.device),
            "amp": bool(self.amp and self.device.type == "cuda"),
        }
