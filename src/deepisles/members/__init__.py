"""Ensemble members behind one interface (see base.py); the registry of known members lives here."""

from __future__ import annotations

from deepisles.members.base import Case, Member, MemberResult, MemberUnavailable
from deepisles.members.classical import ClassicalMember

__all__ = ["Case", "Member", "MemberResult", "MemberUnavailable", "ClassicalMember", "resolve_members"]

# Every member deepisles knows, by CLI name. The deep-learning members (seals, nvauto, factorizer) register
# here when their runtimes exist; until then asking for them is an error that names the reason.
KNOWN_MEMBERS = ("classical", "seals", "nvauto", "factorizer")


def _build(name: str) -> Member:
    if name == "classical":
        return ClassicalMember()
    raise MemberUnavailable(name, "no runtime for this member in this version of deepisles")


def resolve_members(spec: str | list[str] | None) -> tuple[list[Member], list[dict]]:
    """Members to run for ``--members`` and the ones that cannot run, each with its reason.

    ``None``/``"auto"``: every deep-learning member whose weights are installed; when there is none,
    the classical member alone (and the skipped members say why).
    """
    if spec is None or spec == "auto" or spec == ["auto"]:
        members, skipped = [], []
        for name in KNOWN_MEMBERS[1:]:
            try:
                members.append(_build(name))
            except MemberUnavailable as exc:
                skipped.append({"member": name, "reason": exc.reason})
        if not members:
            members.append(ClassicalMember(fallback=True))
        return members, skipped
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip().lower() for n in names if n.strip()]
    unknown = [n for n in names if n not in KNOWN_MEMBERS]
    if unknown:
        from deepisles.errors import DeepIslesError

        raise DeepIslesError(f"unknown member(s) {', '.join(unknown)}; choose from {', '.join(KNOWN_MEMBERS)}")
    members, skipped = [], []
    for name in dict.fromkeys(names):
        try:
            members.append(_build(name))
        except MemberUnavailable as exc:
            skipped.append({"member": name, "reason": exc.reason})
    if not members:
        from deepisles.errors import DeepIslesError

        reasons = "; ".join(f"{s['member']}: {s['reason']}" for s in skipped)
        raise DeepIslesError(f"none of the requested members can run ({reasons})")
    return members, skipped
