"""Restricted readers for the official checkpoints: nothing a file names is imported or executed.

Two pieces, shared by the importers:

* **Stand-ins** (:class:`StandIn`): placeholder classes the unpicklers hand out instead of a global they do
  not resolve. A stand-in records its dotted name and, when the pickle instantiates it, the arguments, the
  state (``__setstate__``) and the items it was given; it has no other behaviour. ``import_factorizer`` turns
  the Lightning hyper-parameters into stand-ins this way.
* **The TorchScript archive reader** (:func:`read_torchscript`) for the official NVAUTO ``model*.ts`` files.
  A TorchScript archive is a zip holding ``<name>/data.pkl`` (a pickle of the module tree: every module an
  object of a ``__torch__.*`` class whose state is a dict of its attributes, parameters and submodules),
  ``<name>/data/<key>`` (raw tensor storages), ``<name>/code/`` (the scripted Python, compiled and run by
  ``torch.jit.load``) and a few small records. The reader

  - opens the zip with :mod:`zipfile` and checks every entry first: plain relative names under one top
    folder (no ``..``, no absolute paths, no backslashes or odd characters), no duplicates, bounded sizes
    and compression ratios;
  - unpickles only ``data.pkl`` with :class:`TorchScriptUnpickler`, whose ``find_class`` resolves an
    allow-list: ``collections.OrderedDict``, the storage types (``torch.FloatStorage`` ... as inert markers),
    the tensor rebuild functions of ``torch._utils`` (replaced by a checking re-implementation that only
    views a storage the reader loaded itself) and the type-tag helpers of ``torch.jit._pickle`` (replaced by
    identity functions). ``__torch__.*`` classes (the scripted modules, e.g.
    ``__torch__.monai.networks.nets.segresnet.SegResNet``) become stand-ins; every other global
    (``os.system``, ``builtins.exec``, ``subprocess.Popen``, ``torch.load``, ...) is refused by name;
  - resolves each persistent id ``('storage', <type>, <key>, <location>, <numel>)`` by reading the bytes of
    ``<name>/data/<key>``, which must exist and hold exactly ``numel`` elements; tensors are CPU views of
    those bytes, checked to lie inside them;
  - never opens ``code/``, ``constants.pkl`` or the debug records, and never calls ``torch.jit.load``.

The module tree of stand-ins is then walked to collect the tensors under their dotted names
(:func:`module_tensors`) and the plain-data attributes of a module (:func:`module_attributes`).
"""

from __future__ import annotations

import functools
import io
import pickle
import re
import sys
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deepisles.errors import DeepIslesError


# --- stand-ins -----------------------------------------------------------------------------------------------
class StandIn:
    """Instance of a global the unpickler did not resolve; records what the pickle gave it."""

    _ref = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj._args, obj._kwargs = list(args), dict(kwargs)
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):  # only reached for the record slots of an object built without __new__
        if name in ("_args", "_list", "_items"):
            return self.__dict__.setdefault(name, [])
        if name == "_kwargs":
            return self.__dict__.setdefault(name, {})
        if name == "_state":
            return None
        raise AttributeError(name)

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    def __setitem__(self, key, value):
        self._items.append((key, value))

    def append(self, value):
        self._list.append(value)

    def extend(self, values):
        self._list.extend(values)

    def __repr__(self):
        return f"<stand-in {self._ref}>"


class StandInMeta(type):
    def __repr__(cls):
        return f"<stand-in class {cls._ref}>"


@functools.cache
def stand_in(ref: str) -> type:
    """The stand-in class for the dotted name ``ref`` (one class per name)."""
    return StandInMeta(ref.rsplit(".", 1)[-1], (StandIn,), {"_ref": ref})


# torch's tensor rebuild functions as the pickles of ``torch.save`` name them (resolved to torch's own by the
# FACTORIZER unpickler; the TorchScript reader below uses its own checking versions instead)
TORCH_REBUILD = {
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch", "dtype"),
}


# --- the TorchScript archive reader ------------------------------------------------------------------------
MAX_ENTRIES = 20_000
MAX_PICKLE_BYTES = 64 << 20  # data.pkl of a SegResNet is a few tens of kB
MAX_ENTRY_BYTES = 2 << 30  # one tensor storage
MAX_TOTAL_BYTES = 8 << 30  # all entries together (the official NVAUTO models are ~20 MB each)
MAX_RATIO = 200  # uncompressed / compressed size of a deflated entry (torch stores entries uncompressed)
MAX_DIMS = 16
MAX_DEPTH = 64  # module nesting

