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

``predict`` returns ``sigmoid(mean logit)`` on the DWI grid (the blended scaled logit divided by the mean
ensemble weight), nudged by one ulp where needed so that ``>= 0.5`` is exactly the reference decision
``scaled logit >= 0``.

``fast=True`` (no counterpart in DeepISLES, whose fast mode skips FACTORIZER) runs only the architectures
listed as ``fast_archs`` in ``member.json`` (by default the 5 Res-U-Nets, about 5x cheaper than the Swin
Factorizers); its decision is then not the reference one.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from deepisles.engine.sliding_window import constant, monai_starts, pad_to_patch, sliding_window
from deepisles.io.image import Image
from deepisles.members.base import Case, Member, MemberUnavailable, read_stored_member, weights_origin

log = logging.getLogger(__name__)

NAME = "factorizer"

# The reference configuration (DeepISLES src/FACTORIZER/predict.py); the importer stores it in member.json.
DEFAULT_CONFIG: dict = {
    "inputs": ["dwi", "adc", "flair"],
    "normalize": {"nonzero": True, "channel_wise": True},
    "spacing": [2.0, 2.0, 2.0],
    "resize": {"mode": "trilinear", "align_corners": False},
    "roi_size": [64, 64, 64],
    "overlap": 0.5,
    "blend_mode": "constant",
    "sw_batch_size": 1,
    "pad_value": 0.0,
    "ensemble_weight": 0.1,
    "threshold_logit": 0.0,
    "fast_archs": ["resunet"],
    "amp": True,
}


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


def network_input(config: dict, case: Case, label: np.ndarray | None = None):
    """The networks' input, shared by inference and training: [DWI, ADC, FLAIR] on the DWI grid, z-scored on
    their non-zero voxels at native resolution, resized to ``spacing`` (``F.interpolate``).

    Returns ``(x (C, *S) float32 tensor, label (*S) uint8 or None, resized shape or None)``; ``label`` (on the
    DWI grid) is resized with the same call and thresholded at 0.5.
    """
    cfg = {**DEFAULT_CONFIG, **config}
    dwi = case.dwi
    chans = []
    for role in cfg["inputs"]:
        img = case.modality(role)
        chans.append(np.asarray(dwi.data, dtype=np.float32) if role == "dwi" else _on_dwi_grid(img, dwi, role.upper()))
    stack = normalize_nonzero(np.ascontiguousarray(np.stack(chans)))
    x = torch.from_numpy(stack)[None]
    new = resized_shape(tuple(dwi.shape[:3]), dwi.spacing, cfg["spacing"])
    mode, align = cfg["resize"]["mode"], cfg["resize"]["align_corners"]
    if new is not None:
        x = F.interpolate(x, size=new, mode=mode, align_corners=align)
    lab = None
    if label is not None:
        y = torch.from_numpy(np.asarray(label, dtype=np.float32))[None, None]
        if new is not None:
            y = F.interpolate(y, size=new, mode=mode, align_corners=align)
        lab = (y[0, 0] >= 0.5).numpy().astype(np.uint8)
    return x[0], lab, new


