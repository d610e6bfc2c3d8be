"""What training needs to know about each member: its configuration (member.json), how to build its network,
how a case becomes a training sample (the member's own inference preprocessing), its loss, a runtime member
for validation, and how trained weights are written back in the store format.

Compact recipes (``compact_meta``) are the default-model architectures: the same families as the official
members with fewer channels, at 2 mm, 64^3 windows.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from deepisles.errors import DeepIslesError
from deepisles.members.base import Case, Member, MemberUnavailable

MEMBERS = ("seals", "nvauto", "factorizer")

_PATCH = [64, 64, 64]

# --- compact recipes (the default ensemble) --------------------------------------------------------
SEALS_COMPACT = {
    "inputs": ["dwi", "adc"],
    "folds": [0],
    "network": {
        "input_channels": 2, "base_num_features": 8, "num_classes": 2,
        "pool_op_kernel_sizes": [[2, 2, 2]] * 4, "conv_kernel_sizes": [[3, 3, 3]] * 5,
        "conv_per_stage": 2, "feat_map_mul_on_downscale": 2.0, "max_num_features": 128,
        "norm_eps": 1e-5, "negative_slope": 0.01,
    },
    "preprocessing": {
        "deepisles_spacing_mm": [1.0, 1.0, 1.0], "target_spacing": [2.0, 2.0, 2.0],
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "normalization_schemes": ["nonCT", "nonCT"], "use_mask_for_norm": [True, True],
        "intensity_properties": None, "resample_order_data": 3, "resample_order_seg": 1,
        "separate_z_anisotropy_threshold": 3.0,
    },
    "inference": {"patch_size": _PATCH, "step_size": 0.5, "mirror_axes": [], "gaussian_sigma_scale": 0.125,
                  "mixed_precision": True},
    "export": {"interpolation_order": 1, "interpolation_order_z": 0, "force_separate_z": None,
               "softmax_dtype": "float16"},
}  # fmt: skip

NVAUTO_COMPACT = {
    "inputs": ["adc", "dwi"],
    "architecture": "MONAI SegResNet",
    "network": {"class": "SegResNet", "kwargs": {
        "spatial_dims": 3, "in_channels": 2, "out_channels": 2, "init_filters": 8,
        "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1], "dropout_prob": None,
    }},
    "config": {"pixdim": [2.0, 2.0, 2.0], "roi_size": _PATCH, "overlap": 0.5, "sw_batch_size": 2, "fast_models": [0]},
    "models": [],
}  # fmt: skip

_F_CONV = {"ref": "torch.nn.modules.conv.Conv3d"}
FACTORIZER_COMPACT = {
    "inputs": ["dwi", "adc", "flair"],
    "roi_size": _PATCH,
    "overlap": 0.5,
    "ensemble_weight": 1.0,
    "models": [],
    "network": {"partial": {"ref": "factorizer.unet.UNet"}, "args": [], "kwargs": {
        "in_channels": 3, "out_channels": 1, "spatial_dims": 3,
        "encoder_depth": [1, 1, 1, 1, 1], "encoder_width": [8, 16, 32, 64, 128], "strides": [1, 2, 2, 2, 2],
        "decoder_depth": [1, 1, 1, 1],
        "stem": [_F_CONV, {"kernel_size": 3, "padding": 1, "bias": False}],
        "downsample": [_F_CONV, {"kernel_size": 2, "bias": False}],
        "upsample": [{"ref": "torch.nn.modules.conv.ConvTranspose3d"}, {"kernel_size": 2}],
        "head": [_F_CONV, {"kernel_size": 1}], "num_deep_supr": 1,
        "block": {"object": "factorizer.unet.Same", "state": {"block": [
            {"ref": "factorizer.unet.BasicBlock"},
            {"conv": [_F_CONV, {"kernel_size": 3, "padding": 1}],
             "norm": [{"ref": "torch.nn.modules.normalization.GroupNorm"}, [8]],
             "act": {"ref": "torch.nn.modules.activation.LeakyReLU"}}]}},
    }},
}  # fmt: skip


def compact_meta(member: str) -> dict:
    return copy.deepcopy({"seals": SEALS_COMPACT, "nvauto": NVAUTO_COMPACT, "factorizer": FACTORIZER_COMPACT}[member])


# --- the adapters -------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One case on the network's grid: image (C, *S) float32 and label (*S) uint8."""

    image: np.ndarray
    label: np.ndarray
    case_id: str = ""