_ENTRY_RE = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_TORCH_CLASS_MODULE_RE = re.compile(rf"^__torch__(\.{_IDENT})*$")
_IDENT_RE = re.compile(rf"^{_IDENT}$")
_KEY_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_ATTR_RE = re.compile(r"^[A-Za-z0-9_]{1,200}$")
_MANGLE_RE = re.compile(r"\.___torch_mangle_\d+")

# storage types a TorchScript data.pkl may name -> the dtype of their elements
STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class Refused(Exception):
    """Something in an archive that the reader does not accept (the message says what)."""


@dataclass(frozen=True)
class _StorageType:
    """Inert marker the unpickler returns for ``torch.<X>Storage``."""

    name: str
    dtype: torch.dtype


@dataclass
class _Storage:
    """The bytes of one ``data/<key>`` entry, as a CPU storage of ``numel`` elements of ``dtype``."""

    key: str
    dtype: torch.dtype
    numel: int
    untyped: Any


def _is_int(v: Any) -> bool:
    return type(v) is int


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):  # fmt: skip
    """A CPU tensor viewing ``storage``; the arguments are checked (no hooks, no metadata, in bounds)."""
    if not isinstance(storage, _Storage):
        raise Refused(f"a tensor without a storage of the archive ({type(storage).__name__})")
    if not _is_int(storage_offset) or storage_offset < 0:
        raise Refused(f"tensor in storage {storage.key}: bad storage offset {storage_offset!r}")
    size = tuple(size) if isinstance(size, (tuple, list)) else size
    stride = tuple(stride) if isinstance(stride, (tuple, list)) else stride
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride) <= MAX_DIMS
            and all(_is_int(s) and s >= 0 for s in size + stride)):  # fmt: skip
        raise Refused(f"tensor in storage {storage.key}: bad size {size!r} or stride {stride!r}")
    if backward_hooks:
        raise Refused(f"tensor in storage {storage.key}: carries backward hooks")
    if metadata:
        raise Refused(f"tensor in storage {storage.key}: carries metadata")
    if not isinstance(requires_grad, bool):
        raise Refused(f"tensor in storage {storage.key}: bad requires_grad {requires_grad!r}")
    if all(s > 0 for s in size):
        end = storage_offset + sum((s - 1) * st for s, st in zip(size, stride, strict=True)) + 1
        if end > storage.numel:
            raise Refused(f"tensor in storage {storage.key} reaches element {end}, the storage holds {storage.numel}")
    t = torch.empty((0,), dtype=storage.dtype)
    return t.set_(storage.untyped, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    if not isinstance(data, torch.Tensor):
        raise Refused(f"a parameter that is not a tensor ({type(data).__name__})")
    if backward_hooks:
        raise Refused("a parameter carries backward hooks")
    return data


def _identity(value, *_type_tag):
    return value


def _ordered_dict(*args):
    if args:
        raise Refused("collections.OrderedDict called with arguments")
    return OrderedDict()


_JIT_PICKLE = {"restore_type_tag", "build_intlist", "build_tensorlist", "build_doublelist", "build_boollist"}
_REBUILD = {
    "_rebuild_tensor": _rebuild_tensor,
    "_rebuild_tensor_v2": _rebuild_tensor_v2,
    "_rebuild_parameter": _rebuild_parameter,
}


_CALLABLE = (_identity, _ordered_dict, *_REBUILD.values())


class TorchScriptUnpickler(pickle._Unpickler):
    """Unpickles a TorchScript ``data.pkl``: allow-listed globals, ``__torch__`` classes as stand-ins, storages
    from the archive's ``data/`` entries through ``load_storage(key, dtype, numel)``; refuses the rest.

    The pure-Python unpickler, for one difference from Python pickles: TorchScript writes an enum value as
    ``REDUCE(<enum class>, <value>)`` with a bare value instead of an argument tuple, which the scripted
    enum's stand-in records as its one argument.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, fh, load_storage):
        super().__init__(fh)
        self._load_storage = load_storage

    # Only the allow-listed functions and stand-in classes are ever called, only stand-ins are instantiated
    # (NEWOBJ, OBJ, INST) and only stand-ins receive a state (BUILD): a data.pkl cannot reach anything else.
    def _load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if not (isinstance(func, StandInMeta) or any(func is c for c in _CALLABLE)):
            raise Refused(f"a call of {type(func).__name__} {str(func)[:60]!r}")
        if not isinstance(args, tuple):
            if not isinstance(func, StandInMeta):
                raise Refused(f"a call of {func.__name__} without an argument tuple")
            args = (args,)
        self.stack[-1] = func(*args)

    def _load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        if not isinstance(cls, StandInMeta) or not isinstance(args, tuple):
            raise Refused(f"instantiating {type(cls).__name__} {str(cls)[:60]!r}")
        self.append(cls.__new__(cls, *args))

    def _load_newobj_ex(self):
        kwargs = self.stack.pop()
        self.stack.append(kwargs)
        if not isinstance(kwargs, dict):
            raise Refused("instantiating with keyword arguments that are not a dict")
        cls = self.stack[-3] if len(self.stack) >= 3 else None
        if not isinstance(cls, StandInMeta):
            raise Refused(f"instantiating {type(cls).__name__} {str(cls)[:60]!r}")
        pickle._Unpickler.dispatch[pickle.NEWOBJ_EX[0]](self)

    def _instantiate(self, klass, args):
        if not isinstance(klass, StandInMeta):
            raise Refused(f"instantiating {type(klass).__name__} {str(klass)[:60]!r}")
        self.append(klass(*args))

    def _load_build(self):
        inst = self.stack[-2] if len(self.stack) >= 2 else None
        if not isinstance(inst, StandIn):
            raise Refused(f"setting the state of a {type(inst).__name__}")
        pickle._Unpickler.dispatch[pickle.BUILD[0]](self)

    dispatch[pickle.REDUCE[0]] = _load_reduce
    dispatch[pickle.NEWOBJ[0]] = _load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = _load_newobj_ex
    dispatch[pickle.BUILD[0]] = _load_build

    def find_class(self, module: str, name: str):
        if _TORCH_CLASS_MODULE_RE.match(module) and _IDENT_RE.match(name):
            return stand_in(f"{module}.{name}")  # a scripted class: recorded, never imported
        if module == "torch._utils" and name in _REBUILD:
            return _REBUILD[name]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name, STORAGE_DTYPES[name])
        if module == "torch.jit._pickle" and name in _JIT_PICKLE:
            return _identity
        if module == "collections" and name == "OrderedDict":
            return _ordered_dict
        raise Refused(f"global {module}.{name} (not allowed in a TorchScript data.pkl)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise Refused(f"persistent id {str(pid)[:80]!r}")
        _, stype, key, location, numel = pid
        if not isinstance(stype, _StorageType):
            raise Refused(f"storage of type {stype!r}")
        if not (isinstance(key, str) and _KEY_RE.match(key)):
            raise Refused(f"storage key {str(key)[:80]!r}")
        if not isinstance(location, str) or not re.match(r"^(cpu|cuda|mps)(:\d+)?$", location):
            raise Refused(f"storage {key} on device {str(location)[:40]!r}")
        if not _is_int(numel) or numel < 0:
            raise Refused(f"storage {key} with {numel!r} elements")
        return self._load_storage(key, stype.dtype, numel)


@dataclass
class TorchScriptArchive:
    """What :func:`read_torchscript` read: the root module (a stand-in) and the archive's top folder."""

    path: Path
    prefix: str
    root: Any
    storages: dict[str, _Storage] = field(default_factory=dict)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _check_entries(zf: zipfile.ZipFile) -> str:
    """Checks every entry of the zip; returns the top folder all entries live in."""
    infos = zf.infolist()
    if not infos:
        raise Refused("an empty zip")
    if len(infos) > MAX_ENTRIES:
        raise Refused(f"{len(infos)} zip entries (at most {MAX_ENTRIES})")
    seen, total, prefix = set(), 0, None
    for info in infos:
        name = info.filename
        if not _ENTRY_RE.match(name) or any(part in (".", "..") for part in name.split("/")):
            raise Refused(f"zip entry with an odd name {name[:120]!r}")
        if name in seen:
            raise Refused(f"zip entry {name} twice")
        seen.add(name)
        top = name.split("/", 1)[0]
        if "/" not in name or (prefix is not None and top != prefix):
            raise Refused(f"zip entry {name} outside the archive's single top folder")
        prefix = top
        if info.is_dir():
            continue
        if info.file_size > MAX_ENTRY_BYTES:
            raise Refused(f"zip entry {name} of {info.file_size} bytes (at most {MAX_ENTRY_BYTES})")
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise Refused(f"zip entry {name} expands {info.file_size} / {info.compress_size} times")
        total += info.file_size
        if total > MAX_TOTAL_BYTES:
            raise Refused(f"zip entries of more than {MAX_TOTAL_BYTES} bytes in all")
    assert prefix is not None
    return prefix


def read_torchscript(path: Path) -> TorchScriptArchive:
    """Read a TorchScript archive's module tree and tensors without running anything from it.

    Raises :class:`~deepisles.errors.DeepIslesError` (one line, naming the file) for anything the reader does
    not accept: not a zip, odd entries, absurd sizes, a global outside the allow-list, a missing storage, ...
    """
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DeepIslesError(f"{path}: not a TorchScript archive (cannot open it as a zip: {_first_line(exc)})") from None
    with zf:
        try:
            prefix = _check_entries(zf)
            entries = {i.filename: i for i in zf.infolist()}
            pkl = entries.get(f"{prefix}/data.pkl")
            if pkl is None:
                raise Refused(f"no {prefix}/data.pkl (not a TorchScript archive)")
            if pkl.file_size > MAX_PICKLE_BYTES:
                raise Refused(f"{prefix}/data.pkl of {pkl.file_size} bytes (at most {MAX_PICKLE_BYTES})")
            order = entries.get(f"{prefix}/byteorder")
            if sys.byteorder != "little" or (order is not None and zf.read(order).strip() != b"little"):
                raise Refused("tensors stored or read in big-endian byte order")
            storages: dict[str, _Storage] = {}

            def load_storage(key: str, dtype: torch.dtype, numel: int) -> _Storage:
                if key in storages:
                    st = storages[key]
                    if st.dtype != dtype or st.numel != numel:
                        raise Refused(f"storage {key} named with two different types or sizes")
                    return st
                info = entries.get(f"{prefix}/data/{key}")
                if info is None or info.is_dir():
                    raise Refused(f"storage key {key} not in the archive (no {prefix}/data/{key})")
                nbytes = numel * torch.empty((), dtype=dtype).element_size()
                if info.file_size != nbytes:
                    raise Refused(f"storage {key}: {info.file_size} bytes for {numel} elements of {dtype}")
                raw = bytearray(zf.read(info)) if nbytes else bytearray()
                if len(raw) != nbytes:
                    raise Refused(f"storage {key}: read {len(raw)} bytes, expected {nbytes}")
                flat = torch.frombuffer(raw, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
                storages[key] = _Storage(key, dtype, numel, flat.untyped_storage())
                return storages[key]

            data = zf.read(pkl)
            root = TorchScriptUnpickler(io.BytesIO(data), load_storage).load()
        except Refused as exc:
            raise DeepIslesError(f"{path}: refusing this TorchScript archive: {exc}") from None
        except DeepIslesError:
            raise
        except Exception as exc:  # truncated pickle, bad zip member, ...
            raise DeepIslesError(f"{path}: cannot read this TorchScript archive ({_first_line(exc)})") from None
    if not _is_module(root):
        raise DeepIslesError(f"{path}: data.pkl does not hold a scripted module ({type(root).__name__})")
    return TorchScriptArchive(path, prefix, root, storages)


def class_name(obj: Any) -> str:
    """The scripted class of a stand-in without TorchScript's ``___torch_mangle_N`` parts
    (``__torch__.monai.networks.nets.segresnet.SegResNet``)."""
    return _MANGLE_RE.sub("", getattr(obj, "_ref", type(obj).__name__))


def _is_module(obj: Any) -> bool:
    """A scripted module: a stand-in whose recorded state is a dict of its attributes (with ``training``)."""
    return isinstance(obj, StandIn) and isinstance(obj.__dict__.get("_state"), dict) and "training" in obj._state


def module_tensors(root: Any, path: Path | str = "") -> dict[str, torch.Tensor]:
    """Every tensor attribute of ``root`` and its submodules under its dotted name (``down_layers.0.1.conv1...``),
    as contiguous CPU copies in the order of the archive."""
    out: dict[str, torch.Tensor] = {}

    def walk(obj: Any, prefix: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise DeepIslesError(f"{path}: modules nested more than {MAX_DEPTH} deep")
        for key, value in obj._state.items():
            if not (isinstance(key, str) and _ATTR_RE.match(key)):
                raise DeepIslesError(f"{path}: module {prefix or '(root)'} has an attribute named {str(key)[:80]!r}")
            if isinstance(value, torch.Tensor):
                out[prefix + key] = value.detach().contiguous().clone()
            elif _is_module(value):
                walk(value, f"{prefix}{key}.", depth + 1)

    walk(root, "", 0)
    return out


def module_attributes(module: Any) -> dict[str, Any]:
    """The attributes of one scripted module that are neither tensors nor submodules (plain data and stand-ins
    of scripted enums/classes)."""
    return {k: v for k, v in module._state.items() if not isinstance(v, torch.Tensor) and not _is_module(v)}
