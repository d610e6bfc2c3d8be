"""``member.json``: one schema for every member, read into typed dataclasses.

Format 2 (written by ``deepisles weights import`` and ``deepisles train``)::

    {
      "format": 2,
      "member": "seals",
      "source": "where the weights came from",
      "origin": {"kind": "imported" | "trained" | "default", ...},     # optional
      "inputs": ["dwi", "adc"],                                        # network channel order
      "network": {...},                                                # shared network description
      "models": [{"file": "fold_0.safetensors", "name": "fold_0", "fold": 0,
                  "arch": ..., "network": ..., "ensemble_weight": ...}],   # per-model keys optional
      "settings": {...},                                               # the member's own typed settings
      "provenance": {...},                                             # free-form import record
      "files": {"fold_0.safetensors": "<sha256>"}                      # added by the store
    }

``settings`` is the member's dataclass (``SealsSettings``, ``NvautoSettings``, ``FactorizerSettings``), declared
in the member's own module and named by its registry entry. Format 1 (older deepisles: SEALS nested
``preprocessing/inference/export`` at the top level, NVAUTO a ``config`` block, FACTORIZER its settings at the top
level, model lists as file names or per-model dicts) is migrated on read by the settings class's
``migrate_v1``; nothing is rewritten on disk.

Errors are one line, naming the file and the field: ``ConfigError("member.json: settings.roi_size: expected a
list of 3 positive integers, got [64, 64]")``.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from deepisles.core import MODALITY_NAMES
from deepisles.errors import DeepIslesError

FORMAT = 2  # the member.json schema deepisles writes
READABLE = (1, 2)  # the ones it reads (1 is migrated)


class ConfigError(DeepIslesError):
    """A member.json that does not describe a usable member (the message says which field and why)."""


# --- dataclasses from JSON, with the field named in every error ---------------------------------------------
def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is tuple:
        item = args[0] if args else Any
        plural = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}.get(item)
        return f"a list of {plural}" if plural else f"a list ({_describe(item)} each)"
    if origin is dict or tp is dict:
        return "an object"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", Any: "a value"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` as type ``tp`` (JSON lists -> tuples, ints -> floats where a float is declared), or ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_describe(tp)}, got {_brief(value)}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected {_describe(tp)}, got {_brief(value)}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {_brief(value)}")
        return copy.deepcopy(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:
        raise TypeError(f"unsupported field type {tp!r}")  # a programming error in a settings class
    if not ok:
        raise ConfigError(f"{where}: expected {_describe(tp)}, got {_brief(value)}")
    return float(value) if tp is float else value


def from_dict(cls: type, data: Any, where: str) -> Any:
    """An instance of dataclass ``cls`` from a JSON object: every field type-checked, unknown keys refused,
    missing keys with a default take it; then ``cls.validate(where)`` when the class defines it."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {_brief(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _coerce(data[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing field {name}")
    obj = cls(**values)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(where)
    return obj


def to_dict(obj: Any) -> Any:
    """JSON-ready form of a dataclass built by :func:`from_dict` (tuples -> lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def require(ok: bool, where: str, message: str) -> None:
    """Raise ``ConfigError(f"{where}: {message}")`` unless ``ok`` (for the settings classes' ``validate``)."""
    if not ok:
        raise ConfigError(f"{where}: {message}")


def check_sizes(values: tuple, where: str, n: int = 3, positive: bool = True) -> None:
    require(len(values) == n and (not positive or all(v > 0 for v in values)), where,
            f"expected {n} {'positive ' if positive else ''}values, got {list(values)}")


def check_decision_threshold(value: float, where: str) -> None:
    require(0.0 < value < 1.0, f"{where}.decision_threshold", f"expected a probability in (0, 1), got {value}")


# --- the envelope ------------------------------------------------------------------------------------------
class Settings:
    """Base of the members' settings dataclasses: ``from_json``, ``to_json``, ``validate`` and the migration
    of the member's format-1 layout."""

    # member.json keys of format 1 that are this member's settings (moved into "settings" on migration)
    V1_KEYS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_json(cls, data: dict, where: str = "settings"):
        return from_dict(cls, data, where)

    def to_json(self) -> dict:
        return to_dict(self)

    def validate(self, where: str) -> None:
        """Checks beyond the field types (sizes, ranges); raise ConfigError through :func:`require`."""

    @classmethod
    def migrate_v1(cls, meta: dict) -> dict:
        """A format-1 member.json as format 2. Default: settings from ``V1_KEYS`` at the top level, models from
        ``models`` (file names or dicts) and everything else not in the schema kept under ``provenance``."""
        meta = copy.deepcopy(meta)
        out = {k: meta.pop(k) for k in ("member", "source", "origin", "inputs", "network", "files") if k in meta}
        meta.pop("format", None)
        out["settings"] = {k: meta.pop(k) for k in cls.V1_KEYS if k in meta}
        out["models"] = [_v1_entry(m, i) for i, m in enumerate(meta.pop("models", []) or [])]
        out["provenance"] = meta
        out["format"] = FORMAT
        return out


def _v1_entry(m: Any, index: int) -> dict:
    if isinstance(m, str):  # NVAUTO: a file name per model, numbered as listed
        return {"file": m, "name": Path(m).stem, "fold": index}
    return dict(m)


@dataclass(frozen=True)
class ModelEntry:
    """One stored network: its weight file and, where models differ, what sets it apart."""

    file: str
    name: str
    fold: int | None = None
    arch: str | None = None  # FACTORIZER: resunet | swin-factorizer
    network: dict | None = None  # this model's network description (default: the member's ``network``)
    ensemble_weight: float | None = None
    extra: dict = field(default_factory=dict)  # anything else recorded at import (epochs, source file, ...)

    @classmethod
    def from_json(cls, data: Any, where: str) -> ModelEntry:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected an object, got {_brief(data)}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {k: v for k, v in data.items() if k not in known}
        entry = from_dict(cls, {k: v for k, v in data.items() if k in known}, where)
        require(bool(entry.file) and "/" not in entry.file and "\\" not in entry.file and entry.file not in (".", ".."),
                f"{where}.file", f"expected a file name inside the member folder, got {_brief(entry.file)}")
        return dataclasses.replace(entry, extra=extra)

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**{k: v for k, v in out.items() if v is not None}, **copy.deepcopy(self.extra)}