class FactorizerMember(Member):
    name = NAME
    modalities = ("dwi", "adc", "flair")
    required = ("dwi", "adc", "flair")
    description = (
        "FACTORIZER (ISLES'22): 5-fold Res-U-Net + Swin Factorizer ensemble on DWI, ADC and FLAIR at 2 mm, "
        "64^3 sliding windows; networks in eval mode (DeepISLES leaves dropout on)"
    )

    def __init__(self, meta: dict, folder: Path | None, device: str = "cpu", fast: bool = False,
                 batch_size: int | None = None, amp: bool | None = None,
                 networks: list[torch.nn.Module] | None = None):  # fmt: skip
        """``meta`` is the member.json; the networks are read from ``folder``, or given as ``networks`` (one per
        entry of ``meta["models"]``, e.g. while training)."""
        from deepisles.members.nets.factorizer_nets import UnsupportedConfig, build_network

        self.config = {**DEFAULT_CONFIG, **{k: v for k, v in meta.items() if k in DEFAULT_CONFIG}}
        self.device = torch.device(device)
        self.fast = bool(fast)
        self.amp = bool(self.config["amp"] if amp is None else amp) and self.device.type == "cuda"
        self.batch_size = batch_size or (4 if self.device.type == "cuda" else 2)
        entries = list(meta.get("models", []))
        if self.fast:
            entries = [m for m in entries if m.get("arch") in self.config["fast_archs"]]
        if not entries:
            raise MemberUnavailable(NAME, "member.json lists no models; re-import the weights")
        self.models, self.model_names = [], []
        if networks is not None:
            self.models = [net.to(self.device) for net in networks]
            self.model_names = [m.get("name", m["file"]) for m in entries]
            entries = entries[: len(self.models)]
        for m in entries if networks is None else []:
            try:
                net = build_network(m["network"])
            except UnsupportedConfig as exc:
                raise MemberUnavailable(NAME, f"{m.get('name')}: unsupported configuration ({exc})") from None
            net.load_state_dict(load_file(str(Path(folder) / m["file"])), strict=True)
            net.eval().requires_grad_(False).to(self.device)
            self.models.append(net)
            self.model_names.append(m.get("name", m["file"]))
        # DeepISLES: Ensemble(weights=[0.1] * 10, reduction=torch.mean) -> mean_i(w_i * logit_i)
        self.weights = [float(m.get("ensemble_weight", self.config["ensemble_weight"])) for m in entries]

    @classmethod
    def from_store(cls, device: str = "cpu", fast: bool = False, **kwargs) -> FactorizerMember:
        meta, folder = read_stored_member(NAME)
        member = cls(meta, folder, device=device, fast=fast, **kwargs)
        member.weights_origin = weights_origin(meta)
        return member

    # --- inference -------------------------------------------------------------------------------
    def _ensemble(self, x: torch.Tensor) -> torch.Tensor:
        """``ft.Ensemble.forward``: mean over the models of ``weight * logit`` (float32)."""
        acc = None
        for w, net in zip(self.weights, self.models, strict=True):
            out = w * net(x).float()
            acc = out if acc is None else acc + out
        return acc / len(self.models)

    def scaled_logit(self, case: Case) -> np.ndarray:
        """The reference's ensemble output on the DWI grid: ``mean_i(w_i * logit_i)`` (float32)."""
        self.check_inputs(case)
        x, _, new = network_input(self.config, case)
        x = x[None].to(self.device)
        shape = tuple(case.dwi.shape[:3])
        mode, align = self.config["resize"]["mode"], self.config["resize"]["align_corners"]
        roi = [int(r) for r in self.config["roi_size"]]
        padded, crop = pad_to_patch(x[0], roi, value=float(self.config["pad_value"]))
        starts = [
            monai_starts(s, p, float(self.config["overlap"]))
            for s, p in zip(padded.shape[1:], roi, strict=True)
        ]
        with _no_tf32(self.device.type == "cuda" and not self.amp):
            out = sliding_window(
                padded,
                self._ensemble,
                roi,
                starts,
                constant(roi),
                out_channels=1,
                batch_size=self.batch_size,
                device=self.device,
                amp=self.amp,
            )
        out = out[crop][None]
        if new is not None:
            out = F.interpolate(out, size=shape, mode=mode, align_corners=align)
        return out[0, 0].float().cpu().numpy()

    def predict(self, case: Case) -> np.ndarray:
        scaled = self.scaled_logit(case)
        logit = scaled / np.float32(np.mean(self.weights))
        prob = (1.0 / (1.0 + np.exp(-logit.astype(np.float64)))).astype(np.float32)
        below = np.float32(np.nextafter(np.float32(0.5), np.float32(0.0)))
        positive = scaled >= self.config["threshold_logit"]
        prob[~positive & (prob >= 0.5)] = below
        prob[positive & (prob < 0.5)] = np.float32(0.5)
        return prob

    def report_info(self) -> dict:
        return {
            **super().report_info(),
            "models": list(self.model_names),
            "fast": self.fast,
            "eval_mode": True,
            "note": "networks in eval mode; DeepISLES runs them in training mode (dropout on)",
        }
