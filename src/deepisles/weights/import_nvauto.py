"""Import the official NVAUTO weights (DeepISLES ``weights/NVAUTO/ts/model{0..14}.ts``) into the store.

The official files are TorchScript archives: zips holding a pickled module tree, the raw tensor storages and
the scripted Python code of the modules. Loading one with ``torch.jit.load`` compiles that code and running
the model executes it, so a doctored ``model*.ts`` could do anything a TorchScript program can (e.g. create
and write files) at import and again at every segmentation. deepisles therefore never loads or runs them:

1. each archive is read once, here, by the restricted reader of :mod:`deepisles.weights.restricted`: the zip's
   entries are checked, only ``data.pkl`` is unpickled, with an allow-list of globals (the scripted classes
   become inert stand-ins that record their state; ``os.system``, ``builtins.exec`` and every other global
   are refused by name), tensors come from the archive's ``data/`` entries, and ``code/`` is never read;
2. the hyper-parameters the scripted ``SegResNet`` recorded as plain attributes (``init_filters``,
   ``blocks_down``, ``norm``, ...; what the tensors show where an attribute is absent) give the ``network``
   entry ``{"class": "SegResNet", "kwargs": {...}}``; every value is checked against what deepisles accepts;
3. a MONAI ``SegResNet`` is built from that entry by deepisles and the collected parameter names and shapes
   must match its ``state_dict`` exactly (the first missing, unexpected or wrong-shape key is named); the
   network, with the tensors loaded strictly, runs once on a small test input;
4. the tensors are written as ``model{i}.safetensors`` and ``member.json`` records the network, the model
   order, the reference preprocessing configuration, the SHA-256 of each official file it came from and
   (through the store) of every written file. The store is read back and compared before the import ends.

At ``segment`` time ``deepisles.members.nvauto`` builds the same ``SegResNet`` and loads the safetensors;
nothing from the official files is executed, ever.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from deepisles import store
from deepisles.errors import DeepIslesError
from deepisles.members.base import MemberUnavailable
from deepisles.members.nvauto import NAME, REFERENCE_INPUTS, NvautoMember, NvautoSettings, build_segresnet
from deepisles.weights.restricted import (
    StandIn,
    class_name,
    module_attributes,
    module_tensors,
    read_torchscript,
)

log = logging.getLogger(__name__)

_MODEL_RE = re.compile(r"^model(\d+)\.ts$")
OFFICIAL_COUNT = 15
SEGRESNET_CLASS = "__torch__.monai.networks.nets.segresnet.SegResNet"
PROBE_SIZE = 32  # test input edge (rounded up to a multiple of the network's downsampling factor)

# SegResNet hyper-parameters taken from the archive's recorded attributes, and what deepisles accepts for each
_MAX_CHANNELS = 4096
_ACTIVATIONS = {"RELU", "LEAKYRELU", "PRELU", "ELU", "SELU", "CELU", "GELU", "RELU6", "SWISH", "MEMSWISH", "MISH"}
_NORMS = {"GROUP", "BATCH", "INSTANCE", "LAYER"}
_UPSAMPLE = {"deconv", "deconvgroup", "nontrainable", "pixelshuffle"}


def _model_files(ts_dir: Path) -> list[Path]:
    found = {}
    for p in ts_dir.iterdir() if ts_dir.is_dir() else []:
        m = _MODEL_RE.match(p.name)
        if m and p.is_file():
            found[int(m.group(1))] = p
    return [found[i] for i in sorted(found)]


def locate(root: Path) -> Path | None:
    """The NVAUTO folder (the one holding ``ts/model*.ts``) inside an unpacked official archive.

    ``root`` may be the folder containing ``weights/``, ``weights/`` itself, or the NVAUTO folder.
    """
    root = Path(root)
    for cand in (root / "weights" / "NVAUTO", root / "NVAUTO", root):
        if _model_files(cand / "ts"):
            return cand
    return None


# --- hyper-parameters --------------------------------------------------------------------------------------
def _pos_int(v: Any, what: str, limit: int = _MAX_CHANNELS) -> int:
    if type(v) is not int or not 0 < v <= limit:
        raise ValueError(f"{what} = {v!r}")
    return v


def _blocks(v: Any, what: str) -> list[int]:
    if not isinstance(v, (tuple, list)) or len(v) > 8:
        raise ValueError(f"{what} = {v!r}")
    return [_pos_int(b, what, 64) for b in v]


def _layer_spec(v: Any, what: str, names: set[str]) -> Any:
    """``"NAME"`` or ``("NAME", {arg: scalar})`` (MONAI's layer factory arguments) -> JSON."""
    if isinstance(v, str):
        name, args = v, {}
    elif isinstance(v, (tuple, list)) and len(v) == 2:
        name, args = v
    else:
        raise ValueError(f"{what} = {v!r}")
    if not isinstance(name, str) or name.upper() not in names or not isinstance(args, dict):
        raise ValueError(f"{what} = {v!r}")
    for k, a in args.items():
        if not isinstance(k, str) or not (a is None or isinstance(a, (bool, int, float, str))):
            raise ValueError(f"{what} = {v!r}")
    return name if isinstance(v, str) else [name, dict(args)]


def _upsample_mode(v: Any) -> str:
    """A plain string, or the scripted ``UpsampleMode`` enum (a stand-in holding its value)."""
    if isinstance(v, StandIn) and class_name(v).endswith(".UpsampleMode") and len(v._args) == 1:
        v = v._args[0]
    if not isinstance(v, str) or v not in _UPSAMPLE:
        raise ValueError(f"upsample_mode = {v!r}")
    return v


def _dropout(v: Any) -> float | None:
    if v is not None and not (isinstance(v, float) and 0.0 <= v < 1.0):
        raise ValueError(f"dropout_prob = {v!r}")
    return v


def _flag(v: Any, what: str) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{what} = {v!r}")
    return v


_RECORDED = {
    "spatial_dims": lambda v: _pos_int(v, "spatial_dims", 3),
    "init_filters": lambda v: _pos_int(v, "init_filters"),
    "in_channels": lambda v: _pos_int(v, "in_channels"),
    "blocks_down": lambda v: _blocks(v, "blocks_down"),
    "blocks_up": lambda v: _blocks(v, "blocks_up"),
    "dropout_prob": _dropout,
    "act": lambda v: _layer_spec(v, "act", _ACTIVATIONS),
    "norm": lambda v: _layer_spec(v, "norm", _NORMS),
    "upsample_mode": _upsample_mode,
    "use_conv_final": lambda v: _flag(v, "use_conv_final"),
}


def _count_blocks(tensors: dict[str, torch.Tensor], layers: str) -> list[int]:
    """Residual blocks per stage from names like ``down_layers.<stage>.<block>.conv1.conv.weight`` (block 0 is
    the stage's downsampling convolution or identity)."""
    counts: dict[int, set[int]] = {}
    pat = re.compile(rf"^{layers}\.(\d+)\.(\d+)\.conv1\.")
    for key in tensors:
        m = pat.match(key)
        if m:
            counts.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return [len(counts.get(i, ())) for i in range(max(counts) + 1)] if counts else []


def network_spec(path: Path, root: Any, tensors: dict[str, torch.Tensor]) -> dict:
    """The ``network`` entry for one archive: structure from the tensors, overridden by the hyper-parameters
    the scripted module recorded as plain attributes (each validated). Raises ``DeepIslesError``."""
    init = tensors.get("convInit.conv.weight")
    if init is None or init.dim() < 3:
        raise DeepIslesError(f"{path}: no convInit.conv.weight tensor; not a MONAI SegResNet")
    kw: dict[str, Any] = {
        "spatial_dims": init.dim() - 2,
        "in_channels": int(init.shape[1]),
        "out_channels": None,
        "init_filters": int(init.shape[0]),
        "blocks_down": _count_blocks(tensors, "down_layers"),
        "blocks_up": _count_blocks(tensors, "up_layers"),
        "dropout_prob": None,
    }
    finals = sorted(
        (int(m.group(1)), k) for k in tensors if (m := re.match(r"^conv_final\.(\d+)\.conv\.weight$", k))
    )
    kw["use_conv_final"] = bool(finals)
    if finals:
        kw["out_channels"] = int(tensors[finals[-1][1]].shape[0])
    attrs = module_attributes(root)
    missing = []
    for key, check in _RECORDED.items():
        if key not in attrs:
            missing.append(key)
            continue
        try:
            kw[key] = check(attrs[key])
        except ValueError as exc:
            raise DeepIslesError(f"{path}: unsupported SegResNet hyper-parameter {exc}") from None
    if kw["spatial_dims"] != 3:
        raise DeepIslesError(f"{path}: a {kw['spatial_dims']}D SegResNet; NVAUTO's are 3D")
    if missing:
        log.warning("%s: no recorded %s; using what the tensors show and MONAI's defaults", path, ", ".join(missing))
    return {"class": "SegResNet", "kwargs": kw}


def check_tensors(path: Path, spec: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Compare ``tensors`` with the state of the ``SegResNet`` deepisles builds from ``spec``: same names, same
    shapes, floating point where the network's are, finite. Returns them in the network's order and dtypes."""
    try:
        net = build_segresnet(spec)
    except (MemberUnavailable, TypeError, ValueError, AssertionError, RuntimeError, KeyError) as exc:
        raise DeepIslesError(f"{path}: cannot build a SegResNet with {_brief(spec)} ({exc})") from None
    ref = net.state_dict()
    for key, want in ref.items():
        if key not in tensors:
            raise DeepIslesError(f"{path}: tensor {key} missing (SegResNet with {_brief(spec)})")
        got = tensors[key]
        if tuple(got.shape) != tuple(want.shape):
            raise DeepIslesError(
                f"{path}: tensor {key} has shape {tuple(got.shape)}, the SegResNet needs {tuple(want.shape)}"
            )
        if want.is_floating_point() != got.is_floating_point():
            raise DeepIslesError(f"{path}: tensor {key} is {got.dtype}, the SegResNet needs {want.dtype}")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise DeepIslesError(f"{path}: tensor {key} holds NaN or infinite values")
    extra = [k for k in tensors if k not in ref]
    if extra:
        raise DeepIslesError(f"{path}: unexpected tensor {extra[0]} (SegResNet with {_brief(spec)})")
    return {k: tensors[k].to(ref[k].dtype).contiguous() for k in ref}


def _brief(spec: dict) -> str:
    kw = spec["kwargs"]
    return ", ".join(f"{k}={kw[k]}" for k in ("in_channels", "out_channels", "init_filters", "blocks_down", "blocks_up"))


def probe(path: Path, spec: dict, tensors: dict[str, torch.Tensor], out_channels: int) -> None:
    """Our network, with the tensors loaded strictly, on a small test input: logits of the right shape, finite."""
    net = build_segresnet(spec)
    net.load_state_dict(tensors, strict=True)
    net.eval()
    factor = 2 ** max(len(spec["kwargs"]["blocks_down"]) - 1, 0)
    size = -(-PROBE_SIZE // factor) * factor
    x = torch.zeros((1, int(spec["kwargs"]["in_channels"]), size, size, size))
    x[:, :, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1.0
    with torch.inference_mode():
        y = net(x)
    if tuple(y.shape) != (1, out_channels, size, size, size) or not bool(torch.isfinite(y).all()):
        raise DeepIslesError(f"{path}: the rebuilt network does not give finite logits on a test input")


def read_model(path: Path, in_channels: int = 2, out_channels: int = 2) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(network entry, tensors)`` of one official archive, read with the restricted reader and checked
    against the SegResNet deepisles builds. Raises ``DeepIslesError`` (one line, naming the file)."""
    log.info("reading the tensors of %s with the restricted TorchScript reader (its code is not run)", path)
    archive = read_torchscript(path)
    cls = class_name(archive.root)
    if cls != SEGRESNET_CLASS:
        raise DeepIslesError(f"{path}: the archive holds a {cls}, expected a MONAI SegResNet ({SEGRESNET_CLASS})")
    raw = module_tensors(archive.root, path)
    spec = network_spec(path, archive.root, raw)
    kw = spec["kwargs"]
    if kw["in_channels"] != in_channels or kw["out_channels"] != out_channels:
        raise DeepIslesError(
            f"{path}: a SegResNet with {kw['in_channels']} input and {kw['out_channels']} output channels; "
            f"NVAUTO takes {in_channels} ([ADC, DWI]) and gives {out_channels}"
        )
    tensors = check_tensors(path, spec, raw)
    return spec, tensors


def import_official(folder: Path, overwrite: bool = False) -> Path:
    """Read, check and convert the official models into ``$DEEPISLES_HOME/weights/nvauto``."""
    folder = Path(folder)
    base = locate(folder)
    if base is None:
        raise DeepIslesError(f"{folder}: no NVAUTO models (expected NVAUTO/ts/model0.ts ...)")
    if store.member_dir(NAME).exists() and not overwrite:
        raise DeepIslesError(
            f"{store.member_dir(NAME)}: member {NAME} is already installed; pass --overwrite to replace it"
        )
    files = _model_files(base / "ts")
    indices = [int(_MODEL_RE.match(p.name).group(1)) for p in files]
    if indices != list(range(len(files))):
        raise DeepIslesError(f"{base / 'ts'}: model files are not numbered 0..{len(files) - 1} ({indices})")
    if len(files) != OFFICIAL_COUNT:
        log.warning(
            "%s: %d NVAUTO models found, the official release has %d", base, len(files), OFFICIAL_COUNT
        )
    settings = NvautoSettings()  # the reference configuration (DeepISLES src/NVAUTO/process.py)
    network, payload, sources = None, {}, {}
    for p in files:
        spec, tensors = read_model(p, in_channels=len(REFERENCE_INPUTS), out_channels=settings.out_channels)
        if network is None:
            network = spec
            probe(p, spec, tensors, settings.out_channels)
        elif spec != network:
            raise DeepIslesError(
                f"{p}: a SegResNet configured differently from {files[0].name}'s ({_brief(spec)} vs "
                f"{_brief(network)}); the member holds one configuration"
            )
        name = p.with_suffix(".safetensors").name
        payload[name] = tensors
        sources[name] = {"file": str(p.relative_to(base)), "sha256": store.sha256_file(p)}
    raw = {
        "source": str(base.resolve()),
        "inputs": list(REFERENCE_INPUTS),
        "network": network,
        "models": [{"file": name, "name": Path(name).stem, "fold": k} for k, name in enumerate(payload)],
        "settings": settings.to_json(),
        "provenance": {
            "reference": "DeepISLES src/NVAUTO/process.py (MONAI 0.9.0 transforms and sliding-window inference)",
            "architecture": "MONAI SegResNet (built by deepisles; tensors read from the official TorchScript "
                            "archives, whose code is not run)",
            "official_files": sources,
        },
    }  # fmt: skip
    meta = NvautoMember.parse(raw, f"{base} (converted member.json)").to_json()  # schema-checked

    def writer(tensors: dict[str, torch.Tensor], name: str, path: Path) -> None:
        save_file(tensors, str(path), metadata={"member": NAME, "source": sources[name]["file"]})

    dest = store.write_member(
        NAME, meta, {n: functools.partial(writer, t, n) for n, t in payload.items()}, overwrite=overwrite
    )
    _verify(payload)
    log.info("imported %d NVAUTO models into %s", len(files), dest)
    return dest


def _verify(payload: dict[str, dict[str, torch.Tensor]]) -> None:
    """Re-read what was written: checksums, then every tensor's name and value."""
    _meta, folder = store.read_member(NAME, verify=True)
    for name, tensors in payload.items():
        back = load_file(str(folder / name))
        if set(back) != set(tensors) or any(not torch.equal(back[k], t) for k, t in tensors.items()):
            raise DeepIslesError(f"{folder / name}: written tensors differ from the official file's")
