"""The one list of ensemble members deepisles knows.

Each entry names, as ``"module:attribute"`` strings (imported only when used, so listing the members loads no
network code), the member's runtime class, its typed settings, its compact default recipe (which makes it
trainable by ``deepisles train``) and, as a module path, the importer of its official weights. ``--members``,
``resolve_members``, ``deepisles weights list``/``import``, ``deepisles train`` and the weight importer all read
this table; adding a member is one entry here plus the member's own files (docs/members-contract.md).

Dependency direction: ``store`` (the on-disk format) <- ``members`` <- ``weights`` (``weights.import_*``,
``weights.importer``): members never import the weights package. The importer paths are resolved by ``weights.importer``, never by ``members``.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from typing import Any

from deepisles.errors import DeepIslesError


@dataclass(frozen=True)
class MemberSpec:
    name: str
    runtime: str  # "module:Class", a deepisles.members.base.Member subclass
    settings: str  # "module:Class", its typed settings (the member.json "settings" block)
    importer: str | None = None  # module with locate(root) and import_official(folder, overwrite)
    recipe: str | None = None  # "module:ATTR", the compact default recipe (a format-2 member.json without models)
    stored: bool = True  # its networks come from the weight store (else: no weights at all)

    @property
    def trainable(self) -> bool:
        return self.recipe is not None

    def runtime_class(self) -> type:
        return _resolve(self.runtime)

    def settings_class(self) -> type:
        return _resolve(self.settings)

    def compact_recipe(self) -> dict:
        if self.recipe is None:
            raise DeepIslesError(f"member {self.name} has no training recipe")
        return {"format": 2, "member": self.name, **copy.deepcopy(_resolve(self.recipe))}


def _resolve(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


_M = "deepisles.members"
MEMBERS: dict[str, MemberSpec] = {
    s.name: s
    for s in (
        MemberSpec("classical", f"{_M}.classical:ClassicalMember", f"{_M}.classical:ClassicalParams", stored=False),
        MemberSpec("seals", f"{_M}.seals:SealsMember", f"{_M}.seals:SealsSettings",
                   importer="deepisles.weights.import_seals", recipe=f"{_M}.seals:COMPACT_RECIPE"),
        MemberSpec("nvauto", f"{_M}.nvauto:NvautoMember", f"{_M}.nvauto:NvautoSettings",
                   importer="deepisles.weights.import_nvauto", recipe=f"{_M}.nvauto:COMPACT_RECIPE"),
        MemberSpec("factorizer", f"{_M}.factorizer:FactorizerMember", f"{_M}.factorizer:FactorizerSettings",
                   importer="deepisles.weights.import_factorizer", recipe=f"{_M}.factorizer:COMPACT_RECIPE"),
    )
}  # fmt: skip



# The lists every consumer reads, computed from MEMBERS when asked (an entry added to MEMBERS shows up in all).
def known_members() -> tuple[str, ...]:
    """Every name ``--members`` accepts."""
    return tuple(MEMBERS)


def deep_members() -> tuple[str, ...]:
    """Members with stored networks (what ``--members auto`` runs)."""
    return tuple(n for n, s in MEMBERS.items() if s.stored)


def importable_members() -> tuple[str, ...]:
    """Members ``deepisles weights import`` converts."""
    return tuple(n for n, s in MEMBERS.items() if s.importer)


def trainable_members() -> tuple[str, ...]:
    """Members ``deepisles train`` trains (those with a compact recipe)."""
    return tuple(n for n, s in MEMBERS.items() if s.trainable)


_LISTS = {"KNOWN_MEMBERS": known_members, "DEEP_MEMBERS": deep_members, "IMPORTABLE_MEMBERS": importable_members,
          "TRAINABLE_MEMBERS": trainable_members}  # fmt: skip


def __getattr__(name: str):  # the lists as module constants (``from ... import DEEP_MEMBERS``), never stale
    if name in _LISTS:
        return _LISTS[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def spec(name: str, among: tuple[str, ...] | None = None, what: str = "member") -> MemberSpec:
    """The entry of ``name``; ``DeepIslesError`` listing the choices when it is not one of ``among``
    (default: every known member)."""
    among = known_members() if among is None else among
    if name not in among:
        raise DeepIslesError(f"unknown {what} {name!r}; choose from {', '.join(among)}")
    return MEMBERS[name]
