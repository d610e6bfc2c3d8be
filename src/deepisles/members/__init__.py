"""Ensemble members behind one interface (see base.py); the registry of known members lives here."""

from __future__ import annotations

import importlib

from deepisles.errors import DeepIslesError
from deepisles.members.base import Case, Member, MemberResult, MemberUnavailable
from deepisles.members.classical import ClassicalMember

__all__ = [
    "Case", "Member", "MemberResult", "MemberUnavailable", "ClassicalMember", "check_member_spec", "resolve_members",
    "clear_cache",
]

# Every member deepisles knows, by CLI name, and where its runtime lives.
DEEP_MEMBERS = {
    "seals": ("deepisles.members.seals", "SealsMember"),
    "nvauto": ("deepisles.members.nvauto", "NvautoMember"),
    "factorizer": ("deepisles.members.factorizer", "FactorizerMember"),
}
KNOWN_MEMBERS = ("classical", *DEEP_MEMBERS)

# Loaded members, reused across cases (a cohort or a long-lived process loads each network once).
_CACHE: dict[tuple[str, str, bool], Member] = {}


def clear_cache() -> None:
    _CACHE.clear()


def _build(name: str, device: str, fast: bool) -> Member:
    if name == "classical":
        return ClassicalMember()
    key = (name, device, fast)
    if key not in _CACHE:
        module, cls = DEEP_MEMBERS[name]
        _CACHE[key] = getattr(importlib.import_module(module), cls).from_store(device=device, fast=fast)
    return _CACHE[key]


def check_member_spec(spec: str | list[str] | None) -> list[str]:
    """The member names ``--members`` asks for (``auto``: every deep member), checked without loading anything."""
    if spec is None or spec == "auto" or spec == ["auto"]:
        return list(DEEP_MEMBERS)
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = list(dict.fromkeys(n.strip().lower() for n in names if n.strip()))
    unknown = [n for n in names if n not in KNOWN_MEMBERS]
    if unknown or not names:
        raise DeepIslesError(
            f"unknown member(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(KNOWN_MEMBERS)}"
        )
    return names


def resolve_members(
    spec: str | list[str] | None, device: str = "cpu", fast: bool = False
) -> tuple[list[Member], list[dict]]:
    """Members to run for ``--members`` and the ones that cannot run, each with its reason.

    ``None``/``"auto"``: every deep-learning member whose weights are installed; when none is, the packaged
    default models (trained on synthetic data); when those are absent too, the classical member alone (and the
    skipped members say why). A named member uses its installed weights, else its default model.
    """
    auto = spec is None or spec == "auto" or spec == ["auto"]
    names = check_member_spec(spec)
    members, skipped = [], []
    if auto:
        # imported/trained weights win; the packaged default models are used only when none is installed,
        # so an ensemble never mixes validated and default models without being asked to
        from deepisles.weights.store import installed_members

        installed = [n for n in names if n in installed_members()]
        if installed:
            for name in names:
                if name not in installed:
                    skipped.append({"member": name, "reason": "no weights installed (the packaged default model "
                                                              "is not mixed with installed weights)"})
            names = installed
    for name in names:
        try:
            members.append(_build(name, device, fast))
        except MemberUnavailable as exc:
            skipped.append({"member": name, "reason": exc.reason})
    if auto and not members:
        members.append(ClassicalMember(fallback=True))
    if not members:
        reasons = "; ".join(f"{s['member']}: {s['reason']}" for s in skipped)
        raise DeepIslesError(f"none of the requested members can run ({reasons})")
    return members, skipped
