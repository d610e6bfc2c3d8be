"""FACTORIZER member: the ISLES'22 FACTORIZER ensemble (5 folds x {Res-U-Net, Swin Factorizer}) as DeepISLES
runs it.

The reference is DeepISLES ``src/FACTORIZER/predict.py`` with the vendored ``factorizer`` 0.0.1 package
(``ISLESDataModule``, ``ISLESInferer``, ``Ensemble``) on MONAI 0.9.0. Per case it

1. stacks [DWI, ADC, FLAIR registered to the DWI] as channels, voxel arrays in file order
   (``LoadFromSimpleITKd``), float32;
2. ``NormalizeIntensityd(nonzero=True, channel_wise=True)`` on the NumPy arrays at native resolution: per
   channel, the non-zero voxels get ``(x - mean) / std`` (NumPy float32 mean and population std of those
   voxels; std 0 -> 1), zeros stay zero;
3. ``Interpolate``: unless the DWI spacing (``GetSpacing()``, float32) is ``torch.allclose`` to 2 mm, the
   voxel grid is resized with ``F.interpolate(mode="trilinear", align_corners=False)`` to
   ``round(shape * spacing / 2)`` voxels (float32 arithmetic, round half to even). This is a resize of the
   array, not a resampling in physical space;
4. ``SlidingWindowInferer(roi_size=64^3, overlap=0.5)``: MONAI defaults, i.e. ``sw_batch_size=1``,
   ``mode="constant"`` (plain average of overlapping windows), zero padding to the ROI, MONAI window
   placement; on each window ``ft.Ensemble`` of the 10 networks with weights 0.1 each and
   ``reduction=torch.mean``, i.e. ``mean_i(0.1 * logit_i)`` = 0.1 x the mean logit ("scaled logits");
5. the blended map is resized back to the DWI shape with the same ``F.interpolate`` call;
6. ``post="class"``: lesion where the scaled mean logit is >= 0.

Deviations, on purpose:

* DeepISLES never calls ``eval()``: its models stay in training mode, so the Swin Factorizer's dropout
  (p = 0.1) is live and its output is random (seeded by ``seed_everything(42)``). We run every network in
  eval mode (dropout off), which is what the networks were trained to approximate; the Res-U-Nets have no
  active dropout and GroupNorm/LayerNorm behave the same in both modes, so only the Swin Factorizers differ.
* Windows are sent through the networks in batches and, on CUDA, under float16 autocast (the NMF layers
  stay in float32); with ``amp=False`` CUDA runs in plain float32 (cuDNN's TF32 switched off during
  inference). Blending is linear, so averaging the models per window and then blending equals DeepISLES's
  order of operations.
* The FLAIR registration (SimpleElastix in DeepISLES) is done upstream (``preprocess/register.py``); this
  member receives the FLAIR on the DWI grid. The brain mask of the case is not used (DeepISLES gives the
  networks the images it was given, skull-stripped or not).

The member contract's stages: ``preprocess`` = steps 1-3 (:func:`network_input`; its inverse, step 5, is
:func:`from_network_grid` right after it), ``infer`` = step 4, ``export`` = steps 5-6. The result is
``sigmoid(mean logit)`` on the DWI grid (the blended scaled logit divided by the mean ensemble weight), nudged
by one ulp where needed so that ``>= 0.5`` is exactly the reference decision ``scaled logit >= 0``.

``fast=True`` (no counterpart in DeepISLES, whose fast mode skips FACTORIZER) runs only the architectures
listed as ``settings.fast_archs`` in ``member.json`` (by default the 5 Res-U-Nets, about 5x cheaper than the
Swin Factorizers); its decision is then not the reference one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from deepisles.engine.sliding_window import constant, monai_starts, pad_to_patch, sliding_window
from deepisles.io.image import Image
from deepisles.members.base import Case, Context, MemberResult, StoredMember, VoteCount, match_decision
from deepisles.members.config import ConfigError, ModelEntry, Settings, check_sizes, require

log = logging.getLogger(__name__)

NAME = "factorizer"

ARCHS = ("resunet", "swin-factorizer")
REFERENCE_INPUTS = ("dwi", "adc", "flair")  # the official models' channel order


# --- settings (member.json "settings"); the defaults are the reference (DeepISLES src/FACTORIZER/predict.py) ---
@dataclass(frozen=True)
class FactorizerNormalize:
    nonzero: bool = True
    channel_wise: bool = True

    def validate(self, where: str) -> None:
        require(self.nonzero and self.channel_wise, where, "only nonzero, channel-wise z-scores are supported")


@dataclass(frozen=True)
class FactorizerResize:
    mode: str = "trilinear"
    align_corners: bool = False

    def validate(self, where: str) -> None:
        require(self.mode == "trilinear", f"{where}.mode", f"only trilinear is supported, got {self.mode!r}")


@dataclass(frozen=True)
class FactorizerSettings(Settings):
    normalize: FactorizerNormalize = FactorizerNormalize()
    spacing: tuple[float, ...] = (2.0, 2.0, 2.0)  # the networks' grid (a resize of the array, see step 3)
    resize: FactorizerResize = FactorizerResize()
    roi_size: tuple[int, ...] = (64, 64, 64)
    overlap: float = 0.5
    blend_mode: str = "constant"
    sw_batch_size: int = 1  # the reference's; deepisles batches windows by the member's batch_size
    pad_value: float = 0.0
    ensemble_weight: float = 0.1  # per model unless the model entry says otherwise
    threshold_logit: float = 0.0
    fast_archs: tuple[str, ...] = ("resunet",)  # the architectures --fast runs
    amp: bool = True  # fp16 autocast on CUDA

    V1_KEYS = ("normalize", "spacing", "resize", "roi_size", "overlap", "blend_mode", "sw_batch_size", "pad_value",
               "ensemble_weight", "threshold_logit", "fast_archs", "amp")

    def validate(self, where: str) -> None:
        check_sizes(self.spacing, f"{where}.spacing")
        check_sizes(self.roi_size, f"{where}.roi_size")
        require(0 <= self.overlap < 1, f"{where}.overlap", f"expected a value in [0, 1), got {self.overlap}")
        require(self.blend_mode == "constant", f"{where}.blend_mode",
                f"only constant is supported, got {self.blend_mode!r}")
        require(self.ensemble_weight > 0, f"{where}.ensemble_weight", f"expected > 0, got {self.ensemble_weight}")
        bad = [a for a in self.fast_archs if a not in ARCHS]
        require(not bad, f"{where}.fast_archs", f"unknown architecture(s) {bad}; expected {', '.join(ARCHS)}")


# The compact default recipe (deepisles train --init none, the packaged default model): a Res-U-Net with widths
# 8..128, 64^3 windows at 2 mm, one model (ensemble weight 1).
_CONV = {"ref": "torch.nn.modules.conv.Conv3d"}
COMPACT_RECIPE = {
    "inputs": ["dwi", "adc", "flair"],
    "settings": {"roi_size": [64, 64, 64], "overlap": 0.5, "ensemble_weight": 1.0},
    "models": [],
    "network": {"partial": {"ref": "factorizer.unet.UNet"}, "args": [], "kwargs": {
        "in_channels": 3, "out_channels": 1, "spatial_dims": 3,
        "encoder_depth": [1, 1, 1, 1, 1], "encoder_width": [8, 16, 32, 64, 128], "strides": [1, 2, 2, 2, 2],
        "decoder_depth": [1, 1, 1, 1],
        "stem": [_CONV, {"kernel_size": 3, "padding": 1, "bias": False}],
        "downsample": [_CONV, {"kernel_size": 2, "bias": False}],
        "upsample": [{"ref": "torch.nn.modules.conv.ConvTranspose3d"}, {"kernel_size": 2}],
        "head": [_CONV, {"kernel_size": 1}], "num_deep_supr": 1,
        "block": {"object": "factorizer.unet.Same", "state": {"block": [
            {"ref": "factorizer.unet.BasicBlock"},
            {"conv": [_CONV, {"kernel_size": 3, "padding": 1}],
             "norm": [{"ref": "torch.nn.modules.normalization.GroupNorm"}, [8]],
             "act": {"ref": "torch.nn.modules.activation.LeakyReLU"}}]}},
    }},
}  # fmt: skip


# --- preprocessing (factorizer 0.0.1 + MONAI 0.9.0) ------------------------------------------------------
def normalize_nonzero(stack: np.ndarray) -> np.ndarray:
    """``NormalizeIntensity(nonzero=True, channel_wise=True)`` of MONAI 0.9.0 on a NumPy float32 (C, *S),
    in place: NumPy float32 mean and (population) std of each channel's non-zero voxels."""
    for c in range(stack.shape[0]):
        x = stack[c]
        nz = x != 0
        if not nz.any():
            continue
        v = x[nz]
        mean = np.mean(v)
        std = np.std(v)
        if std == 0.0:
            std = 1.0
        x[nz] = (v - mean) / std
    return stack


