"""The member interface: what every ensemble member declares, receives and returns."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from deepisles.io.image import Image

MODALITIES = ("dwi", "adc", "flair")


@dataclass
class Case:
    """One preprocessed case, everything on the native DWI grid.

    ``adc`` is in the canonical unit (10^-3 mm^2/s); ``flair`` is registered to the DWI (or None);
    ``brain`` is the boolean brain mask. Members never read or write files.
    """

    dwi: Image
    adc: Image
    brain: np.ndarray
    flair: Image | None = None

    def modality(self, name: str) -> Image | None:
        return {"dwi": self.dwi, "adc": self.adc, "flair": self.flair}[name]


@dataclass
class MemberResult:
    name: str
    probability: np.ndarray  # float32 lesion probability on the DWI grid, in [0, 1]
    mask: np.ndarray  # uint8 0/1 binary decision of this member on the DWI grid
    info: dict = field(default_factory=dict)


class MemberUnavailable(Exception):
    """A member cannot run (no weights, missing modality, ...); the reason goes into the report."""

    def __init__(self, member: str, reason: str):
        self.member, self.reason = member, reason
        super().__init__(f"{member}: {reason}")


class Member(ABC):
    """An ensemble member.

    Subclasses declare ``name``, ``modalities`` (inputs in the order the network takes them), which of
    them are ``required``, and a human ``description`` for the report. ``predict`` does the member's own
    preprocessing and returns a lesion probability on the DWI grid; ``threshold`` turns it into the
    member's binary mask (0.5 unless the member defines otherwise).
    """

    name: str = "member"
    modalities: tuple[str, ...] = ("dwi", "adc")
    required: tuple[str, ...] = ("dwi", "adc")
    description: str = ""
    threshold: float = 0.5

    def check_inputs(self, case: Case) -> None:
        missing = [m for m in self.required if case.modality(m) is None]
        if missing:
            raise MemberUnavailable(self.name, f"needs {', '.join(m.upper() for m in missing)}")

    @abstractmethod
    def predict(self, case: Case) -> np.ndarray:
        """Lesion probability (float32, DWI grid shape, values in [0, 1])."""

    def run(self, case: Case) -> MemberResult:
        self.check_inputs(case)
        prob = np.clip(np.asarray(self.predict(case), dtype=np.float32), 0.0, 1.0)
        if prob.shape != case.dwi.shape:
            raise RuntimeError(f"member {self.name} returned shape {prob.shape}, DWI grid is {case.dwi.shape}")
        mask = (prob >= self.threshold).astype(np.uint8)
        return MemberResult(self.name, prob, mask, self.report_info())

    def report_info(self) -> dict:
        return {"description": self.description, "inputs": list(self.modalities)}


def read_stored_member(name: str) -> tuple[dict, object]:
    """``(member.json, folder)`` of an imported member; ``MemberUnavailable`` (with the reason that goes into
    the report) when it is not installed or its store entry is broken."""
    from deepisles.errors import DeepIslesError
    from deepisles.weights import store

    try:
        return store.read_member(name)
    except FileNotFoundError:
        raise MemberUnavailable(name, "no weights installed; run deepisles weights import PATH") from None
    except DeepIslesError as exc:
        raise MemberUnavailable(name, str(exc)) from None
