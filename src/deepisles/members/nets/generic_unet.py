"""nnU-Net v1 ``Generic_UNet`` as nnU-Net v1's ``nnUNetTrainerV2`` builds it; the SEALS member runs it and
``deepisles train`` trains it (the compact default model, fine-tuning of the official folds).

Our own code, with the parameter names of the original so that the official state dicts load strictly:

* encoder ``conv_blocks_context[d]`` (``StackedConvLayers`` -> ``blocks[i]`` -> ``conv``/``instnorm``), the first
  conv of every stage but the first strided by the previous pool kernel (no max pooling);
* bottleneck ``conv_blocks_context[-1]`` = ``Sequential(StackedConvLayers(n-1 convs), StackedConvLayers(1 conv))``;
* decoder ``tu[u]`` (``ConvTranspose``, kernel = stride = pool kernel, no bias) then
  ``conv_blocks_localization[u]`` (same two-part layout) on ``cat(up, skip)``;
* ``seg_outputs[u]`` bias-free 1x1 convolutions; ``forward`` returns only the last (full resolution) one, at
  inference and in training (deepisles' loss has no deep supervision; the other heads exist so that the official
  state dicts load).

Each block is conv (bias) -> InstanceNorm (affine, eps 1e-5) -> LeakyReLU(0.01); padding 1 where the kernel is 3,
else 0 (as nnU-Net does). Widths: ``base * 2**d`` capped at ``max_num_features`` (320 for 3D).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class GenericUNetConfig:
    """What ``Generic_UNet.__init__`` receives from ``nnUNetTrainerV2.initialize_network``."""

    input_channels: int
    base_num_features: int
    num_classes: int
    pool_op_kernel_sizes: list[list[int]]
    conv_kernel_sizes: list[list[int]]
    conv_per_stage: int = 2
    feat_map_mul_on_downscale: float = 2.0
    max_num_features: int = 320
    norm_eps: float = 1e-5
    negative_slope: float = 1e-2

    @property
    def num_pool(self) -> int:
        return len(self.pool_op_kernel_sizes)

    @classmethod
    def from_dict(cls, d: dict) -> GenericUNetConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def _pad(kernel) -> list[int]:
    return [1 if k == 3 else 0 for k in kernel]


class ConvDropoutNormNonlin(nn.Module):
    """conv -> InstanceNorm3d -> LeakyReLU (dropout p=0 in nnUNetTrainerV2, so no dropout module)."""

    def __init__(self, cin: int, cout: int, kernel, stride, cfg: GenericUNetConfig):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, tuple(kernel), tuple(stride), tuple(_pad(kernel)), bias=True)
        self.instnorm = nn.InstanceNorm3d(cout, eps=cfg.norm_eps, affine=True)
        self.lrelu = nn.LeakyReLU(cfg.negative_slope, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lrelu(self.instnorm(self.conv(x)))


class StackedConvLayers(nn.Module):
    def __init__(self, cin: int, cout: int, num_convs: int, kernel, cfg: GenericUNetConfig, first_stride=None):
        super().__init__()
        self.input_channels, self.output_channels = cin, cout
        ones = [1] * len(kernel)
        layers = [ConvDropoutNormNonlin(cin, cout, kernel, first_stride or ones, cfg)]
        layers += [ConvDropoutNormNonlin(cout, cout, kernel, ones, cfg) for _ in range(num_convs - 1)]
        self.blocks = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class GenericUNet(nn.Module):
    """Inference-only ``Generic_UNet`` (3D, convolutional pooling and upsampling); returns full-res logits."""

    def __init__(self, cfg: GenericUNetConfig):
        super().__init__()
        self.cfg = cfg
        pools, kernels, n = cfg.pool_op_kernel_sizes, cfg.conv_kernel_sizes, cfg.num_pool
        if len(kernels) != n + 1:
            raise ValueError(f"need {n + 1} conv kernel sizes for {n} pooling steps, got {len(kernels)}")
        context = []
        cin, cout = cfg.input_channels, cfg.base_num_features
        for d in range(n):
            stride = pools[d - 1] if d != 0 else None
            context.append(StackedConvLayers(cin, cout, cfg.conv_per_stage, kernels[d], cfg, stride))
            cin = cout
            cout = min(int(np.round(cout * cfg.feat_map_mul_on_downscale)), cfg.max_num_features)
        final = cout  # convolutional upsampling: the bottleneck ends with `cout` features
        context.append(nn.Sequential(
            StackedConvLayers(cin, cout, cfg.conv_per_stage - 1, kernels[n], cfg, pools[-1]),
            StackedConvLayers(cout, final, 1, kernels[n], cfg),
        ))
        tu, loc = [], []
        for u in range(n):
            down = final
            skip = context[-(2 + u)].output_channels
            final = skip
            tu.append(nn.ConvTranspose3d(down, skip, tuple(pools[-(u + 1)]), tuple(pools[-(u + 1)]), bias=False))
            k = kernels[-(u + 1)]
            loc.append(nn.Sequential(
                StackedConvLayers(2 * skip, skip, cfg.conv_per_stage - 1, k, cfg),
                StackedConvLayers(skip, final, 1, k, cfg),
            ))
        self.conv_blocks_context = nn.ModuleList(context)
        self.conv_blocks_localization = nn.ModuleList(loc)
        self.tu = nn.ModuleList(tu)
        self.seg_outputs = nn.ModuleList(
            nn.Conv3d(loc[u][-1].output_channels, cfg.num_classes, 1, 1, 0, 1, 1, False) for u in range(n)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.conv_blocks_context[:-1]:
            x = block(x)
            skips.append(x)
        x = self.conv_blocks_context[-1](x)
        for u in range(len(self.tu)):
            x = self.tu[u](x)
            x = torch.cat((x, skips[-(u + 1)]), dim=1)
            x = self.conv_blocks_localization[u](x)
        return self.seg_outputs[-1](x)


def build(cfg: GenericUNetConfig | dict) -> GenericUNet:
    if isinstance(cfg, dict):
        cfg = GenericUNetConfig.from_dict(cfg)
    return GenericUNet(cfg)
