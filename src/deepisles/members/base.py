"""The member interface: what every ensemble member declares, receives and returns."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deepisles.core import Case  # noqa: F401 - moved to deepisles.core; re-exported

MODALITIES = ("dwi", "adc", "flair")


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
    weights_origin: dict | None = None  # set by from_store: imported official / trained / packaged default

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
        info = {"description": self.description, "inputs": list(self.modalities)}
        if self.weights_origin is not None:
            info["weights"] = self.weights_origin
        return info


# Compact default models trained by deepisles' own code on synthetic cases (scripts/train_default_models.py),
# shipped with the package in the store format; used for a member when no weights of it are installed.
DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[1] / "default_models"
DEFAULT_MODELS_NOTE = "default model trained on synthetic data, not clinically validated"


def has_default_model(name: str) -> bool:
    return (DEFAULT_MODELS_DIR / name / "member.json").is_file()


def read_stored_member(name: str, allow_default: bool = True) -> tuple[dict, Path]:
    """``(member.json, folder)`` of an installed member, else (``allow_default``) of the packaged default model;
    ``MemberUnavailable`` (with the reason that goes into the report) when neither exists or the entry is
    broken."""
    from deepisles.errors import DeepIslesError
    from deepisles.weights import store

    try:
        return store.read_member(name)
    except FileNotFoundError:
        if allow_default and has_default_model(name):
            try:
                return store.read_member_folder(DEFAULT_MODELS_DIR / name)
            except DeepIslesError as exc:
                raise MemberUnavailable(name, f"packaged default model: {exc}") from None
        raise MemberUnavailable(name, "no weights installed; run deepisles weights import PATH") from None
    except DeepIslesError as exc:
        raise MemberUnavailable(name, str(exc)) from None


def weights_origin(meta: dict) -> dict:
    """What the report says about where a member's weights come from."""
    origin = meta.get("origin")
    if origin:
        return dict(origin)
    return {"kind": "imported", "source": meta.get("source")}
