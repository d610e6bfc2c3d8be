"""Import the official FACTORIZER weights into the store.

DeepISLES ships 10 PyTorch Lightning checkpoints (``weights/FACTORIZER/logs/isles2022_dwi-adc-flair/
fold{0..4}/{resunet,swin-factorizer}/version_0/checkpoints/epoch=1999-step=99999.ckpt``). Each is a
``torch.save`` pickle of a dict holding ``state_dict`` (the network's tensors under the ``net.`` prefix of
``ft.SemanticSegmentation``) and ``hyper_parameters`` (the constructor arguments of that module as pickled
Python objects: ``network`` is a ``functools.partial`` of ``factorizer.UNet`` or
``factorizer.SegmentationFactorizer`` whose arguments hold ``torch.nn`` classes, ``ft.Same`` instances, ...),
plus training state (optimizer, schedulers, callbacks) that inference does not need.

This module is the only place in deepisles that unpickles these files, and it says so in the log. It does
not need (nor import) the ``factorizer``, ``pytorch_lightning``, ``monai`` or ``torchvision`` packages:
the unpickler resolves only an allow-list of harmless globals (torch's tensor/storage rebuild functions,
``collections.OrderedDict``, a few builtins and NumPy's array reconstruction); every other global a pickle
names (``factorizer.unet.UNet``, ``torch.nn.modules.conv.Conv3d``, ``functools.partial``, MONAI and Lightning
classes, ...) becomes a *stand-in* (``deepisles.weights.restricted``, shared with the NVAUTO TorchScript
reader): a placeholder class that records its dotted name and, when the pickle instantiates it, the
arguments, the state and the items it was given. Nothing named by the pickle is
imported or executed. The stand-ins of the ``network`` hyper-parameter are then written out as JSON (format
described in ``deepisles.members.nets.factorizer_nets``) and the ``net.`` tensors, without the prefix, as
one safetensors file per model (``fold0_resunet.safetensors``, ...).

Before the store is written, every model is rebuilt from its JSON configuration and its tensors are loaded
with ``strict=True``; one model of each distinct configuration is also run once on a 64^3 test input. After
writing, the store is read back with checksum verification.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import pickle
import re
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from deepisles import store
from deepisles.errors import DeepIslesError
from deepisles.members.factorizer import NAME, REFERENCE_INPUTS, FactorizerMember, FactorizerSettings
from deepisles.members.nets.factorizer_nets import (
    UnsupportedConfig,
    build_network,
    describe_network,
    spec_name,
)
from deepisles.weights.restricted import TORCH_REBUILD, StandIn, stand_in
from deepisles.weights.restricted import StandInMeta as _StandInMeta

log = logging.getLogger(__name__)

LOGS = Path("logs") / "isles2022_dwi-adc-flair"
ARCHS = ("resunet", "swin-factorizer")
OFFICIAL_CKPT = "epoch=1999-step=99999.ckpt"
_FOLD_RE = re.compile(r"^fold(\d+)$")


# --- the stand-in unpickler ---------------------------------------------------------------------------
# (the stand-in classes are shared with the NVAUTO TorchScript reader: deepisles.weights.restricted)
_stand_in = stand_in


def _safe_getattr(obj, name, *default):
    """``builtins.getattr`` as a pickle uses it (bound methods): never looks anything up."""
    ref = obj._ref if isinstance(obj, (StandIn, _StandInMeta)) else type(obj).__name__
    return _stand_in(f"{ref}.{name}")


def _numpy_global(module: str, name: str):
    import importlib

    for mod in (module.replace("numpy.core", "numpy._core", 1), module):
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    return None


_TORCH_ALLOWED = TORCH_REBUILD
_BUILTINS_ALLOWED = {"set", "frozenset", "list", "dict", "tuple", "int", "float", "complex", "bool", "str",
                     "bytes", "bytearray", "slice", "range", "object"}  # fmt: skip
_NUMPY_ALLOWED = {"_reconstruct", "scalar", "ndarray", "dtype"}


class StandInUnpickler(pickle.Unpickler):
    """Resolves an allow-list of globals; everything else becomes a :class:`StandIn` subclass."""

    def find_class(self, module: str, name: str):
        if (module, name) in _TORCH_ALLOWED:
            return getattr(__import__(module, fromlist=[name]), name)
        if module == "torch" and (
            name.endswith("Storage") or isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return getattr(torch, name)
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module in ("builtins", "__builtin__"):
            if name in _BUILTINS_ALLOWED:
                return getattr(__import__("builtins"), name)
            if name == "getattr":
                return _safe_getattr
        if module == "copyreg" and name == "_reconstructor":
            import copyreg

            return copyreg._reconstructor
        if (module.startswith("numpy.core") or module.startswith("numpy._core") or module == "numpy") and (
            name in _NUMPY_ALLOWED
        ):
            obj = _numpy_global(module, name)
            if obj is not None:
                return obj
        if module.startswith("numpy") and name == "dtype":
            return np.dtype
        return _stand_in(f"{module}.{name}")


_PICKLE_MODULE = types.ModuleType("deepisles_standin_pickle")
_PICKLE_MODULE.Unpickler = StandInUnpickler  # type: ignore[attr-defined]
_PICKLE_MODULE.load = lambda f, **kw: StandInUnpickler(f, **kw).load()  # type: ignore[attr-defined]
_PICKLE_MODULE.loads = lambda b, **kw: StandInUnpickler(io.BytesIO(b), **kw).load()  # type: ignore[attr-defined]


def read_checkpoint(path: Path) -> dict:
    """Unpickle one Lightning checkpoint with the stand-in unpickler (tensors on the CPU)."""
    log.warning(
        "unpickling %s with a restricted unpickler (official checkpoint; classes become stand-ins)", path
    )
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=_PICKLE_MODULE)
    except Exception as exc:
        raise DeepIslesError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict):
        raise DeepIslesError(f"{path}: not a Lightning checkpoint (a {type(ckpt).__name__}, expected a dict)")
    return ckpt


# --- stand-ins -> JSON ------------------------------------------------------------------------------------
def to_json(obj: Any, _depth: int = 0) -> Any:
    """A JSON-able copy of an unpickled hyper-parameter value (see ``factorizer_nets`` for the format).

    Tensors and arrays are summarised (shape and dtype) unless they hold at most 16 numbers.
    """
    if _depth > 60:
        raise DeepIslesError("hyper-parameters nested too deeply")
    rec = functools.partial(to_json, _depth=_depth + 1)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else repr(obj)
    if isinstance(obj, _StandInMeta):
        return {"ref": obj._ref}
    if isinstance(obj, StandIn):
        if obj._ref == "functools.partial":
            func, args, kwargs = _partial_parts(obj)
            return {"partial": rec(func), "args": [rec(a) for a in args], "kwargs": _json_dict(kwargs, rec)}
        out: dict = {"object": obj._ref}
        if obj._args:
            out["args"] = [rec(a) for a in obj._args]
        if obj._kwargs:
            out["kwargs"] = _json_dict(obj._kwargs, rec)
        if obj._state is not None:
            out["state"] = rec(obj._state)
        if obj._items:
            out["items"] = [[rec(k), rec(v)] for k, v in obj._items]
        if obj._list:
            out["list"] = [rec(v) for v in obj._list]
        return out
    if isinstance(obj, (list, tuple)):
        return [rec(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return {"set": [rec(v) for v in sorted(obj, key=repr)]}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return _json_dict(obj, rec)
        return {"dict_items": [[rec(k), rec(v)] for k, v in obj.items()]}
    if isinstance(obj, (torch.Tensor, np.ndarray, np.generic)):
        arr = obj.detach().cpu().numpy() if isinstance(obj, torch.Tensor) else np.asarray(obj)
        if arr.size <= 16 and arr.dtype.kind in "biuf":
            return {"tensor": arr.tolist(), "dtype": str(arr.dtype)}
        return {"tensor_shape": list(arr.shape), "dtype": str(arr.dtype)}
    if isinstance(obj, (torch.dtype, torch.device, torch.Size)):
        return str(obj)
    if isinstance(obj, (bytes, bytearray)):
        return {"bytes": len(obj)}
    if isinstance(obj, slice):
        return {"slice": [rec(obj.start), rec(obj.stop), rec(obj.step)]}
    if isinstance(obj, complex):
        return {"complex": [obj.real, obj.imag]}
    return {"unknown": type(obj).__name__}


def _json_dict(d: dict, rec) -> dict:
    return {str(k): rec(v) for k, v in d.items()}


def _partial_parts(obj: StandIn) -> tuple[Any, list, dict]:
    """(func, args, keywords) of a pickled ``functools.partial`` (its state is (func, args, kwds, dict))."""
    state = obj._state
    if isinstance(state, tuple) and len(state) >= 3:
        func, args, kwargs = state[0], list(state[1] or ()), dict(state[2] or {})
        return func, args, kwargs
    if obj._args:
        return obj._args[0], list(obj._args[1:]), dict(obj._kwargs)
    raise DeepIslesError("malformed functools.partial in the hyper-parameters")


def _as_dict(obj: Any) -> dict | None:
    """A dict from a plain dict or a stand-in dict subclass (e.g. Lightning's AttributeDict)."""
    if isinstance(obj, dict):
        return obj
    if isinstance(obj, StandIn) and obj._items:
        return dict(obj._items)
    return None


# --- finding the checkpoints ----------------------------------------------------------------------------
def _checkpoint_in(arch_dir: Path) -> Path | None:
    """The checkpoint of one ``fold*/<arch>`` folder: the official name, else the only .ckpt there."""
    versions = sorted(p for p in arch_dir.glob("version_*") if p.is_dir())
    for v in versions:
        official = v / "checkpoints" / OFFICIAL_CKPT
        if official.is_file():
            return official
    for v in versions:
        ckpts = sorted((v / "checkpoints").glob("*.ckpt"))
        if len(ckpts) == 1:
            return ckpts[0]
    return None


def find_checkpoints(folder: Path) -> list[tuple[int, str, Path]]:
    """(fold, arch, path) of every checkpoint under ``folder`` (the FACTORIZER folder or its logs folder)."""
    folder = Path(folder)
    for logs in (folder / LOGS, folder / LOGS.name, folder):
        if not logs.is_dir():
            continue
        found = []
        for fold_dir in sorted(logs.iterdir()):
            m = _FOLD_RE.match(fold_dir.name)
            if not (m and fold_dir.is_dir()):
                continue
            for arch in ARCHS:
                ckpt = _checkpoint_in(fold_dir / arch)
                if ckpt is not None:
                    found.append((int(m.group(1)), arch, ckpt))
        if found:
            return sorted(found, key=lambda t: (ARCHS.index(t[1]), t[0]))
    return []


def locate(root: Path) -> Path | None:
    """The FACTORIZER folder inside an unpacked official archive.

    ``root`` may be the folder containing ``weights/``, ``weights/`` itself, or the FACTORIZER folder.
    """
    root = Path(root)
    for cand in (root / "weights" / "FACTORIZER", root / "FACTORIZER", root):
        if cand.is_dir() and find_checkpoints(cand):
            return cand
    return None


# --- conversion ----------------------------------------------------------------------------------------
def convert_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(network spec as JSON, ``net.``-stripped float tensors, summary of the other hyper-parameters)."""
    ckpt = read_checkpoint(path)
    hparams = _as_dict(ckpt.get("hyper_parameters"))
    if hparams is None or "network" not in hparams:
        raise DeepIslesError(f"{path}: the checkpoint holds no `hyper_parameters` with a `network` entry")
    network = to_json(hparams["network"])
    state = _as_dict(ckpt.get("state_dict"))
    if state is None:
        raise DeepIslesError(f"{path}: the checkpoint holds no `state_dict`")
    tensors, dropped = {}, []
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise DeepIslesError(f"{path}: state_dict entry {key} is not a tensor")
        if key.startswith("net."):
            tensors[key[len("net.") :]] = value.detach().to("cpu").contiguous().clone()
        else:
            dropped.append(key)
    if not tensors:
        raise DeepIslesError(f"{path}: no `net.` tensors in the state_dict")
    if dropped:
        log.info("%s: ignoring %d state_dict entries outside `net.` (%s ...)", path, len(dropped), dropped[0])
    info = {
        "pytorch_lightning_version": ckpt.get("pytorch-lightning_version"),
        "epoch": ckpt.get("epoch"),
        "global_step": ckpt.get("global_step"),
        "other_hyper_parameters": sorted(str(k) for k in hparams if k != "network"),
    }
    return network, tensors, info


def verify_model(
    name: str, network: dict, tensors: dict[str, torch.Tensor], in_channels: int, run: bool = True
) -> None:
    """Build the network from its JSON, load the tensors strictly and (``run``) run it once on a test input."""
    try:
        net = build_network(network)
    except UnsupportedConfig as exc:
        raise DeepIslesError(f"{name}: unsupported network configuration ({exc})") from None
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise DeepIslesError(
            f"{name}: tensors do not match the network ({str(exc).splitlines()[0]})"
        ) from None
    if not run:
        return
    net.eval()
    size = list(FactorizerSettings().roi_size)
    x = torch.zeros((1, in_channels, *size))
    x[:, :, 8:-8, 8:-8, 8:-8] = 1.0
    with torch.inference_mode():
        y = net(x)
    if tuple(y.shape) != (1, 1, *size) or not bool(torch.isfinite(y).all()):
        raise DeepIslesError(
            f"{name}: the network does not give finite logits of shape (1, 1, {size}) on a test input"
        )


def import_official(folder: Path, overwrite: bool = False) -> Path:
    """Convert the official FACTORIZER checkpoints under ``folder`` into ``weights/factorizer/``."""
    folder = Path(folder)
    if store.member_dir(NAME).exists() and not overwrite:
        raise DeepIslesError(
            f"{store.member_dir(NAME)}: member {NAME} is already installed; pass --overwrite to replace it"
        )
    found = find_checkpoints(folder)
    if not found:
        raise DeepIslesError(f"{folder}: no FACTORIZER checkpoints ({LOGS}/fold*/{{{','.join(ARCHS)}}}/...)")
    models, payload, probed = [], {}, {}
    for fold, arch, path in found:
        name = f"fold{fold}_{arch}"
        network, tensors, info = convert_checkpoint(path)
        kind = describe_network(network)
        if kind != arch:
            raise DeepIslesError(_arch_mismatch(path, network, kind, arch))
        in_channels = _in_channels(network)
        if in_channels != len(REFERENCE_INPUTS):
            raise DeepIslesError(f"{path}: network takes {in_channels} channels, expected DWI, ADC, FLAIR")
        # every model is rebuilt and loaded strictly; one model per distinct configuration is also run once
        verify_model(
            name, network, tensors, in_channels, run=json.dumps(network, sort_keys=True) not in probed
        )
        probed[json.dumps(network, sort_keys=True)] = name
        fname = f"{name}.safetensors"
        payload[fname] = tensors
        models.append(
            {
                "name": name,
                "fold": fold,
                "arch": arch,
                "file": fname,
                "source": str(path.relative_to(folder)) if path.is_relative_to(folder) else str(path),
                "network": network,
                **info,
            }
        )
        log.info("converted %s (%d tensors)", name, len(tensors))
    raw = {"source": f"DeepISLES FACTORIZER checkpoints ({folder})", "inputs": list(REFERENCE_INPUTS),
           "settings": FactorizerSettings().to_json(), "models": models}
    meta = FactorizerMember.parse(raw, f"{folder} (converted member.json)").to_json()  # schema-checked
    files = {fname: functools.partial(_write_tensors, tensors) for fname, tensors in payload.items()}
    dest = store.write_member(NAME, meta, files, overwrite=overwrite)
    store.read_member(NAME, verify=True)
    for m in models:  # the files read back are the tensors that were checked
        back = load_file(str(dest / m["file"]))
        if set(back) != set(payload[m["file"]]):
            raise DeepIslesError(f"{dest / m['file']}: written tensors differ from the checkpoint's")
    return dest


# what each architecture folder of the official archive holds
ARCH_NETWORKS = {
    "resunet": "Res-U-Net (factorizer.UNet)",
    "swin-factorizer": "Swin-Factorizer (factorizer.SegmentationFactorizer)",
}


def _arch_mismatch(path: Path, network: Any, kind: str, arch: str) -> str:
    """Why a checkpoint does not belong in its ``fold*/<arch>`` folder, in one line."""
    name = spec_name(network)
    if name:
        held = f"a {ARCH_NETWORKS.get(kind, kind)} network (its `network` hyper-parameter is {name})"
    else:
        brief = json.dumps(network)
        held = f"no network class DeepISLES knows (its `network` hyper-parameter is {brief[:80]}{'...' if len(brief) > 80 else ''})"
    return (f"{path}: the checkpoint holds {held}, but its folder `{arch}` is where the official archive keeps "
            f"{ARCH_NETWORKS[arch]} checkpoints; check that the checkpoint is in the right folder")


def _write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path))


def _in_channels(network: dict) -> int | None:
    from deepisles.members.nets.factorizer_nets import unwrap

    _name, args, kwargs = unwrap(network)
    return kwargs.get("in_channels", args[0] if args else None)