class Trainable:
    """Base: a member's configuration plus one network being trained (one fold / one ensemble model)."""

    name = ""
    out_channels = 2

    def __init__(self, meta: dict, network: torch.nn.Module, fold: int):
        self.meta, self.network, self.fold = meta, network, int(fold)
        self.patch_override: list[int] | None = None

    @property
    def train_patch(self) -> list[int]:
        """Training patch: the inference window unless overridden (``--patch``)."""
        return self.patch_override or self.patch

    # training
    @property
    def patch(self) -> list[int]:
        raise NotImplementedError

    def sample(self, case: Case, label: np.ndarray, case_id: str = "") -> Sample:
        raise NotImplementedError

    def loss(self):
        from monai.losses import DiceCELoss

        return DiceCELoss(to_onehot_y=True, softmax=True, batch=True)

    def needs_flair(self) -> bool:
        return "flair" in self.meta.get("inputs", [])

    # validation / export
    def runtime(self, device: str = "cpu") -> Member:
        raise NotImplementedError

    def weight_file(self) -> str:
        raise NotImplementedError

    def save_weights(self, path: Path) -> None:
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.network.state_dict().items()}
        save_file(state, str(path))

    def member_meta(self, folds: dict[int, str]) -> dict:
        """member.json (without ``files``) for the given ``{fold: weight file}``."""
        raise NotImplementedError


class SealsTrainable(Trainable):
    name = "seals"

    @property
    def patch(self) -> list[int]:
        return [int(p) for p in self.meta["inference"]["patch_size"]]

    def sample(self, case, label, case_id=""):
        from deepisles.members.seals import network_input

        data, lab, _ = network_input(self.meta, case, label)
        return Sample(data.astype(np.float32), lab, case_id)

    def runtime(self, device="cpu"):
        from deepisles.members.seals import SealsMember

        return SealsMember([self.network], {**self.meta, "folds": [self.fold]}, device=device)

    def weight_file(self):
        return f"fold_{self.fold}.safetensors"

    def member_meta(self, folds):
        return {**{k: v for k, v in self.meta.items() if k != "files"}, "folds": sorted(folds)}


class NvautoTrainable(Trainable):
    name = "nvauto"

    @property
    def config(self) -> dict:
        from deepisles.members.nvauto import DEFAULT_CONFIG

        return {**DEFAULT_CONFIG, **self.meta.get("config", {})}

    @property
    def patch(self) -> list[int]:
        return [int(p) for p in self.config["roi_size"]]

    def sample(self, case, label, case_id=""):
        from deepisles.members.nvauto import network_input

        img, lab, _, _ = network_input(self.config, case, label)
        return Sample(img.numpy().astype(np.float32), lab, case_id)

    def runtime(self, device="cpu"):
        from deepisles.members.nvauto import NvautoMember

        return NvautoMember([self.network], self.config, device=device)

    def weight_file(self):
        return f"model{self.fold}.safetensors"  # official or not: deepisles' SegResNet, tensors only

    def member_meta(self, folds):
        meta = {k: v for k, v in self.meta.items() if k != "files"}
        meta["models"] = [folds[k] for k in sorted(folds)]
        meta["config"] = {**meta.get("config", {}), "fast_models": [0]}
        return meta


class FactorizerTrainable(Trainable):
    name = "factorizer"
    out_channels = 1

    @property
    def patch(self) -> list[int]:
        from deepisles.members.factorizer import DEFAULT_CONFIG

        return [int(p) for p in self.meta.get("roi_size", DEFAULT_CONFIG["roi_size"])]

    def loss(self):
        from monai.losses import DiceCELoss

        return DiceCELoss(sigmoid=True, batch=True)

    def sample(self, case, label, case_id=""):
        from deepisles.members.factorizer import network_input

        x, lab, _ = network_input(self.meta, case, label)
        return Sample(x.numpy().astype(np.float32), lab, case_id)

    def _entry(self, file: str, fold: int) -> dict:
        arch = self.meta.get("arch", "resunet")
        return {"name": f"fold{fold}_{arch}", "fold": fold, "arch": arch, "file": file,
                "network": self.meta["network"], "ensemble_weight": float(self.meta.get("ensemble_weight", 1.0))}

    def runtime(self, device="cpu"):
        from deepisles.members.factorizer import FactorizerMember

        meta = {**self.meta, "models": [self._entry(self.weight_file(), self.fold)]}
        return FactorizerMember(meta, None, device=device, networks=[self.network])

    def weight_file(self):
        return f"fold{self.fold}_{self.meta.get('arch', 'resunet')}.safetensors"

    def member_meta(self, folds):
        meta = {k: v for k, v in self.meta.items() if k not in ("files", "network", "arch")}
        meta["models"] = [self._entry(folds[k], k) for k in sorted(folds)]
        return meta


