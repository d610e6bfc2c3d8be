"""Full-size FACTORIZER checkpoints in the official DeepISLES layout, saved as PyTorch Lightning 1.6.5 would.

Run with the reference interpreter (vendored factorizer 0.0.1 from DeepISLES on PYTHONPATH, PL 1.6.5,
MONAI 0.9.0). The networks are built from the `task:` section of the official ISLES'22 training
configurations of pashtari/factorizer-isles22 (``config_isles22_fold0_resunet.yaml`` and
``config_isles22_fold0_swin-factorizer.yaml``, read with that repository's ``registry.py``), at their real
sizes (encoder widths 32..512, strides 1,2,2,2,2, head_dim 8, ...), with random weights.

usage: python build_factorizer.py OUT_ROOT --configs DIR [--folds 0 1 2 3 4] [--archs resunet swin-factorizer] [--replicate]
  DIR holds registry.py, resunet.yaml and swin.yaml (fetched; not part of this repository)
"""
import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
CKPT = "epoch=1999-step=99999.ckpt"


def load_task(configs: Path, arch: str, fold: int):
    import registry  # noqa: F401  (registers the !ft. / !nn. tags on yaml.SafeLoader)
    import yaml

    text = (configs / ("resunet.yaml" if arch == "resunet" else "swin.yaml")).read_text()
    text = text.replace("split: 0", f"split: {fold}").replace("fold0", f"fold{fold}")
    task_text = text[text.index("task:"): text.index("training:")]
    cfg = yaml.load(task_text, registry.Loader)
    return cfg["task"]


def save_lightning_checkpoint(model, path: Path):
    """What Trainer.fit + ModelCheckpoint (PL 1.6.5) write for this module."""
    import pytorch_lightning as pl
    import pytorch_lightning.core.optimizer as plopt
    from pytorch_lightning.utilities import parsing

    parsing.clean_namespace(model.hparams)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1, max_steps=100000)
    trainer.strategy.connect(model)
    model.trainer = trainer
    trainer.state.fn = "fit"
    plopt._validate_scheduler_api = lambda *a, **k: None  # PL 1.6.5 predates torch 2's LRScheduler
    trainer.strategy.setup_optimizers(trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(str(path))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--configs", type=Path, required=True)
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--archs", nargs="+", default=["resunet", "swin-factorizer"])
    ap.add_argument("--replicate", action="store_true",
                    help="build one checkpoint per architecture; the other folds are hard links to it")
    args = ap.parse_args()
    sys.path.insert(0, str(args.configs))
    import torch

    logs = args.out / "weights" / "FACTORIZER" / "logs" / "isles2022_dwi-adc-flair"
    for arch in args.archs:
        first = None
        for fold in args.folds:
            path = logs / f"fold{fold}" / arch / "version_0" / "checkpoints" / CKPT
            if path.exists():
                first = first or path
                continue
            if args.replicate and first is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                os.link(first, path)
                print(f"FACTORIZER {arch} fold {fold}: hard link to {first}", flush=True)
                continue
            first = path
            torch.manual_seed(100 * fold + (arch != "resunet"))
            cls, params = load_task(args.configs, arch, fold)
            model = cls(**params)
            save_lightning_checkpoint(model, path)
            n = sum(p.numel() for p in model.parameters())
            print(f"FACTORIZER {arch} fold {fold}: {n / 1e6:.1f} M parameters -> {path}", flush=True)


if __name__ == "__main__":
    main()