def retired_torchscript_reason(member: str, folder: Path | str) -> str:
    """Why a store holding TorchScript models (as older deepisles versions imported NVAUTO) is not used."""
    return (
        f"{folder} holds {member.upper()} models as TorchScript archives (.ts), written by an older deepisles; they "
        "are no longer loaded because loading TorchScript runs code from the file. Run `deepisles weights import "
        f"PATH --members {member} --overwrite` again to convert the official weights to safetensors"
    )


@dataclass(frozen=True)
class MemberConfig:
    """A whole member.json, typed: the common envelope and the member's ``settings`` dataclass."""

    member: str
    inputs: tuple[str, ...]
    settings: Any
    models: tuple[ModelEntry, ...] = ()
    network: dict | None = None
    source: str | None = None
    origin: dict | None = None
    provenance: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, settings_cls: type[Settings], member: str,
                  where: str = "member.json") -> MemberConfig:  # fmt: skip
        """Parse (and migrate) a member.json of ``member``; ``ConfigError`` naming ``where`` and the field."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a JSON object")
        # stores of older deepisles may hold TorchScript models: say so before anything else is checked
        models, files = data.get("models"), data.get("files")
        listed = [m if isinstance(m, str) else m.get("file") for m in (models if isinstance(models, list) else [])
                  if isinstance(m, str | dict)]
        listed += list(files) if isinstance(files, dict) else []
        if any(isinstance(f, str) and f.endswith(".ts") for f in listed):
            raise ConfigError(retired_torchscript_reason(member, Path(where).parent))
        version = data.get("format", FORMAT)
        if version not in READABLE:
            raise ConfigError(f"{where}: format {version!r} is not one this deepisles reads "
                              f"({', '.join(map(str, READABLE))}); re-import the weights")
        if version == 1:
            data = settings_cls.migrate_v1(data)
        known = {f.name for f in dataclasses.fields(cls)} | {"format"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")
        if data.get("member", member) != member:
            raise ConfigError(f"{where}: describes member {data.get('member')!r}, expected {member!r}")
        inputs = _coerce(data.get("inputs"), tuple[str, ...], f"{where}.inputs")
        bad = [m for m in inputs if m not in MODALITY_NAMES]
        require(bool(inputs) and not bad and len(set(inputs)) == len(inputs), f"{where}.inputs",
                f"expected distinct names from {', '.join(MODALITY_NAMES)}, got {list(inputs)}")
        models = data.get("models") or []
        if not isinstance(models, list):
            raise ConfigError(f"{where}.models: expected a list, got {_brief(models)}")
        entries = tuple(ModelEntry.from_json(m, f"{where}.models[{i}]") for i, m in enumerate(models))
        files = [e.file for e in entries]
        require(len(set(files)) == len(files), f"{where}.models", f"a file is listed twice ({files})")
        return cls(
            member=member,
            inputs=inputs,
            settings=settings_cls.from_json(data.get("settings") or {}, f"{where}.settings"),
            models=entries,
            network=_coerce(data.get("network"), dict | None, f"{where}.network"),
            source=_coerce(data.get("source"), str | None, f"{where}.source"),
            origin=_coerce(data.get("origin"), dict | None, f"{where}.origin"),
            provenance=_coerce(data.get("provenance") or {}, dict, f"{where}.provenance"),
            files=_coerce(data.get("files") or {}, dict, f"{where}.files"),
        )

    def to_json(self) -> dict:
        """The format-2 member.json (``files`` left out: the store computes them when writing)."""
        out = {"format": FORMAT, "member": self.member, "source": self.source, "origin": self.origin,
               "inputs": list(self.inputs), "network": self.network,
               "models": [m.to_json() for m in self.models], "settings": self.settings.to_json(),
               "provenance": copy.deepcopy(self.provenance)}  # fmt: skip
        return {k: v for k, v in out.items() if v is not None}

    def network_of(self, entry: ModelEntry) -> dict:
        spec = entry.network if entry.network is not None else self.network
        if spec is None:
            raise ConfigError(f"{self.member} member.json: model {entry.name} has no network description")
        return spec

    def replace(self, **changes) -> MemberConfig:
        return dataclasses.replace(self, **changes)

    def pick(self, fold: int, arch: str | None = None) -> ModelEntry:
        """The stored model to start training fold ``fold`` from: the one of that fold (and ``arch`` where the
        models have architectures), else the ``fold % n``-th of them."""
        cands = [m for m in self.models if arch is None or m.arch in (None, arch)]
        if not cands:
            raise ConfigError(f"{self.member}: no stored {arch or ''} model to start from".replace("  ", " "))
        return next((m for m in cands if m.fold == fold), cands[fold % len(cands)])
