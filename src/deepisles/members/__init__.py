"""Ensemble members behind one contract (base.py), listed once (registry.py); choosing and caching them here."""

from __future__ import annotations

from deepisles.errors import DeepIslesError
from deepisles.members import registry
from deepisles.members.base import Case, Member, MemberResult, MemberUnavailable
from deepisles.members.classical import ClassicalMember

__all__ = [
    "Case", "Member", "MemberResult", "MemberUnavailable", "ClassicalMember", "check_member_spec", "resolve_members",
    "clear_cache", "DEEP_MEMBERS", "KNOWN_MEMBERS",
]  # fmt: skip



def __getattr__(name: str):  # KNOWN_MEMBERS, DEEP_MEMBERS: the registry's lists, read when asked
    if name in ("KNOWN_MEMBERS", "DEEP_MEMBERS"):
        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Loaded members, reused across cases (a cohort or a long-lived process loads each network once).
_CACHE: dict[tuple[str, str, bool], Member] = {}


def clear_cache() -> None:
    _CACHE.clear()


def _build(name: str, device: str, fast: bool) -> Member:
    spec = registry.spec(name)
    if not spec.stored:
        return spec.runtime_class()()
    key = (name, device, fast)
    if key not in _CACHE:
        _CACHE[key] = spec.runtime_class().from_store(device=device, fast=fast)
    return _CACHE[key]


def _is_auto(spec: str | list[str] | None) -> bool:
    return spec is None or spec == "auto" or spec == ["auto"]


def check_member_spec(spec: str | list[str] | None) -> list[str]:
    """The member names ``--members`` asks for (``auto``: every deep member), checked without loading anything."""
    if _is_auto(spec):
        return list(registry.deep_members())
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = list(dict.fromkeys(n.strip().lower() for n in names if n.strip()))
    known = registry.known_members()
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise DeepIslesError(
            f"unknown member(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}"
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
    auto = _is_auto(spec)
    names = check_member_spec(spec)
    members, skipped = [], []
    if auto:
        # imported/trained weights win; the packaged default models are used only when none is installed,
        # so an ensemble never mixes validated and default models without being asked to
        from deepisles.store import installed_members

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
