"""Sliding-window inference with batched windows, the window placements and blending weights of
nnU-Net v1 and MONAI, and batched test-time mirroring.

Members choose the placement rule (``nnunet_starts`` or ``monai_starts``) and the weighting
(``nnunet_gaussian``, ``monai09_gaussian`` or ``constant``) that their reference implementation uses, so
that results match it; the accumulation loop is the same for all.
"""

from __future__ import annotations

import contextvars
import itertools
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from deepisles.progress import Progress

Predict = Callable[[torch.Tensor], torch.Tensor]


# --- window placement ---------------------------------------------------------------------------
def nnunet_starts(size: int, patch: int, step: float = 0.5) -> list[int]:
    """nnU-Net v1 `_compute_steps_for_sliding_window` along one axis (image already >= patch)."""
    if size < patch:
        raise ValueError("pad the image to at least the patch size first")
    target = patch * step
    num = int(np.ceil((size - patch) / target)) + 1
    if num == 1:
        return [0]
    actual = (size - patch) / (num - 1)
    return [int(np.round(actual * i)) for i in range(num)]


def monai_starts(size: int, patch: int, overlap: float) -> list[int]:
    """MONAI `dense_patch_slices` with `_get_scan_interval` along one axis (image already >= patch)."""
    if size < patch:
        raise ValueError("pad the image to at least the patch size first")
    interval = patch if patch == size else max(int(patch * (1 - overlap)), 1)
    num = int(np.ceil(size / interval))
    count = next((d + 1 for d in range(num) if d * interval + patch >= size), 1)
    return [i * interval - max(i * interval + patch - size, 0) for i in range(count)]


# --- padding ------------------------------------------------------------------------------------
def pad_to_patch(x: torch.Tensor, patch: Sequence[int], value: float = 0.0) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad the spatial axes of ``x`` (C, *S) to at least ``patch``: half below, the rest above
    (nnU-Net's `pad_nd_image` and MONAI's sliding window agree on this). Returns the slicer undoing it."""
    spatial = x.shape[1:]
    pads, slicer = [], [slice(None)]
    for s, p in zip(spatial, patch, strict=True):
        diff = max(p - s, 0)
        lo = diff // 2
        pads.append((lo, diff - lo))
        slicer.append(slice(lo, lo + s))
    if any(a or b for a, b in pads):
        flat = [v for a, b in reversed(pads) for v in (a, b)]
        x = torch.nn.functional.pad(x, flat, mode="constant", value=value)
    return x, tuple(slicer)


# --- blending weights ---------------------------------------------------------------------------
def nnunet_gaussian(patch: Sequence[int], sigma_scale: float = 1.0 / 8) -> torch.Tensor:
    """nnU-Net v1 `_get_gaussian`: a Gaussian-filtered delta, max 1, zeros raised to the smallest nonzero."""
    tmp = np.zeros(patch)
    tmp[tuple(p // 2 for p in patch)] = 1
    g = gaussian_filter(tmp, [p * sigma_scale for p in patch], 0, mode="constant", cval=0)
    g = g / np.max(g)
    g = g.astype(np.float32)
    g[g == 0] = np.min(g[g != 0])
    return torch.from_numpy(g)


def _gaussian_1d_erf(sigma: float, truncated: float = 4.0) -> torch.Tensor:
    """``monai.networks.layers.convutils.gaussian_1d(approx="erf")`` (0.9.0), float32, not normalised."""
    s = torch.as_tensor(sigma, dtype=torch.float)
    tail = int(max(float(s) * truncated, 0.5) + 0.5)
    x = torch.arange(-tail, tail + 1, dtype=torch.float)
    t = 0.70710678 / torch.abs(s)
    return (0.5 * ((t * (x + 0.5)).erf() - (t * (x - 0.5)).erf())).clamp(min=0)


def monai09_gaussian(patch: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """Importance map of MONAI 0.9.0 sliding windows (``compute_importance_map(mode="gaussian")`` followed by
    the clamp in ``sliding_window_inference``).

    0.9.0 blurs a delta at ``size // 2`` with ``GaussianFilter`` (erf-discretised kernel, truncated at 4
    sigma, zero padding), so for even sizes the peak is at ``size // 2``, not at ``(size - 1) / 2`` as in
    MONAI >= 0.9.1 / 1.x; values then go through max-normalisation and
    ``clamp(min=max(min_nonzero, 1e-3))``.
    """
    patch = tuple(int(p) for p in patch)
    g = None
    for axis, p in enumerate(patch):
        k = _gaussian_1d_erf(p * sigma_scale)
        tail = (k.numel() - 1) // 2
        centre = p // 2
        idx = torch.arange(p) - centre + tail  # conv of a delta at `centre` with the symmetric kernel
        v = torch.zeros(p, dtype=torch.float)
        ok = (idx >= 0) & (idx < k.numel())
        v[ok] = k[idx[ok]]
        shape = [1] * len(patch)
        shape[axis] = p
        v = v.reshape(shape)
        g = v if g is None else g * v
    g = g / torch.max(g)
    min_non_zero = max(float(g[g != 0].min()), 1e-3)
    return torch.clamp(g, min=min_non_zero)


def constant(patch: Sequence[int]) -> torch.Tensor:
    return torch.ones(tuple(patch), dtype=torch.float32)


# --- precision ----------------------------------------------------------------------------------
CPU_PRECISIONS = ("fp32", "bf16")
_CPU_PRECISION: contextvars.ContextVar[str] = contextvars.ContextVar("deepisles_cpu_precision", default="fp32")


@contextmanager
def cpu_precision(precision: str):
    """Within the block, CPU inference runs in ``precision``: ``fp32`` (default, the reference arithmetic) or
    ``bf16`` (bfloat16 autocast; opt-in ``--precision bf16``, see :func:`check_cpu_bf16`)."""
    if precision not in CPU_PRECISIONS:
        raise ValueError(f"CPU precision {precision!r}: expected one of {CPU_PRECISIONS}")
    token = _CPU_PRECISION.set(precision)
    try:
        yield
    finally:
        _CPU_PRECISION.reset(token)


def cpu_bf16_support() -> str | None:
    """The CPU's bfloat16 instructions (``amx_bf16`` / ``avx512_bf16`` from /proc/cpuinfo), or None."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text(errors="replace").split())
    except OSError:  # not Linux: unknown, treated as absent
        return None
    for flag in ("amx_bf16", "avx512_bf16"):
        if flag in flags:
            return flag
    return None


