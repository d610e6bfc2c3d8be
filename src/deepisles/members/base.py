"""The member contract: what every ensemble member declares, and the three stages a case goes through.

``run(case)`` = ``export(infer(x), context)`` with ``x, context = preprocess(case)``:

* ``preprocess(case, label=None) -> (network input, context)``: the member's own preparation of the DWI-grid
  ``Case`` (resampling, normalisation, ...). The context keeps what the way back needs (grids, crop boxes) and,
  when a ``label`` on the DWI grid is given, that label on the network's grid. Training uses this stage as it is
  (``training/members.py``): a network sees the same input in training as at inference.
* ``infer(x)``: the networks on the prepared input (an iterable of per-network outputs where the export treats
  each network on its own, so that only one is held in memory at a time).
* ``export(output, context) -> MemberResult``: the inverse of the preprocessing's resampling, the member's
  decision rule and :meth:`Member.result` (probability on the DWI grid, clipped, and the binary mask). A member
  with several networks also counts, per DWI voxel, how many of them decide "lesion" on their own
  (:class:`VoteCount`, the ``votes`` of the result: the ensemble's agreement map); without one, the member's own
  mask is one network's vote.

Members read their stored weights (``from_store``) but never write files.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from deepisles.core import Case
from deepisles.members.config import ConfigError, MemberConfig, ModelEntry, Settings

__all__ = [
    "Case", "Context", "Member", "MemberResult", "MemberUnavailable", "StoredMember", "VoteCount", "match_decision",
    "read_stored_member", "weights_origin", "DEFAULT_MODELS_DIR", "DEFAULT_MODELS_NOTE", "has_default_model",
]  # fmt: skip


@dataclass
class MemberResult:
    name: str
    probability: np.ndarray  # float32 lesion probability on the DWI grid, in [0, 1]
    mask: np.ndarray  # uint8 0/1 binary decision of this member on the DWI grid
    info: dict = field(default_factory=dict)
    votes: np.ndarray | None = None  # uint8: how many of the member's networks vote lesion per voxel (None: the mask)
    networks: int = 1  # how many networks ``votes`` counts
    threshold: float = 0.5  # the member's decision: mask = probability >= threshold

    def __post_init__(self) -> None:
        if self.votes is None:
            self.votes, self.networks = np.asarray(self.mask, dtype=np.uint8), 1


class VoteCount:
    """Per-voxel count (uint8) of a member's networks that decide "lesion", each by the member's own rule applied
    to that network alone; one array however many networks (at most 255)."""

    def __init__(self) -> None:
        self.count: np.ndarray | None = None
        self.networks = 0

    def add(self, decision: np.ndarray) -> None:
        d = np.asarray(decision, dtype=bool)
        if self.count is None:
            self.count = np.zeros(d.shape, dtype=np.uint8)
        elif d.shape != self.count.shape:
            raise ValueError(f"network vote of shape {d.shape}, earlier votes {self.count.shape}")
        if self.networks == 255:
            raise ValueError("more than 255 networks in one member: the uint8 vote count would overflow")
        self.count += d
        self.networks += 1


@dataclass
class Context:
    """What ``preprocess`` hands to ``export``: the DWI grid's shape, the label on the network's grid (training)
    and what the report says about this case. Members subclass it for their own geometry."""

    shape: tuple[int, ...]
    label: np.ndarray | None = None
    info: dict = field(default_factory=dict)


class MemberUnavailable(Exception):
    """A member cannot run (no weights, missing modality, ...); the reason goes into the report."""

    def __init__(self, member: str, reason: str):
        self.member, self.reason = member, reason
        super().__init__(f"{member}: {reason}")


def match_decision(prob: np.ndarray, decision: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """``prob`` (float32) moved, where needed, to exactly ``threshold`` or the float32 just below it, so that
    ``prob >= threshold`` equals the reference's ``decision``.

    The references decide otherwise than by thresholding the probability we report (argmax over two rounded
    softmax channels, ties to background; the sign of a scaled logit); where the two disagree the probability
    is within float rounding of the threshold, so the move is at most a few float steps."""
    prob = np.array(prob, dtype=np.float32, copy=True)
    decision = np.asarray(decision, dtype=bool)
    t = np.float32(threshold)
    prob[decision & (prob < t)] = t
    prob[~decision & (prob >= t)] = np.nextafter(t, np.float32(0))
    return prob


class Member(ABC):
    """An ensemble member.

    Subclasses declare ``name``, ``modalities`` (inputs in the order the network takes them), which of
    them are ``required``, a human ``description`` for the report, and the three stages (module docstring).
    ``threshold`` turns the probability into the member's binary mask (0.5 unless the member says otherwise).
    """

    name: str = "member"
    modalities: tuple[str, ...] = ("dwi", "adc")
    required: tuple[str, ...] = ("dwi", "adc")
    description: str = ""
    threshold: float = 0.5
    weights_origin: dict | None = None  # set by from_store: imported official / trained / packaged default
    last_info: dict = {}  # what the last case's export reported (set per instance)

    def check_inputs(self, case: Case) -> None:
        missing = [m for m in self.required if case.modality(m) is None]
        if missing:
            raise MemberUnavailable(self.name, f"needs {', '.join(m.upper() for m in missing)}")

    @abstractmethod
    def preprocess(self, case: Case, label: np.ndarray | None = None) -> tuple[Any, Context]:
        """The network input for ``case`` and the context its export needs (``label``: see the module doc)."""

    @abstractmethod
    def infer(self, x: Any) -> Any:
        """The networks' output on the prepared input (on the network's grid)."""

    @abstractmethod
    def export(self, output: Any, context: Context) -> MemberResult:
        """The output back on the DWI grid as a probability and mask (through :meth:`result`)."""

    def run(self, case: Case) -> MemberResult:
        self.check_inputs(case)
        x, context = self.preprocess(case)
        return self.export(self.infer(x), context)

    def result(self, probability: np.ndarray, context: Context, votes: VoteCount | None = None) -> MemberResult:
        """The member's result from its lesion probability on the DWI grid (clipped to [0, 1]; mask =
        probability >= threshold) and its networks' ``votes`` on the DWI grid (none: the mask is one vote)."""
        prob = np.clip(np.asarray(probability, dtype=np.float32), 0.0, 1.0)
        if tuple(prob.shape) != tuple(context.shape):
            raise RuntimeError(f"member {self.name} returned shape {prob.shape}, DWI grid is {tuple(context.shape)}")
        self.last_info = dict(context.info)
        mask = (prob >= self.threshold).astype(np.uint8)
        if votes is None or votes.count is None:
            return MemberResult(self.name, prob, mask, self.report_info(), threshold=self.threshold)
        if tuple(votes.count.shape) != tuple(context.shape):
            raise RuntimeError(f"member {self.name} voted on shape {votes.count.shape}, DWI grid is "
                               f"{tuple(context.shape)}")  # fmt: skip
        return MemberResult(self.name, prob, mask, self.report_info(), votes.count, votes.networks, self.threshold)

    def report_info(self) -> dict:
        info = {"description": self.description, "inputs": list(self.modalities)}
        if self.weights_origin is not None:
            info["weights"] = self.weights_origin
        return {**info, **self.last_info}


