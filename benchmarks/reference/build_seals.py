"""Full-size SEALS weights in the official DeepISLES layout, saved by the REFERENCE trainer classes.

Run with the reference interpreter (DeepISLES' vendored nnU-Net v1 fork first on PYTHONPATH, the shims in
``shims/`` on PYTHONPATH too). Random weights; the plans are a plausible nnU-Net v1 ``3d_fullres`` plan for
1 mm ISLES'22 data (the real SEALS plans.pkl is not public outside the weight archive):

* one stage, target spacing 1 x 1 x 1 mm, patch 128 x 128 x 128, 5 poolings 2x2x2, 3x3x3 kernels,
  base 32 features (nnU-Net doubles them per level, capped at 320), 2 convolutions per stage,
  ``nonCT`` normalisation inside the non-zero mask for both channels, no transposition;
* trainer ``nnUNetTrainerV2_DDP`` (the class DeepISLES' launcher names), folds given on the command line.

usage: python build_seals.py OUT_ROOT [--folds 0 1 2 3 4] [--replicate]
  writes OUT_ROOT/weights/SEALS/nnUNet_trained_models/nnUNet/3d_fullres/Task012_Ischemic_Stroke_TM_Fullset/...
"""
import argparse
import os
import pickle
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

TASK = "Task012_Ischemic_Stroke_TM_Fullset"
TRAINER = "nnUNetTrainerV2_DDP"

PATCH = [128, 128, 128]
POOLS = [[2, 2, 2]] * 5
KERNELS = [[3, 3, 3]] * 6
BASE = 32


def stage(patch, pools, kernels, spacing, batch=2):
    return {
        "batch_size": batch,
        "num_pool_per_axis": [int(sum(1 for p in pools if p[a] > 1)) for a in range(3)],
        "patch_size": np.array(patch),
        "median_patient_size_in_voxels": np.array([146, 180, 148]),
        "current_spacing": np.array(spacing, dtype=float),
        "original_spacing": np.array([1.0, 1.0, 1.0]),
        "do_dummy_2D_data_aug": False,
        "pool_op_kernel_sizes": pools,
        "conv_kernel_sizes": kernels,
    }


def plans(stages, base, norm, use_mask, tf, conv_per_stage=2):
    tb = [int(i) for i in np.argsort(tf)]
    p = OrderedDict()
    p["num_stages"] = len(stages)
    p["num_modalities"] = 2
    p["modalities"] = {0: "DWI", 1: "ADC"}
    p["normalization_schemes"] = OrderedDict(enumerate(norm))
    p["dataset_properties"] = {
        "all_sizes": [(146, 180, 148)] * 3, "all_spacings": [np.array([1.0, 1.0, 1.0])] * 3,
        "all_classes": [1], "modalities": {0: "DWI", 1: "ADC"}, "intensityproperties": None,
        "size_reductions": OrderedDict((f"ISLES22_{i:04d}", np.float64(0.6)) for i in range(3)),
    }
    p["list_of_npz_files"] = []
    p["original_spacings"] = [np.array([1.0, 1.0, 1.0])] * 3
    p["original_sizes"] = [np.array([146, 180, 148])] * 3
    p["preprocessed_data_folder"] = f"/data/nnUNet_preprocessed/{TASK}"
    p["num_classes"] = 1
    p["all_classes"] = [1]
    p["base_num_features"] = base
    p["use_mask_for_norm"] = OrderedDict(enumerate(use_mask))
    p["keep_only_largest_region"] = None
    p["min_region_size_per_class"] = None
    p["min_size_per_class"] = None
    p["transpose_forward"] = list(tf)
    p["transpose_backward"] = tb
    p["data_identifier"] = "nnUNetData_plans_v2.1"
    p["plans_per_stage"] = {i: s for i, s in enumerate(stages)}
    p["preprocessor_name"] = "GenericPreprocessor"
    p["conv_per_stage"] = conv_per_stage
    return p


def randomize(net, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in net.named_parameters():
            if "instnorm.weight" in name:
                prm.copy_((1 + 0.3 * torch.randn(prm.shape, generator=g)).to(prm.device))
            elif "instnorm.bias" in name or name.endswith(".bias"):
                prm.copy_((0.2 * torch.randn(prm.shape, generator=g)).to(prm.device))
            else:
                fan_in = prm[0].numel() if "tu." not in name else prm.shape[0] * prm[0, 0].numel()
                prm.copy_((torch.randn(prm.shape, generator=g) * np.sqrt(2.0 / fan_in)).to(prm.device))
        w = net.seg_outputs[-1].weight
        delta = torch.randn(w[1].shape, generator=g)
        w[1].copy_(w[0] + ((delta - delta.mean()) * 1.5).to(w.device))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--replicate", action="store_true",
                    help="build the first fold only; the others are hard links to it (same timing, less build time)")
    args = ap.parse_args()
    from nnunet.training.network_training.nnUNetTrainerV2_DDP import nnUNetTrainerV2_DDP

    root = args.out / "weights" / "SEALS" / "nnUNet_trained_models" / "nnUNet" / "3d_fullres" / TASK
    model_dir = root / f"{TRAINER}__nnUNetPlansv2.1"
    model_dir.mkdir(parents=True, exist_ok=True)
    pl = plans([stage(PATCH, POOLS, KERNELS, [1.0, 1.0, 1.0])], BASE, ["nonCT", "nonCT"], [True, True], [0, 1, 2])
    work = Path(tempfile.mkdtemp(prefix="seals_build_"))
    pre = work / TASK
    pre.mkdir(parents=True)
    plans_file = pre / "nnUNetPlansv2.1_plans_3D.pkl"
    for f in (plans_file, model_dir / "plans.pkl"):
        with open(f, "wb") as fh:
            pickle.dump(pl, fh)
    first = None
    for fold in args.folds:
        fold_dir = model_dir / f"fold_{fold}"
        if (fold_dir / "model_final_checkpoint.model.pkl").exists():
            print("fold", fold, "exists")
            first = first or fold_dir
            continue
        if args.replicate and first is not None:
            fold_dir.mkdir(parents=True, exist_ok=True)
            for f in ("model_final_checkpoint.model", "model_final_checkpoint.model.pkl"):
                os.link(first / f, fold_dir / f)
            print(f"SEALS fold {fold}: hard link to {first}", flush=True)
            continue
        first = fold_dir
        tr = nnUNetTrainerV2_DDP(str(plans_file), fold, 0, str(model_dir), str(pre), True, 0, True, False, False, True)
        tr.initialize(False)
        net = tr.network.module if hasattr(tr.network, "module") else tr.network
        randomize(net, 1000 * (1 + fold))
        tr.epoch = 999
        tr.all_tr_losses = [np.float64(-0.61), np.float64(-0.62)]
        tr.all_val_losses = [np.float64(-0.55), np.float64(-0.56)]
        tr.all_val_losses_tr_mode = []
        tr.all_val_eval_metrics = [np.float64(0.71), np.float64(0.72)]
        tr.amp_grad_scaler = torch.amp.GradScaler("cuda" if torch.cuda.is_available() else "cpu")
        tr.save_checkpoint(str(fold_dir / "model_final_checkpoint.model"))
        for f in fold_dir.iterdir():
            if not f.name.startswith("model_final_checkpoint"):
                f.unlink()
        n = sum(p.numel() for p in net.parameters())
        print(f"SEALS fold {fold}: {n / 1e6:.1f} M parameters -> {fold_dir}", flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