def resized_shape(shape, spacing, target) -> tuple[int, ...] | None:
    """``factorizer.data.Interpolate``: None when the spacing is ``torch.allclose`` to the target, else
    ``round(shape * spacing / target)`` computed as the reference does (int64 * float32 / float32)."""
    sp = torch.as_tensor(np.asarray(spacing, dtype=np.float32))
    tg = torch.tensor([float(t) for t in target])
    if torch.allclose(sp, tg):
        return None
    size = torch.as_tensor(np.asarray(shape, dtype=np.int64)) * sp / tg
    return tuple(int(s) for s in size.round().to(torch.int))


@contextmanager
def _no_tf32(active: bool):
    """Plain float32 convolutions on CUDA: cuDNN's TF32 default moves the fixture's probabilities by ~2e-4."""
    if not active:
        yield
        return
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous


def _on_dwi_grid(img: Image, dwi: Image, role: str) -> np.ndarray:
    if img.shape[:3] == dwi.shape[:3] and img.same_grid(dwi):
        return np.asarray(img.data, dtype=np.float32)
    from deepisles.preprocess.resample import resample_to

    log.info("factorizer: %s is not on the DWI grid; resampling it linearly", role)
    return np.asarray(resample_to(img, dwi, order=1, fill=0.0).data, dtype=np.float32)


