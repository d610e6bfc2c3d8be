"""Full-size NVAUTO models in the official DeepISLES layout (``weights/NVAUTO/ts/model{k}.ts``).

Run with the reference interpreter (MONAI 0.9.0, the version DeepISLES pins). Each model is a MONAI 0.9.0
``SegResNet`` with random weights, ``torch.jit.script``-ed and ``torch.jit.save``-d, as the official files
are TorchScript archives of SegResNets. The official archives' exact hyper-parameters are not published
outside the weights; we use the NVAUTO ISLES'22 description (Auto3DSeg SegResNet: 32 initial filters,
5 stages with 1, 2, 2, 4, 4 residual blocks, one block per decoder stage; MONAI's default GroupNorm(8)),
2 input channels [ADC, DWI], 2 output channels.

usage: python build_nvauto.py OUT_ROOT [--models 15] [--replicate]
"""
import argparse
import os
from pathlib import Path

import torch

CONFIG = dict(spatial_dims=3, in_channels=2, out_channels=2, init_filters=32,
              blocks_down=(1, 2, 2, 4, 4), blocks_up=(1, 1, 1, 1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--models", type=int, default=15)
    ap.add_argument("--replicate", action="store_true",
                    help="build model0 only; the others are hard links to it (same timing, less build time)")
    args = ap.parse_args()
    from monai.networks.nets import SegResNet

    ts = args.out / "weights" / "NVAUTO" / "ts"
    ts.mkdir(parents=True, exist_ok=True)
    for k in range(args.models):
        path = ts / f"model{k}.ts"
        if path.exists():
            continue
        if args.replicate and k > 0:
            os.link(ts / "model0.ts", path)
            print(f"NVAUTO model{k}: hard link to model0", flush=True)
            continue
        torch.manual_seed(100 + k)
        net = SegResNet(**CONFIG).eval()
        torch.jit.save(torch.jit.script(net), str(path))
        n = sum(p.numel() for p in net.parameters())
        print(f"NVAUTO model{k}: {n / 1e6:.1f} M parameters -> {path}", flush=True)


if __name__ == "__main__":
    main()
