"""What training needs from a member, all through the member contract and the registry (no per-member code here).

A ``Trainable`` is one network being trained (one fold / one ensemble model) inside the member's own runtime
class: a case becomes a training sample through the member's ``preprocess`` stage (the one inference uses), the
training patch is its inference ``window``, validation runs its ``run``, the loss follows its ``out_channels``
(softmax over classes, or one sigmoid logit) and the trained weights are written back as one more entry of its
``models`` in the store format. Where the network starts: the member's compact recipe (named by the registry),
its packaged default model or its imported official weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from deepisles.errors import DeepIslesError
from deepisles.members.base import Case, Member, MemberUnavailable, StoredMember
from deepisles.members.config import MemberConfig, ModelEntry
from deepisles.members.registry import spec, trainable_members


def _spec(member: str):
    return spec(member, trainable_members(), "member to train")


def compact_meta(member: str) -> dict:
    """The member's compact default recipe as a format-2 member.json (no models yet)."""
    return _spec(member).compact_recipe()


@dataclass
class Sample:
    """One case on the network's grid: image (C, *S) float32 and label (*S) uint8."""

    image: np.ndarray
    label: np.ndarray
    case_id: str = ""


class Trainable:
    """A member's configuration plus one network being trained; ``config.models`` holds this fold's entry."""

    def __init__(self, cls: type[StoredMember], config: MemberConfig, network: torch.nn.Module, fold: int):
        self.cls, self.config, self.network, self.fold = cls, config, network, int(fold)
        self.name = cls.name
        self.patch_override: list[int] | None = None
        # the member's runtime around the network being trained (its networks are never moved by it)
        self.member = cls(config, [network])

    @property
    def entry(self) -> ModelEntry:
        return self.config.models[0]

    @property
    def patch(self) -> list[int]:
        """The member's inference window."""
        return self.member.window

    @property
    def train_patch(self) -> list[int]:
        """Training patch: the inference window unless overridden (``--patch``)."""
        return self.patch_override or self.patch

    @property
    def out_channels(self) -> int:
        return self.member.out_channels

    def needs_flair(self) -> bool:
        return "flair" in self.config.inputs

    def sample(self, case: Case, label: np.ndarray, case_id: str = "") -> Sample:
        """The case through the member's own ``preprocess`` stage, with its label on the network's grid."""
        x, ctx = self.member.preprocess(case, label)
        image = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        return Sample(image.astype(np.float32), ctx.label, case_id)

    def loss(self):
        from monai.losses import DiceCELoss

        if self.out_channels == 1:
            return DiceCELoss(sigmoid=True, batch=True)
        return DiceCELoss(to_onehot_y=True, softmax=True, batch=True)

    # validation / export
    def runtime(self, device: str = "cpu") -> Member:
        """The member's runtime with the network being trained, for validation on ``device``."""
        return self.cls(self.config, [self.network], device=device)

    def weight_file(self) -> str:
        return self.entry.file

    def save_weights(self, path: Path) -> None:
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.network.state_dict().items()}
        save_file(state, str(path))

    def member_meta(self, folds: dict[int, str]) -> dict:
        """member.json (format 2, without ``files``) for the given ``{fold: weight file}``."""
        models = [ModelEntry(file=folds[k], name=self.cls.model_entry(k, self.entry.arch).name, fold=k,
                             arch=self.entry.arch, network=self.entry.network,
                             ensemble_weight=self.entry.ensemble_weight) for k in sorted(folds)]  # fmt: skip
        return self.config.replace(models=tuple(models), files={}).to_json()


def _start(member: str, init: str) -> tuple[MemberConfig, Path | None]:
    """The configuration training starts from and the folder of its weights (None: random initialisation)."""
    s = _spec(member)
    cls = s.runtime_class()
    if init == "none":
        return cls.parse(s.compact_recipe(), f"{member} compact recipe"), None
    from deepisles import store

    if init == "official":
        try:
            meta, folder = store.read_member(member)
        except FileNotFoundError:
            raise DeepIslesError(f"--init official: no {member} weights installed; run "
                                 "`deepisles weights import PATH` first") from None
    elif init == "default":
        from deepisles.members import base

        if not base.has_default_model(member):
            raise DeepIslesError(f"--init default: no packaged default model for {member}")
        meta, folder = store.read_member_folder(base.DEFAULT_MODELS_DIR / member)
    else:
        raise DeepIslesError(f"unknown --init {init!r}; choose none, default or official")
    return cls.parse(meta, Path(folder) / "member.json"), Path(folder)


def make_trainable(member: str, init: str = "none", fold: int = 0, arch: str = "resunet") -> Trainable:
    """The network to train for ``member`` and where it starts: ``none`` (the compact recipe, random weights),
    ``default`` (the packaged default model), ``official`` (the imported official weights in the store).
    ``arch`` chooses among the architectures of members that have several (FACTORIZER)."""
    cls = _spec(member).runtime_class()
    arch = arch if cls.archs else None
    config, folder = _start(member, init)
    if folder is None:
        start = cls.model_entry(fold, arch)
        net = cls.build_network(config, start)
    else:
        start = config.pick(fold, arch)
        try:
            net = cls.load_network(config, start, folder)
        except MemberUnavailable as exc:
            raise DeepIslesError(exc.reason) from None
        net.train().requires_grad_(True)
    entry = cls.model_entry(fold, arch if arch is not None else start.arch)
    entry = ModelEntry(entry.file, entry.name, entry.fold, entry.arch, start.network, start.ensemble_weight)
    config = config.replace(models=(entry,), files={}, origin=None)
    return Trainable(cls, config, net, fold)