def network_input(settings: FactorizerSettings, inputs: Sequence[str], case: Case,
                  label: np.ndarray | None = None):  # fmt: skip
    """Steps 1-3: [DWI, ADC, FLAIR] on the DWI grid, z-scored on their non-zero voxels at native resolution,
    resized to ``spacing`` (``F.interpolate``).

    Returns ``(x (C, *S) float32 tensor, label (*S) uint8 or None, resized shape or None)``; ``label`` (on the
    DWI grid) is resized with the same call and thresholded at 0.5.
    """
    dwi = case.dwi
    chans = []
    for role in inputs:
        img = case.modality(role)
        chans.append(np.asarray(dwi.data, dtype=np.float32) if role == "dwi" else _on_dwi_grid(img, dwi, role.upper()))
    stack = normalize_nonzero(np.ascontiguousarray(np.stack(chans)))
    x = torch.from_numpy(stack)[None]
    new = resized_shape(tuple(dwi.shape[:3]), dwi.spacing, settings.spacing)
    mode, align = settings.resize.mode, settings.resize.align_corners
    if new is not None:
        x = F.interpolate(x, size=new, mode=mode, align_corners=align)
    lab = None
    if label is not None:
        y = torch.from_numpy(np.asarray(label, dtype=np.float32))[None, None]
        if new is not None:
            y = F.interpolate(y, size=new, mode=mode, align_corners=align)
        lab = (y[0, 0] >= 0.5).numpy().astype(np.uint8)
    return x[0], lab, new


def from_network_grid(out: torch.Tensor, shape, resized, settings: FactorizerSettings) -> np.ndarray:
    """Step 5, the inverse of :func:`network_input`'s resize: the blended map (1, *S) resized back to the DWI
    ``shape`` with the same ``F.interpolate`` call (nothing to do when the input was not resized)."""
    out = out[None]
    if resized is not None:
        out = F.interpolate(out, size=tuple(shape), mode=settings.resize.mode,
                            align_corners=settings.resize.align_corners)
    return out[0, 0].float().cpu().numpy()


@dataclass
class FactorizerContext(Context):
    resized: tuple[int, ...] | None = None  # the networks' grid when the input was resized