_CLASSES = {"seals": SealsTrainable, "nvauto": NvautoTrainable, "factorizer": FactorizerTrainable}


# --- building the network to train ----------------------------------------------------------------
def _seals_from(meta: dict, folder: Path | None, fold: int) -> tuple[dict, torch.nn.Module]:
    from deepisles.members.nets.generic_unet import build

    net = build(meta["network"])
    if folder is not None:
        folds = list(meta.get("folds", []))
        k = fold if fold in folds else folds[0]
        net.load_state_dict(load_file(str(folder / f"fold_{k}.safetensors")), strict=True)
    return meta, net


def _nvauto_from(meta: dict, folder: Path | None, fold: int) -> tuple[dict, torch.nn.Module]:
    from deepisles.members.nvauto import build_segresnet, load_model

    if folder is None:
        return meta, build_segresnet(meta["network"])
    names = list(meta.get("models") or [])
    if not names:
        raise DeepIslesError(f"{folder}: member.json lists no NVAUTO models")
    name = names[fold % len(names)]
    try:  # our SegResNet from meta["network"] + the stored safetensors (the imported official ones included)
        net = load_model(folder, name, meta, torch.device("cpu"))
    except MemberUnavailable as exc:
        raise DeepIslesError(exc.reason) from None
    net.train().requires_grad_(True)
    return meta, net


def _factorizer_from(meta: dict, folder: Path | None, fold: int, arch: str) -> tuple[dict, torch.nn.Module]:
    from deepisles.members.nets.factorizer_nets import UnsupportedConfig, build_network

    if folder is None:
        spec = meta["network"]
        try:
            return {**meta, "arch": arch}, build_network(spec)
        except UnsupportedConfig as exc:
            raise DeepIslesError(f"factorizer network: {exc}") from None
    entries = [m for m in meta.get("models", []) if m.get("arch") == arch]
    if not entries:
        raise DeepIslesError(f"{folder}: no FACTORIZER {arch} model to start from")
    entry = next((m for m in entries if m.get("fold") == fold), entries[0])
    net = build_network(entry["network"])
    net.load_state_dict(load_file(str(folder / entry["file"])), strict=True)
    base = {k: v for k, v in meta.items() if k not in ("models", "files", "origin")}
    return {**base, "network": entry["network"], "arch": arch,
            "ensemble_weight": float(entry.get("ensemble_weight", meta.get("ensemble_weight", 1.0)))}, net


def make_trainable(member: str, init: str = "none", fold: int = 0, arch: str = "resunet") -> Trainable:
    """The network to train for ``member`` and where it starts: ``none`` (the compact recipe, random weights),
    ``default`` (the packaged default model), ``official`` (the imported official weights in the store)."""
    if member not in MEMBERS:
        raise DeepIslesError(f"unknown member {member!r}; choose from {', '.join(MEMBERS)}")
    if init == "none":
        meta, folder = compact_meta(member), None
    elif init in ("official", "default"):
        from deepisles.weights import store

        if init == "official":
            try:
                meta, folder = store.read_member(member)
            except FileNotFoundError:
                raise DeepIslesError(f"--init official: no {member} weights installed; run "
                                     "`deepisles weights import PATH` first") from None
        else:
            from deepisles.members.base import DEFAULT_MODELS_DIR, has_default_model

            if not has_default_model(member):
                raise DeepIslesError(f"--init default: no packaged default model for {member}")
            meta, folder = store.read_member_folder(DEFAULT_MODELS_DIR / member)
        meta = {k: v for k, v in meta.items() if k not in ("files", "origin")}
    else:
        raise DeepIslesError(f"unknown --init {init!r}; choose none, default or official")
    if member == "seals":
        meta, net = _seals_from(meta, folder, fold)
    elif member == "nvauto":
        meta, net = _nvauto_from(meta, folder, fold)
    else:
        meta, net = _factorizer_from(meta, folder, fold, arch)
    return _CLASSES[member](meta, net, fold)
