"""The FACTORIZER member's networks: Res-U-Net and Swin Factorizer, rebuilt in plain torch.

Both are instances of the generic U-Net of the ``factorizer`` 0.0.1 package that DeepISLES vendors
(``src/FACTORIZER/model/factorizer/factorizer/{unet,factorizer}.py``): a stem convolution, an encoder of
``(downsample, block)`` levels, a decoder of ``(upsample, concat skip, block)`` levels and one 1x1 head per
deep-supervision level. Res-U-Net uses ``BasicBlock`` (conv-drop-norm-act x2 + shortcut); Swin Factorizer
(``SegmentationFactorizer``) uses ``FactorizerBlock``: residual ``LayerNorm -> FactorizerSubblock`` (linear,
shifted-window matricize, ReLU, rank-R NMF by HALS iterations, inverse matricize, linear) and residual
``LayerNorm -> MLP``, plus a learnable positional embedding at the bridge.

Module and parameter names are those of the reference, so the state dicts of the official checkpoints (with
their ``net.`` prefix removed) load with ``strict=True``. Everything is built from the network
hyper-parameters that ``weights/import_factorizer.py`` stores as JSON; nothing about widths, depths, patch
or window sizes is hard-coded here.

The JSON form of a hyper-parameter value (written by the importer) is:

* ``{"ref": "pkg.module.Name"}``: a class or function (``nn.Conv3d``, ``ft.BasicBlock``, ...);
* ``{"partial": <ref>, "args": [...], "kwargs": {...}}``: a ``functools.partial``;
* ``{"object": "pkg.module.Name", "args": [...], "kwargs": {...}, "state": {...}}``: an instance
  (e.g. ``ft.Same``);
* lists, dicts, strings, numbers, booleans and null as themselves.

A ``[callable, args..., kwargs...]`` list is read as ``factorizer.utils.wrap_class`` reads it (sequences
extend the positional arguments, dicts update the keyword arguments).

Only inference is implemented (``forward`` returns the first head's logits, which is what
``SemanticSegmentation.forward`` uses). Dropout layers exist (they keep the module indices of the reference)
but the member runs the networks in eval mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["UnsupportedConfig", "build_network", "describe_network", "spec_name"]


class UnsupportedConfig(ValueError):
    """The stored configuration uses a part of the factorizer package that is not reimplemented here."""


# --- reading the JSON specification -----------------------------------------------------------------
def spec_name(spec: Any) -> str | None:
    """The dotted name of a callable spec (``{"ref": ...}``, partial, ``[ref, ...]``), else None."""
    if isinstance(spec, dict):
        if "ref" in spec:
            return str(spec["ref"])
        if "partial" in spec:
            return spec_name(spec["partial"])
    if isinstance(spec, list) and spec and _is_callable(spec[0]):
        return spec_name(spec[0])
    return None


def _short(name: str | None) -> str:
    return (name or "").rsplit(".", 1)[-1]


def _is_callable(spec: Any) -> bool:
    return isinstance(spec, dict) and ("ref" in spec or "partial" in spec)


def unwrap(spec: Any) -> tuple[str, list, dict]:
    """(dotted name, positional args, keyword args) of a callable spec, as ``wrap_class`` would bind them."""
    if isinstance(spec, dict) and "ref" in spec:
        return str(spec["ref"]), [], {}
    if isinstance(spec, dict) and "partial" in spec:
        name, args, kwargs = unwrap(spec["partial"])
        return name, [*args, *spec.get("args", [])], {**kwargs, **spec.get("kwargs", {})}
    if isinstance(spec, list) and spec and _is_callable(spec[0]):
        name, args, kwargs = unwrap(spec[0])
        args, kwargs = list(args), dict(kwargs)
        for a in spec[1:]:
            if isinstance(a, list):
                args.extend(a)
            elif isinstance(a, dict) and not _is_callable(a):
                kwargs.update(a)
        return name, args, kwargs
    raise UnsupportedConfig(f"expected a class specification, got {_brief(spec)}")


def _brief(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) < 120 else text[:117] + "..."


def _tuple(x: Any, n: int) -> tuple:
    if isinstance(x, (list, tuple)):
        if len(x) != n:
            raise UnsupportedConfig(f"expected {n} values, got {x}")
        return tuple(x)
    return (x,) * n


# torch.nn building blocks that the configurations may name (by class name, from torch.nn only).
_TORCH_NN = {
    "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
    "GroupNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d", "InstanceNorm2d",
    "InstanceNorm3d", "LayerNorm", "LeakyReLU", "ReLU", "ReLU6", "GELU", "SiLU", "ELU", "PReLU", "Sigmoid",
    "Tanh", "Identity", "Dropout", "Dropout2d", "Dropout3d",
}  # fmt: skip


def torch_factory(spec: Any) -> Callable[..., nn.Module]:
    """A constructor for a ``torch.nn`` spec with its bound arguments (``wrap_class`` semantics)."""
    name, args, kwargs = unwrap(spec)
    short = _short(name)
    if not name.startswith("torch.nn.") or short not in _TORCH_NN:
        raise UnsupportedConfig(f"torch layer {name} is not supported")
    cls = getattr(nn, short)

    def make(*a, **k):
        return cls(*args, *a, **{**kwargs, **k})

    make.cls = cls  # type: ignore[attr-defined]
    return make


def _raw_torch_class(spec: Any) -> type[nn.Module]:
    """``conv[0]`` in the reference: the class of a ``[class, kwargs]`` spec, without its arguments."""
    if isinstance(spec, list) and spec:
        spec = spec[0]
    return torch_factory(spec).cls  # type: ignore[attr-defined]


# --- channels-first layers (factorizer.layers) -------------------------------------------------------
class Linear(nn.Module):
    """``factorizer.layers.Linear``: a 1x1 Conv1d over the flattened spatial axes."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.flatten = nn.Flatten(start_dim=2)
        self.linear = nn.Conv1d(in_features, out_features, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = self.linear(self.flatten(x))
        return out.reshape(shape[0], -1, *shape[2:])


class LayerNorm(nn.Module):
    """``factorizer.layers.LayerNorm``: LayerNorm over the channel axis of a channels-first tensor."""

    def __init__(self, dim: int, **kwargs):
        super().__init__()
        self.norm = nn.LayerNorm(dim, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class MLP(nn.Module):
    """``factorizer.layers.MLP``: Linear - GELU - Dropout - Linear - Dropout."""

    def __init__(self, input_dim, output_dim=None, hidden_dim=None, ratio=2, dropout=0.0, **_):
        super().__init__()
        output_dim = input_dim if output_dim is None else output_dim
        hidden_dim = int(ratio * input_dim) if hidden_dim is None else hidden_dim
        d0, d1 = _tuple(dropout, 2)
        self.block = nn.Sequential(
            Linear(input_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(d0),
            Linear(hidden_dim, output_dim),
            nn.Dropout(d1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class PosEmbed(nn.Module):
    """``factorizer.PosEmbed``: a learnable additive embedding of shape (1, C, *spatial)."""

    def __init__(self, input_dim: int, spatial_size: Sequence[int], dropout: float = 0.0, **_):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, input_dim, *spatial_size))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x + self.pos)


# --- (shifted-window) matricize ----------------------------------------------------------------------
_INDEX_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _window_index(spatial, g, p, shifts, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat spatial gather index of one (shifted) window partition, and its inverse permutation.

    ``idx[k]`` is the input voxel that lands at position ``k`` of ``(g0 g1 ...) (p0 p1 ...)`` after
    ``torch.roll(x, shifts)``; cached per grid, shift and device (the networks share them).
    """
    key = (tuple(spatial), tuple(g), tuple(p), shifts, str(device))
    if key not in _INDEX_CACHE:
        n = math.prod(spatial)
        grid = torch.arange(n).reshape(spatial)
        if shifts is not None:
            grid = torch.roll(grid, shifts, tuple(range(len(spatial))))
        split = [v for gi, pi in zip(g, p, strict=True) for v in (gi, pi)]
        nd = len(spatial)
        idx = grid.reshape(split).permute(*range(0, 2 * nd, 2), *range(1, 2 * nd, 2)).reshape(-1)
        inv = torch.empty_like(idx)
        inv[idx] = torch.arange(n)
        _INDEX_CACHE[key] = (idx.to(device), inv.to(device))
    return _INDEX_CACHE[key]


class Matricize(nn.Module):
    """``factorizer.Matricize``: ``b (h d) (g0 p0) (g1 p1) ... -> (b h) (g0 g1 ...) d (p0 p1 ...)``.

    With ``shifts`` the input is first rolled by ``+shifts`` along the spatial axes (and rolled back by the
    inverse), as the reference does with ``torch.roll``. Here the roll and the rearrangement are one gather
    along the flattened spatial axis (the same values, fewer passes over memory).
    """

    def __init__(self, input_size, num_heads=None, head_dim=None, grid_size=None, patch_size=None,
                 shifts=None, **kwargs):  # fmt: skip
        super().__init__()
        if kwargs.get("position") is not None:
            raise UnsupportedConfig("Matricize with a positional parameter is not supported")
        channels, spatial = int(input_size[1]), [int(s) for s in input_size[2:]]
        nd = len(spatial)
        if num_heads is not None:
            self.h = max(int(num_heads), 1)
            self.d = channels // self.h
        elif head_dim is not None:
            self.d = max(int(head_dim), 1)
            self.h = channels // self.d
        else:
            raise UnsupportedConfig("Matricize needs num_heads or head_dim")
        if self.h * self.d != channels:
            raise UnsupportedConfig(f"{channels} channels do not split into heads of {self.d}")
        if grid_size is not None:
            self.g = [max(int(v), 1) for v in _tuple(grid_size, nd)]
            self.p = [s // g for s, g in zip(spatial, self.g, strict=True)]
        elif patch_size is not None:
            self.p = [max(int(v), 1) for v in _tuple(patch_size, nd)]
            self.g = [s // p for s, p in zip(spatial, self.p, strict=True)]
        else:
            raise UnsupportedConfig("Matricize needs grid_size or patch_size")
        if [g * p for g, p in zip(self.g, self.p, strict=True)] != spatial:
            raise UnsupportedConfig(f"spatial size {spatial} is not a whole number of {self.p} patches")
        self.spatial = spatial
        self.shifts = None if shifts is None else tuple(int(s) for s in _tuple(shifts, nd))
        self.output_size = (None, math.prod(self.g), self.d, math.prod(self.p))

    def _index(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        return _window_index(self.spatial, self.g, self.p, self.shifts, device)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The matricized view (not contiguous): (b h, G, d, P)."""
        idx, _ = self._index(x.device)
        b = x.shape[0]
        out = x.reshape(b * self.h, self.d, -1).index_select(2, idx)
        return out.view(b * self.h, self.d, math.prod(self.g), math.prod(self.p)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gather(x).contiguous()

    def inverse_forward(self, x: torch.Tensor) -> torch.Tensor:
        _, inv = self._index(x.device)
        bh = x.shape[0]
        flat = x.transpose(1, 2).reshape(bh, self.d, -1).index_select(2, inv)
        return flat.reshape(bh // self.h, self.h * self.d, *self.spatial)


class SWMatricize(nn.Module):
    """``factorizer.SWMatricize``: one Matricize per shift (``None`` = unshifted), outputs concatenated along
    the batch axis; the inverse averages the un-shifted reconstructions."""

    def __init__(self, input_size, num_heads=None, head_dim=None, grid_size=None, patch_size=None,
                 shifts=None, **kwargs):  # fmt: skip
        super().__init__()
        nd = len(input_size) - 2
        patch = _tuple(patch_size, nd) if patch_size is not None else None
        if shifts is None:
            if patch is None:
                raise UnsupportedConfig("SWMatricize without shifts needs patch_size")
            shifts = [None, tuple(s // 2 for s in patch)]
        self.shifted_windows = nn.ModuleList(
            Matricize(input_size, num_heads, head_dim, grid_size, patch, shifts=s, **kwargs) for s in shifts
        )
        self.output_size = self.shifted_windows[0].output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([w.gather(x) for w in self.shifted_windows])

    def inverse_forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(self.shifted_windows)
        b = x.shape[0] // n
        out = 0.0
        for j, w in enumerate(self.shifted_windows):
            out = out + w.inverse_forward(x[j * b : (j + 1) * b])
        return out / n


# --- nonnegative matrix factorization -----------------------------------------------------------------
class RandomInit(nn.Module):
    """``factorizer.RandomInit``: fixed initial factors ``u0`` (M x R) and ``v0`` (N x R), stored buffers."""

    def __init__(self, m: int, n: int, rank: int):
        super().__init__()
        self.register_buffer("u0", torch.zeros(m, rank))
        self.register_buffer("v0", torch.zeros(n, rank))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lead = x.shape[:-2]
        return self.u0.expand(*lead, *self.u0.shape), self.v0.expand(*lead, *self.v0.shape)


_SOLVERS = {  # factorizer's SOLVER_DISPATCH_MAP, the entries reimplemented here: (kind, factors, project)
    "hals": ("cd", (0, 1), True), "hals-0": ("cd", (0,), True), "hals-1": ("cd", (1,), True),
    "nncd": ("cd", (0, 1), True), "nncd-0": ("cd", (0,), True), "nncd-1": ("cd", (1,), True),
    "cd": ("cd", (0, 1), False), "cd-0": ("cd", (0,), False), "cd-1": ("cd", (1,), False),
    "mu": ("mu", (0, 1), False), "mu-0": ("mu", (0,), False), "mu-1": ("mu", (1,), False),
}  # fmt: skip


def _solver(spec: Any) -> tuple[str, tuple[int, ...], bool, float]:
    """(kind, factors to update in order, ReLU projection, eps) of an NMF solver spec."""
    if isinstance(spec, str):
        if spec not in _SOLVERS:
            raise UnsupportedConfig(f"NMF solver {spec!r} is not supported")
        return (*_SOLVERS[spec], 1e-8)
    name, args, kwargs = unwrap(spec)
    if args:
        raise UnsupportedConfig(f"positional arguments for solver {name}")
    factor = kwargs.get("factor", (0, 1))
    factor = tuple(factor) if isinstance(factor, (list, tuple)) else (factor,)
    eps = float(kwargs.get("eps", 1e-8))
    short = _short(name)
    if short == "CoordinateDescent":
        project = kwargs.get("project")
        if project is not None and _short(spec_name(project)) not in ("ReLU", "Identity"):
            raise UnsupportedConfig(f"projection {spec_name(project)} is not supported")
        return "cd", factor, _short(spec_name(project)) == "ReLU", eps
    if short == "MultiplicativeUpdate":
        return "mu", factor, False, eps
    raise UnsupportedConfig(f"NMF solver {name} is not supported")


class NMF(nn.Module):
    """``factorizer.NMF`` (``MF`` base) for inference: ``x ~ u v^T`` by ``num_iters`` solver sweeps from
    the stored initial factors; returns ``u v^T``.

    Computed in float32 even under autocast (the solvers add ``eps = 1e-8``, which float16 cannot hold).
    """

    def __init__(self, size, rank=None, compression=10, num_iters=5, num_grad_steps=None, init="uniform",
                 solver="hals", verbose=False, **kwargs):  # fmt: skip
        super().__init__()
        m, n = (int(s) for s in size)
        if rank is None:
            if compression is None:
                raise UnsupportedConfig("NMF needs rank or compression")
            rank = max(math.ceil(m * n / (compression * (m + n))), 1)
        self.size, self.rank, self.num_iters = (m, n), int(rank), int(num_iters)
        init_name = init if isinstance(init, str) else _short(spec_name(init))
        if init_name not in ("uniform", "normal", "normal-uniform", "uniform-normal", "RandomInit"):
            raise UnsupportedConfig(f"NMF initialisation {init!r} is not supported")
        self.init = RandomInit(m, n, self.rank)
        self.kind, self.factor, self.project, self.eps = _solver(solver)

    def _update_u(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        a, b = x @ v, v.transpose(-2, -1) @ v
        eps = self.eps
        if self.kind == "mu":
            return (u * a + eps) / (u @ b + eps)
        proj = torch.relu if self.project else (lambda t: t)
        r = u.shape[-1]
        if r == 1:
            return proj((a + eps) / (b + eps))
        u_new = u.clone()
        for i in range(r):
            idx = [j for j in range(r) if j != i]
            num = a[..., i : i + 1] - u_new[..., idx] @ b[..., idx, i : i + 1] + eps
            den = b[..., i : i + 1, i : i + 1] + eps
            u_new[..., i : i + 1] = proj(num / den)
        return u_new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            u, v = self.init(x)
            for _ in range(self.num_iters):
                for f in self.factor:
                    if f == 0:
                        u = self._update_u(x, u, v)
                    else:
                        v = self._update_u(x.transpose(-2, -1), v, u)
            out = u @ v.transpose(-2, -1)
        return out.to(dtype)


# --- factorizer blocks ---------------------------------------------------------------------------------
_ACTS = {"ReLU": nn.ReLU, "Identity": nn.Identity, "GELU": nn.GELU, "Sigmoid": nn.Sigmoid, "Tanh": nn.Tanh}


def _activation(spec: Any) -> nn.Module:
    if spec is None:
        return nn.Identity()
    name, args, kwargs = unwrap(spec)
    if _short(name) in _ACTS and name.startswith("torch.nn."):
        return _ACTS[_short(name)](*args, **kwargs)
    raise UnsupportedConfig(f"activation {name} is not supported")


def _tensorizer(spec: Any, input_size: tuple) -> nn.Module:
    if spec is None:
        spec = [{"ref": "factorizer.Matricize"}, {"num_heads": 1, "grid_size": 1}]
    name, args, kwargs = unwrap(spec)
    short = _short(name)
    if short == "SWMatricize":
        return SWMatricize(input_size, *args, **kwargs)
    if short == "Matricize":
        return Matricize(input_size, *args, **kwargs)
    raise UnsupportedConfig(f"tensorize {name} is not supported (Matricize and SWMatricize are)")


class FactorizerSubblock(nn.Module):
    """``factorizer.FactorizerSubblock``: in_proj -> (SW)matricize -> act -> NMF -> inverse -> out_proj."""

    def __init__(self, input_dim, output_dim, spatial_size, tensorize=None, act=None, factorize=None,
                 dropout=0.0, **kwargs):  # fmt: skip
        super().__init__()
        self.in_proj = Linear(input_dim, output_dim, bias=False)
        self.tensorize = _tensorizer(tensorize, (None, output_dim, *spatial_size))
        self.act = _activation(act)
        size = tuple(s for s in self.tensorize.output_size[2:] if s != 1)
        if len(size) != 2:
            raise UnsupportedConfig(f"matricized size {self.tensorize.output_size} is not a matrix")
        self.tensorized_size = size
        fname, fargs, fkwargs = unwrap(factorize) if factorize is not None else ("factorizer.SVD", [], {})
        if _short(fname) != "NMF":
            raise UnsupportedConfig(f"factorization {fname} is not supported (NMF is)")
        self.factorize = NMF(size, *fargs, **{**fkwargs, **kwargs})
        self.out_proj = Linear(output_dim, output_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.tensorize(self.in_proj(x)))
        shape = out.shape
        out = self.factorize(out.reshape(*shape[:2], *self.tensorized_size)).reshape(shape)
        out = self.out_proj(self.tensorize.inverse_forward(out))
        return self.dropout(out)


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


def _subblock(spec: Any, dim: int, spatial_size: tuple) -> nn.Module:
    name, args, kwargs = unwrap(spec)
    short = _short(name)
    if short == "FactorizerSubblock":
        return FactorizerSubblock(dim, dim, *args, **{**kwargs, "spatial_size": spatial_size})
    if short == "MLP":
        return MLP(dim, dim, *args, **{**kwargs, "spatial_size": spatial_size})
    raise UnsupportedConfig(f"factorizer sub-block {name} is not supported (FactorizerSubblock and MLP are)")


class FactorizerBlock(nn.Module):
    """``factorizer.FactorizerBlock``: optional adapter and positional embedding, then residual sub-blocks."""

    def __init__(self, input_dim, output_dim, spatial_size, adapter=None, pos_embed=False, dropout=0.0,
                 **subblocks):  # fmt: skip
        super().__init__()
        spatial_size = tuple(int(s) for s in spatial_size)
        if input_dim != output_dim:
            if adapter is not None:
                raise UnsupportedConfig("a custom factorizer adapter is not supported")
            self.adapter = nn.Sequential(Linear(input_dim, output_dim, bias=False), nn.Dropout(dropout))
        if pos_embed:
            self.pos_embed = PosEmbed(input_dim, spatial_size, dropout=dropout)
        self.blocks = nn.ModuleDict(
            {
                key: Residual(
                    nn.Sequential(LayerNorm(output_dim), _subblock(value, output_dim, spatial_size))
                )
                for key, value in subblocks.items()
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.adapter(x) if hasattr(self, "adapter") else x
        out = self.pos_embed(out) if hasattr(self, "pos_embed") else out
        for block in self.blocks.values():
            out = block(out)
        return out


# --- convolutional blocks (factorizer.unet) ------------------------------------------------------------
_DEFAULT_CONV = [{"ref": "torch.nn.Conv3d"}, {"kernel_size": 3, "padding": 1}]
_DEFAULT_NORM = [{"ref": "torch.nn.GroupNorm"}, [8]]
_DEFAULT_ACT = {"ref": "torch.nn.LeakyReLU"}
_DEFAULT_DROP = [{"ref": "torch.nn.Dropout"}, {"p": 0.0}]


def _conv_parts(conv, norm, act, drop):
    conv = _DEFAULT_CONV if conv is None else conv
    return (
        torch_factory(conv),
        torch_factory(_DEFAULT_NORM if norm is None else norm),
        torch_factory(_DEFAULT_ACT if act is None else act),
        torch_factory(_DEFAULT_DROP if drop is None else drop),
        _raw_torch_class(conv),
    )


def _is_strided(stride) -> bool:
    return math.prod(stride if isinstance(stride, (list, tuple)) else (stride,)) != 1


class BasicBlock(nn.Module):
    """``factorizer.BasicBlock``: (conv - drop - norm - act), (conv - drop - norm), + shortcut, act."""

    def __init__(self, in_channels, out_channels, mid_channels=None, conv=None, norm=None, act=None, drop=None,
                 stride=1, **_):  # fmt: skip
        super().__init__()
        mid = out_channels if mid_channels is None else mid_channels
        conv_f, norm_f, act_f, drop_f, conv_cls = _conv_parts(conv, norm, act, drop)
        self.conv1 = conv_f(in_channels, mid, stride=stride)
        self.drop1 = drop_f()
        self.norm1 = norm_f(mid)
        self.conv2 = conv_f(mid, out_channels)
        self.drop2 = drop_f()
        self.norm2 = norm_f(out_channels)
        self.act = act_f()
        if _is_strided(stride) or in_channels != out_channels:
            self.shortcut = conv_cls(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        out = self.act(self.norm1(self.drop1(self.conv1(x))))
        out = self.norm2(self.drop2(self.conv2(out)))
        return self.act(out + shortcut)


class PreActivationBlock(nn.Module):
    """``factorizer.PreActivationBlock``: norm - act - conv - drop, norm - act - conv - drop, + shortcut."""

    def __init__(self, in_channels, out_channels, mid_channels=None, conv=None, norm=None, act=None, drop=None,
                 stride=1, **_):  # fmt: skip
        super().__init__()
        mid = out_channels if mid_channels is None else mid_channels
        conv_f, norm_f, act_f, drop_f, conv_cls = _conv_parts(conv, norm, act, drop)
        self.norm1 = norm_f(in_channels)
        self.act = act_f()
        self.conv1 = conv_f(in_channels, mid, stride=stride)
        self.drop1 = drop_f()
        self.norm2 = norm_f(mid)
        self.conv2 = conv_f(mid, out_channels)
        self.drop2 = drop_f()
        if _is_strided(stride) or in_channels != out_channels:
            self.shortcut = conv_cls(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.drop1(self.conv1(out))
        out = self.drop2(self.conv2(self.act(self.norm2(out))))
        return out + shortcut


class DoubleConv(nn.Module):
    """``factorizer.DoubleConv``: (conv - drop - norm - act) x 2."""

    def __init__(self, in_channels, out_channels, mid_channels=None, conv=None, norm=None, act=None, drop=None,
                 stride=1, **_):  # fmt: skip
        super().__init__()
        mid = out_channels if mid_channels is None else mid_channels
        conv_f, norm_f, act_f, drop_f, _cls = _conv_parts(conv, norm, act, drop)
        self.block1 = nn.Sequential(conv_f(in_channels, mid, stride=stride), drop_f(), norm_f(mid), act_f())
        self.block2 = nn.Sequential(
            conv_f(mid, out_channels, stride=1), drop_f(), norm_f(out_channels), act_f()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(x))


_CONV_BLOCKS = {"BasicBlock": BasicBlock, "PreActivationBlock": PreActivationBlock, "DoubleConv": DoubleConv}


def _block_factory(spec: Any) -> Callable[..., nn.Module]:
    name, args, kwargs = unwrap(spec)
    short = _short(name)
    if short == "FactorizerBlock":
        return lambda i, o, **k: FactorizerBlock(i, o, *args, **{**kwargs, **k})
    if short in _CONV_BLOCKS:
        cls = _CONV_BLOCKS[short]
        return lambda i, o, **k: cls(i, o, *args, **{**kwargs, **k})
    raise UnsupportedConfig(f"U-Net block {name} is not supported")


# --- the generic U-Net ---------------------------------------------------------------------------------
class _Level(nn.Module):
    """``UNetEncoderBlock``: ``blocks`` = [downsample, block, ...] (or [block, ...] at stride 1)."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class _Encoder(nn.Module):
    def __init__(self, levels: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(levels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = [self.blocks[0](x)]
        for block in self.blocks[1:]:
            out.append(block(out[-1]))
        return out


class _UpLevel(nn.Module):
    """``UNetDecoderBlock``: upsample, concatenate [skip, upsampled], blocks."""

    def __init__(self, upsample: nn.Module, blocks: list[nn.Module]):
        super().__init__()
        self.upsample = upsample
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.blocks(torch.cat([x2, self.upsample(x1)], dim=1))


class _Decoder(nn.Module):
    def __init__(self, levels: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(levels)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        out = list(feats)
        for i, block in enumerate(self.blocks):
            out[-2 - i] = block(out[-1 - i], out[-2 - i])
        return out[0]


class UNet(nn.Module):
    """``factorizer.UNet`` (inference: only the first head is evaluated).

    ``block_spec(layer, sublayer)`` returns the spec of the block at ``(layer, sublayer)``: encoder layers
    are ``0 .. len(encoder_depth) - 1``, decoder layers follow.
    """

    def __init__(self, in_channels, out_channels, block_spec, spatial_dims=3, stem_width=None,
                 encoder_depth=(1, 1, 1, 1, 1), encoder_width=(32, 64, 128, 256, 512), strides=(1, 2, 2, 2, 2),
                 decoder_depth=(1, 1, 1, 1), stem=None, downsample=None, upsample=None, head=None,
                 num_deep_supr=1):  # fmt: skip
        super().__init__()
        conv, tconv = (
            {"ref": f"torch.nn.Conv{spatial_dims}d"},
            {"ref": f"torch.nn.ConvTranspose{spatial_dims}d"},
        )
        stem = [conv, {"kernel_size": 3, "padding": 1, "bias": False}] if stem is None else stem
        downsample = [conv, {"kernel_size": 2}] if downsample is None else downsample
        upsample = [tconv, {"kernel_size": 2}] if upsample is None else upsample
        head = [conv, {"kernel_size": 1}] if head is None else head
        width, depth, strides = list(encoder_width), list(encoder_depth), list(strides)
        stem_width = width[0] if stem_width is None else stem_width
        n_enc = len(depth)
        if not (len(width) == len(strides) == n_enc and len(decoder_depth) == n_enc - 1):
            raise UnsupportedConfig("encoder_width, strides, encoder_depth and decoder_depth do not match")

        self.stem = torch_factory(stem)(in_channels, stem_width)

        down = downsample if downsample == "on-block" else torch_factory(downsample)
        levels = []
        for i in range(n_enc):
            cin = stem_width if i == 0 else width[i - 1]
            cout, stride = width[i], strides[i]
            first = _block_factory(block_spec(i, 0))
            if not _is_strided(stride):
                blocks = [first(cin, cout)]
            elif down == "on-block":
                blocks = [first(cin, cout, stride=stride)]
            else:
                blocks = [down(cin, cout, stride=stride), first(cout, cout)]
            for j in range(1, depth[i]):
                blocks.append(_block_factory(block_spec(i, j))(cout, cout))
            levels.append(_Level(blocks))
        self.encoder = _Encoder(levels)

        up = torch_factory(upsample)
        dec_width = width[-2::-1]
        dec_strides = strides[:0:-1]
        ups = []
        for i in range(n_enc - 1):
            cin = width[-1] if i == 0 else dec_width[i - 1]
            cout = dec_width[i]
            blocks = [_block_factory(block_spec(n_enc + i, 0))(2 * cout, cout)]
            for j in range(1, decoder_depth[i]):
                blocks.append(_block_factory(block_spec(n_enc + i, j))(cout, cout))
            ups.append(_UpLevel(up(cin, cout, stride=dec_strides[i]), blocks))
        self.decoder = _Decoder(ups)

        head_f = torch_factory(head)
        self.heads = nn.ModuleList(head_f(width[j], out_channels) for j in range(num_deep_supr))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads[0](self.decoder(self.encoder(self.stem(x))))


# --- the two architectures -------------------------------------------------------------------------------
_UNET_KEYS = ("in_channels", "out_channels", "spatial_dims", "stem_width", "encoder_depth", "encoder_width",
              "strides", "decoder_depth", "stem", "downsample", "upsample", "head", "num_deep_supr")  # fmt: skip


def _same_spec(block: Any) -> Callable[[int, int], Any]:
    """``ft.Same(block)`` (an object spec) or a plain block spec: the same block everywhere."""
    if isinstance(block, dict) and _short(block.get("object")) == "Same":
        inner = block.get("state", {}).get("block")
        if inner is None and block.get("args"):
            inner = block["args"][0]
        if inner is None:
            inner = block.get("kwargs", {}).get("block")
        return lambda i, j: inner
    if isinstance(block, dict) and "dict_items" in block:  # {(layer, sublayer): spec}
        table = {tuple(k): v for k, v in block["dict_items"]}
        return lambda i, j: table[(i, j)]
    return lambda i, j: block


def _bind(name: str, args: list, kwargs: dict, params: Sequence[str]) -> dict:
    if len(args) > len(params):
        raise UnsupportedConfig(f"too many positional arguments for {name}")
    bound = dict(zip(params, args, strict=False))
    overlap = set(bound) & set(kwargs)
    if overlap:
        raise UnsupportedConfig(f"{name}: arguments given twice: {sorted(overlap)}")
    return {**bound, **kwargs}


def build_network(spec: Any) -> nn.Module:
    """The network of a stored ``network`` hyper-parameter (``ft.UNet`` or ``ft.SegmentationFactorizer``)."""
    name, args, kwargs = unwrap(spec)
    short = _short(name)
    if short == "UNet":
        kw = _bind(name, args, kwargs, ("in_channels", "out_channels", "spatial_dims", "stem_width",
                                        "encoder_depth", "encoder_width", "strides", "decoder_depth", "stem",
                                        "downsample", "block", "upsample", "head", "num_deep_supr"))  # fmt: skip
        block = kw.pop("block", None)
        if block is None:
            conv = {"ref": f"torch.nn.Conv{kw.get('spatial_dims', 3)}d"}
            block = [
                {"ref": "factorizer.PreActivationBlock"},
                {"conv": [conv, {"kernel_size": 3, "padding": 1}]},
            ]
        unknown = set(kw) - set(_UNET_KEYS)
        if unknown:
            raise UnsupportedConfig(f"UNet: unknown arguments {sorted(unknown)}")
        return UNet(block_spec=_same_spec(block), **kw)
    if short == "SegmentationFactorizer":
        kw = _bind(name, args, kwargs, ("in_channels", "out_channels", "spatial_size", "stem_width",
                                        "encoder_depth", "encoder_width", "strides", "decoder_depth", "stem",
                                        "downsample", "upsample", "head", "pos_embed", "num_deep_supr"))  # fmt: skip
        spatial_size = [int(s) for s in kw.pop("spatial_size")]
        pos_embed = kw.pop("pos_embed", True)
        unet_kw = {k: kw.pop(k) for k in list(kw) if k in _UNET_KEYS}
        block_kwargs = kw  # dropout, sub-blocks (nmf, mlp, ...): passed on to every FactorizerBlock
        enc_depth = list(unet_kw.get("encoder_depth", (1, 1, 1, 1, 1)))
        dec_depth = list(unet_kw.get("decoder_depth", (1, 1, 1, 1)))
        strides = list(unet_kw.get("strides", (1, 2, 2, 2, 2)))
        net_depth = enc_depth + dec_depth
        num_layers = len(net_depth)
        cumstrides = [math.prod(strides[: i + 1]) for i in range(len(strides))]

        def block_spec(layer: int, sublayer: int):
            level = min(layer, num_layers - 1 - layer)
            size = [s // cumstrides[level] for s in spatial_size]
            bridge = (layer, sublayer) == (num_layers // 2, 0)
            params = {"spatial_size": size, "pos_embed": bool(pos_embed) and bridge, **block_kwargs}
            return [{"ref": "factorizer.FactorizerBlock"}, params]

        return UNet(block_spec=block_spec, spatial_dims=len(spatial_size), **unet_kw)
    raise UnsupportedConfig(f"network {name} is not supported (UNet and SegmentationFactorizer are)")


def describe_network(spec: Any) -> str:
    """``"resunet"`` for a U-Net, ``"swin-factorizer"`` for a SegmentationFactorizer (else the class name)."""
    short = _short(spec_name(spec))
    return {"UNet": "resunet", "SegmentationFactorizer": "swin-factorizer"}.get(short, short)