class FactorizerMember(StoredMember):
    name = NAME
    settings_cls = FactorizerSettings
    archs = ARCHS
    modalities = ("dwi", "adc", "flair")
    required = ("dwi", "adc", "flair")
    description = (
        "FACTORIZER (ISLES'22): 5-fold Res-U-Net + Swin Factorizer ensemble on DWI, ADC and FLAIR at 2 mm, "
        "64^3 sliding windows; networks in eval mode (DeepISLES leaves dropout on)"
    )

    def __init__(self, config, networks: list[torch.nn.Module], device: str = "cpu", fast: bool = False,
                 batch_size: int | None = None, amp: bool | None = None):  # fmt: skip
        super().__init__(config, networks, device, fast)
        self.amp = bool(self.settings.amp if amp is None else amp) and self.device.type == "cuda"
        self.batch_size = batch_size or (4 if self.device.type == "cuda" else 2)
        self.model_names = [m.name for m in config.models]
        # DeepISLES: Ensemble(weights=[0.1] * 10, reduction=torch.mean) -> mean_i(w_i * logit_i)
        self.weights = [float(self.settings.ensemble_weight if m.ensemble_weight is None else m.ensemble_weight)
                        for m in config.models]  # fmt: skip

    @property
    def window(self) -> list[int]:
        return [int(r) for r in self.settings.roi_size]

    @property
    def out_channels(self) -> int:
        return 1

    @classmethod
    def build_network(cls, config, entry: ModelEntry) -> torch.nn.Module:
        from deepisles.members.nets.factorizer_nets import UnsupportedConfig, build_network

        try:
            return build_network(config.network_of(entry))
        except UnsupportedConfig as exc:
            raise ConfigError(f"{entry.name}: unsupported configuration ({exc})") from None

    @classmethod
    def model_entry(cls, fold: int, arch: str | None = None) -> ModelEntry:
        arch = arch or ARCHS[0]
        return ModelEntry(file=f"fold{fold}_{arch}.safetensors", name=f"fold{fold}_{arch}", fold=fold, arch=arch)

    @classmethod
    def models_to_run(cls, config, fast: bool) -> tuple[ModelEntry, ...]:
        if not fast:
            return config.models
        return tuple(m for m in config.models if m.arch in config.settings.fast_archs)

    # -- stage 1 ------------------------------------------------------------------------------------------
    def preprocess(self, case: Case, label: np.ndarray | None = None) -> tuple[torch.Tensor, FactorizerContext]:
        x, lab, new = network_input(self.settings, self.config.inputs, case, label)
        return x, FactorizerContext(tuple(case.dwi.shape), lab, resized=new)

    # -- stage 2: the ensemble's scaled logit on the networks' grid -----------------------------------------
    def _ensemble(self, x: torch.Tensor) -> torch.Tensor:
        """``ft.Ensemble.forward``: mean over the models of ``weight * logit`` (float32), channel 0; then each
        model's own ``weight * logit`` (channels 1..N, for the models' votes; channel 0 is computed as before)."""
        acc, each = None, []
        for w, net in zip(self.weights, self.networks, strict=True):
            out = w * net(x).float()
            each.append(out)
            acc = out if acc is None else acc + out
        return torch.cat([acc / len(self.networks), *each], dim=1)

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """``mean_i(w_i * logit_i)`` blended over the windows (channel 0) and each model's ``w_i * logit_i``
        blended the same way (channels 1..N): (1 + N, *S) float32 on the device."""
        x = x[None].to(self.device)
        roi = self.window
        padded, crop = pad_to_patch(x[0], roi, value=float(self.settings.pad_value))
        starts = [monai_starts(s, p, float(self.settings.overlap)) for s, p in zip(padded.shape[1:], roi, strict=True)]
        with _no_tf32(self.device.type == "cuda" and not self.amp):
            out = sliding_window(
                padded,
                self._ensemble,
                roi,
                starts,
                constant(roi),
                out_channels=1 + len(self.networks),
                batch_size=self.batch_size,
                device=self.device,
                amp=self.amp,
            )
        return out[crop]

    # -- stage 3: back on the DWI grid, sigmoid of the mean logit, the reference's decision --------------------
    # A model's vote: the same decision on its own blended w_i * logit_i (sigmoid(logit_i) >= 0.5 for threshold 0).
    def export(self, out: torch.Tensor, context: FactorizerContext) -> MemberResult:
        votes = VoteCount()
        for i in range(1, out.shape[0]):
            each = from_network_grid(out[i : i + 1], context.shape, context.resized, self.settings)
            votes.add(each >= self.settings.threshold_logit)
        scaled = from_network_grid(out[:1], context.shape, context.resized, self.settings)
        logit = scaled / np.float32(np.mean(self.weights))
        prob = (1.0 / (1.0 + np.exp(-logit.astype(np.float64)))).astype(np.float32)
        return self.result(match_decision(prob, scaled >= self.settings.threshold_logit), context, votes)

    def report_info(self) -> dict:
        return {
            **super().report_info(),
            "models": list(self.model_names),
            "fast": self.fast,
            "eval_mode": True,
            "note": "networks in eval mode; DeepISLES runs them in training mode (dropout on)",
        }
