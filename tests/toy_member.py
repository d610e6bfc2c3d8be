"""A fourth ensemble member, for tests/test_member_registry.py: everything a member is, in its own file.

With one registry entry (``MemberSpec("toy", "toy_member:ToyMember", "toy_member:ToySettings",
recipe="toy_member:COMPACT_RECIPE")``) ``--members toy``, ``deepisles train --member toy`` and the weight store
work for it; docs/members-contract.md walks through the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from deepisles.core import Case
from deepisles.members.base import Context, MemberResult, StoredMember
from deepisles.members.config import ModelEntry, Settings, check_sizes


@dataclass(frozen=True)
class ToySettings(Settings):
    factor: int = 2  # the network sees the DWI grid subsampled by this factor
    window: tuple[int, ...] = (16, 16, 16)  # training patch

    def validate(self, where: str) -> None:
        check_sizes(self.window, f"{where}.window")


COMPACT_RECIPE = {"inputs": ["dwi", "adc"], "network": {"in_channels": 2, "out_channels": 2}, "settings": {}}


class ToyMember(StoredMember):
    name = "toy"
    settings_cls = ToySettings
    description = "toy member: one 3x3x3 convolution on z-scored DWI and ADC at half resolution"

    @property
    def window(self) -> list[int]:
        return list(self.settings.window)

    @property
    def out_channels(self) -> int:
        return int(self.config.network["out_channels"])

    @classmethod
    def build_network(cls, config, entry: ModelEntry) -> torch.nn.Module:
        spec = config.network_of(entry)
        return torch.nn.Conv3d(spec["in_channels"], spec["out_channels"], kernel_size=3, padding=1)

    @classmethod
    def model_entry(cls, fold: int, arch: str | None = None) -> ModelEntry:
        return ModelEntry(file=f"toy_{fold}.safetensors", name=f"toy_{fold}", fold=fold)

    def preprocess(self, case: Case, label: np.ndarray | None = None):
        brain = np.asarray(case.brain, bool)
        chans = []
        for m in self.config.inputs:
            x = np.asarray(case.modality(m).data, dtype=np.float32)
            v = x[brain] if brain.any() else x.ravel()
            chans.append(np.where(brain, (x - v.mean()) / (v.std() + 1e-6), 0).astype(np.float32))
        f = self.settings.factor
        x = torch.from_numpy(np.stack(chans))[:, ::f, ::f, ::f].contiguous()  # forward: subsample
        lab = None if label is None else (np.asarray(label)[::f, ::f, ::f] >= 0.5).astype(np.uint8)
        return x, Context(tuple(case.dwi.shape), lab)

    @torch.inference_mode()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.networks[0](x[None].to(self.device)).float(), dim=1)[0]

    def export(self, probs: torch.Tensor, context: Context) -> MemberResult:
        back = F.interpolate(probs[None], size=context.shape, mode="trilinear")[0]  # inverse: back to the DWI grid
        return self.result(back[1].cpu().numpy(), context)