def autocast(device: torch.device | str, amp: bool):
    """float16 autocast on CUDA when ``amp`` (as nnU-Net and MONAI run the references). On CPU plain float32,
    unless the caller opted into bfloat16 (:func:`cpu_precision`)."""
    device = torch.device(device)
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    if device.type == "cpu" and _CPU_PRECISION.get() == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


# --- test-time mirroring ------------------------------------------------------------------------
def mirror_sets(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """All subsets of the spatial axes to flip, identity first (nnU-Net's 8 mirrors for 3 axes)."""
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def with_mirroring(
    predict: Predict,
    axes: Sequence[int] = (0, 1, 2),
    nonlin: Callable[[torch.Tensor], torch.Tensor] | None = None,
    max_batch: int | None = None,
) -> Predict:
    """Wrap ``predict`` so each window batch is run under every flip of ``axes`` (spatial axes, 0-based),
    in one batch (chunked to ``max_batch``), ``nonlin`` applied per flip, un-flipped and averaged."""
    flips = mirror_sets(axes)

    def run(x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        batch = torch.cat([x.flip([a + 2 for a in f]) if f else x for f in flips], 0)
        step = max_batch or batch.shape[0]
        outs = torch.cat([predict(batch[i : i + step]) for i in range(0, batch.shape[0], step)], 0)
        if nonlin is not None:
            outs = nonlin(outs)
        acc = None
        for k, f in enumerate(flips):
            o = outs[k * b : (k + 1) * b].float()
            o = o.flip([a + 2 for a in f]) if f else o
            acc = o if acc is None else acc + o
        return acc / len(flips)

    return run


# --- the loop -----------------------------------------------------------------------------------
@torch.inference_mode()
def sliding_window(
    image: torch.Tensor,
    predict: Predict,
    patch: Sequence[int],
    starts: Sequence[Sequence[int]],
    importance: torch.Tensor,
    out_channels: int,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    amp: bool = False,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Blend ``predict`` over windows of ``image`` (C, *S), already padded to >= patch.

    ``starts`` lists the window start per spatial axis; windows are sent to ``device`` in batches of
    ``batch_size``. Returns the weighted average (out_channels, *S), float32, on ``device``.
    """
    device = torch.device(device)
    spatial = tuple(image.shape[1:])
    patch = tuple(int(p) for p in patch)
    image = image.to(device)
    w = importance.to(device=device, dtype=torch.float32)
    acc = torch.zeros((out_channels, *spatial), dtype=torch.float32, device=device)
    norm = torch.zeros(spatial, dtype=torch.float32, device=device)
    windows = list(itertools.product(*starts))
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        sl = [tuple(slice(s, s + p) for s, p in zip(st, patch, strict=True)) for st in chunk]
        batch = torch.stack([image[(slice(None), *s)] for s in sl])
        with autocast(device, amp):
            out = predict(batch)
        out = out.float()
        for k, s in enumerate(sl):
            acc[(slice(None), *s)] += out[k] * w
            norm[s] += w
        if progress is not None:  # windows done of all (deepisles.progress)
            progress.advance(min(i + batch_size, len(windows)), len(windows))
    return acc / norm