# --- members whose networks come from the weight store ----------------------------------------------------
# Compact default models trained by deepisles' own code on synthetic cases (scripts/train_default_models.py),
# shipped with the package in the store format; used for a member when no weights of it are installed.
DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[1] / "default_models"
DEFAULT_MODELS_NOTE = "default model trained on synthetic data, not clinically validated"


def has_default_model(name: str) -> bool:
    return (DEFAULT_MODELS_DIR / name / "member.json").is_file()


def read_stored_member(name: str, allow_default: bool = True) -> tuple[dict, Path]:
    """``(member.json as stored, folder)`` of an installed member, else (``allow_default``) of the packaged
    default model; ``MemberUnavailable`` (with the reason that goes into the report) when neither exists or the
    entry is broken."""
    from deepisles import store
    from deepisles.errors import DeepIslesError

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


def weights_origin(config: MemberConfig) -> dict:
    """What the report says about where a member's weights come from."""
    if config.origin:
        return dict(config.origin)
    return {"kind": "imported", "source": config.source}


class StoredMember(Member):
    """A deep-learning member: typed ``config`` (member.json), one network per ``config.models`` entry.

    Subclasses set ``settings_cls`` and implement the three stages, ``build_network`` (a network with random
    weights for one model entry), ``model_entry`` (how a trained fold's file is named), ``window`` (the
    inference window, also the training patch) and ``out_channels``. ``__init__`` never moves the networks it
    is given (training hands over the network it is training).
    """

    settings_cls: ClassVar[type[Settings]]
    archs: ClassVar[tuple[str, ...]] = ()  # architectures a member's models may have (FACTORIZER)

    def __init__(self, config: MemberConfig, networks: list, device: str = "cpu", fast: bool = False):
        import torch

        if len(networks) != len(config.models):
            raise ValueError(f"{self.name}: {len(networks)} networks for {len(config.models)} model entries")
        self.config = config
        self.settings = config.settings
        # SEALS and NVAUTO: ``settings.decision_threshold`` (0.5, the reference argmax, unless a model says otherwise)
        self.threshold = float(getattr(self.settings, "decision_threshold", 0.5))
        self.networks = list(networks)
        self.device = torch.device(device)
        self.fast = bool(fast)
        self.modalities = self.required = tuple(config.inputs)
        self.last_info = {}

    def decide(self, prob, reference):
        """The member's decision on ``prob`` (numpy or torch): the reference's own (its argmax, ``reference``) at the
        default threshold 0.5, else ``prob >= settings.decision_threshold``. Used for the member and each network."""
        return reference if self.threshold == 0.5 else prob >= self.threshold

    # -- configuration -------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, meta: dict, where: str | Path = "member.json") -> MemberConfig:
        """A stored member.json (any readable format) as this member's typed config."""
        return MemberConfig.from_json(meta, cls.settings_cls, cls.name, str(where))

    @property
    def window(self) -> list[int]:
        raise NotImplementedError

    @property
    def out_channels(self) -> int:
        raise NotImplementedError

    # -- networks ------------------------------------------------------------------------------------------
    @classmethod
    def build_network(cls, config: MemberConfig, entry: ModelEntry):
        raise NotImplementedError

    @classmethod
    def model_entry(cls, fold: int, arch: str | None = None) -> ModelEntry:
        raise NotImplementedError

    @property
    def models(self) -> list:
        """The loaded networks, in ``config.models`` order."""
        return self.networks

    @classmethod
    def models_to_run(cls, config: MemberConfig, fast: bool) -> tuple[ModelEntry, ...]:
        """The stored models a run uses (all; members with a ``fast`` subset override this)."""
        return config.models

    @classmethod
    def load_network(cls, config: MemberConfig, entry: ModelEntry, folder: Path):
        """The network of ``entry`` with its stored tensors (safetensors, loaded strictly), in eval mode."""
        from safetensors.torch import load_file

        path = Path(folder) / entry.file
        if not entry.file.endswith(".safetensors"):
            raise MemberUnavailable(cls.name, f"{path}: not a safetensors file; re-import member {cls.name}")
        try:
            net = cls.build_network(config, entry)
        except ConfigError as exc:
            raise MemberUnavailable(cls.name, str(exc)) from None
        try:
            net.load_state_dict(load_file(str(path)), strict=True)
        except RuntimeError as exc:
            raise MemberUnavailable(cls.name, f"{path}: tensors do not match the network in member.json "
                                              f"({str(exc).splitlines()[0]})") from None
        return net.eval().requires_grad_(False)

    # -- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: MemberConfig, folder: Path, device: str = "cpu", fast: bool = False, **options):
        """The member with the networks of ``models_to_run`` read from ``folder``, on ``device``."""
        entries = cls.models_to_run(config, fast)
        if not entries:
            raise MemberUnavailable(cls.name, f"{folder}: member.json lists no models; re-import the weights")
        nets = [cls.load_network(config, e, folder).to(device) for e in entries]
        member = cls(config.replace(models=tuple(entries)), nets, device=device, fast=fast, **options)
        member.weights_origin = weights_origin(config)
        return member

    @classmethod
    def from_folder(cls, folder: Path, device: str = "cpu", fast: bool = False, **options):
        """The member stored in ``folder`` (the store's, a packaged or an exported one)."""
        from deepisles import store

        meta, folder = store.read_member_folder(folder)
        return cls.from_config(cls.parse(meta, Path(folder) / "member.json"), folder, device, fast, **options)

    @classmethod
    def from_store(cls, device: str = "cpu", fast: bool = False, **options):
        """The installed member, else the packaged default model; ``MemberUnavailable`` saying why not."""
        meta, folder = read_stored_member(cls.name)
        try:
            config = cls.parse(meta, Path(folder) / "member.json")
        except ConfigError as exc:
            raise MemberUnavailable(cls.name, str(exc)) from None
        return cls.from_config(config, folder, device, fast, **options)
