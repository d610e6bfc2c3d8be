"""Convert the official SEALS weights (nnU-Net v1 checkpoints) into the deepisles store.

Official layout (DeepISLES ``weights/`` folder)::

    SEALS/nnUNet_trained_models/nnUNet/3d_fullres/Task012_Ischemic_Stroke_TM_Fullset/
        nnUNetTrainerV2_DDP__nnUNetPlansv2.1/
            plans.pkl
            fold_K/model_final_checkpoint.model       torch.save({'state_dict': ..., 'optimizer_state_dict': ...})
            fold_K/model_final_checkpoint.model.pkl   pickle({'init': trainer args, 'name': trainer, 'plans': plans})

DeepISLES restores each fold from its ``.model.pkl`` (nnU-Net's ``restore_model``): the architecture and the
preprocessing come from the plans stored there, the stage from the trainer's init arguments. This module is the
only place in deepisles that unpickles; it uses a restricted unpickler that only accepts the globals these files
contain (containers, numpy arrays/scalars, torch tensors) and refuses anything else.

The store receives ``fold_K.safetensors`` (the network state dict, ``module.`` prefix of DDP training removed)
and ``member.json`` with the network, preprocessing, inference and export configuration as JSON.
"""

from __future__ import annotations

import logging
import pickle
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from deepisles import store
from deepisles.errors import DeepIslesError
from deepisles.members.seals import SealsMember

log = logging.getLogger(__name__)

MEMBER = "seals"
CHECKPOINT = "model_final_checkpoint"
TASK_PREFIX = "Task012_"  # DeepISLES runs `nnUNet_predict -t 12`
PREFERRED_TRAINER = "nnUNetTrainerV2_DDP"  # DeepISLES runs `-tr nnUNetTrainerV2_DDP -m 3d_fullres`
# position of `stage` in the trainer's init arguments (nnUNetTrainerV2(_DDP).__init__)
STAGE_ARG = {"nnUNetTrainerV2_DDP": 6, "nnUNetTrainerV2": 5}
FOLDS = range(5)

# --- restricted unpickling --------------------------------------------------------------------------
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("_codecs", "encode"),  # protocol-2 pickles (torch.save) store bytes this way
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
}


_NUMPY2 = int(np.__version__.split(".")[0]) >= 2


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals that nnU-Net v1 plans and checkpoints need."""

    def find_class(self, module: str, name: str):
        canonical = module.replace("numpy._core", "numpy.core")
        numpy_dtype_class = module == "numpy.dtypes" and name.endswith("DType")
        if (canonical, name) not in _ALLOWED_GLOBALS and not numpy_dtype_class:
            raise pickle.UnpicklingError(
                f"refusing to unpickle global {module}.{name} (not expected in nnU-Net files)"
            )
        if _NUMPY2 and module.startswith("numpy.core"):  # pickled with numpy 1.x
            module = "numpy._core" + module[len("numpy.core"):]
        return super().find_class(module, name)


_restricted_pickle = types.ModuleType("deepisles_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler
_restricted_pickle.load = lambda fh, **kw: _RestrictedUnpickler(fh, **kw).load()
_restricted_pickle.__name__ = "deepisles_restricted_pickle"


def load_pickle(path: Path):
    """A nnU-Net ``.pkl`` (plans, ``.model.pkl``) through the restricted unpickler."""
    try:
        with open(path, "rb") as fh:
            return _RestrictedUnpickler(fh).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as exc:
        raise DeepIslesError(f"{path}: cannot read this nnU-Net pickle ({exc})") from None


def load_checkpoint(path: Path) -> dict:
    """A nnU-Net ``.model`` file (``torch.save`` of a dict) through the restricted unpickler."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
    except (pickle.UnpicklingError, EOFError, RuntimeError, AttributeError, ImportError, ValueError) as exc:
        raise DeepIslesError(f"{path}: cannot read this nnU-Net checkpoint ({exc})") from None
    if not isinstance(ck, dict) or "state_dict" not in ck:
        raise DeepIslesError(f"{path}: not a nnU-Net checkpoint (no 'state_dict')")
    return ck


# --- locating the official folder ------------------------------------------------------------------
def _is_model_folder(p: Path) -> bool:
    return p.is_dir() and any((p / f"fold_{k}" / f"{CHECKPOINT}.model").is_file() for k in FOLDS)


def locate(root: Path) -> Path | None:
    """The SEALS trainer folder (``..._DDP__nnUNetPlansv2.1``) inside an unpacked official archive.

    ``root`` may be the folder holding ``weights/``, ``weights/`` itself, ``weights/SEALS``, or the trainer
    folder itself. Task012 and the DDP trainer (what DeepISLES runs) are preferred when several exist.
    """
    root = Path(root)
    if _is_model_folder(root):
        return root
    for base in (root / "weights" / "SEALS", root / "SEALS", root):
        fullres = base / "nnUNet_trained_models" / "nnUNet" / "3d_fullres"
        if not fullres.is_dir():
            continue
        tasks = sorted(fullres.iterdir(), key=lambda t: (not t.name.startswith(TASK_PREFIX), t.name))
        for task in tasks:
            if not task.is_dir():
                continue
            trainers = sorted(task.iterdir(), key=lambda t: (not t.name.startswith(PREFERRED_TRAINER + "__"), t.name))
            for tr in trainers:
                if _is_model_folder(tr):
                    return tr
    return None


# --- configuration from the plans -------------------------------------------------------------------
def _int_list(v) -> list[int]:
    return [int(x) for x in np.asarray(v).ravel()]


def _per_channel(d, n: int, what: str, path: Path) -> list:
    try:
        return [d[c] if c in d else d[str(c)] for c in range(n)]
    except (KeyError, TypeError):
        raise DeepIslesError(f"{path}: plans have no {what} for each of the {n} input channels") from None


def _stage(plans: dict, trainer: str, init, path: Path):
    stages = list(plans["plans_per_stage"].keys())
    idx = STAGE_ARG.get(trainer)
    stage = init[idx] if idx is not None and isinstance(init, tuple | list) and len(init) > idx else None
    if stage is None:
        if len(stages) != 1:
            raise DeepIslesError(f"{path}: plans have {len(stages)} stages and the trainer names none")
        stage = stages[0]
    if stage not in plans["plans_per_stage"]:
        raise DeepIslesError(f"{path}: stage {stage!r} is not in the plans (stages {stages})")
    return stage


def config_from_plans(plans: dict, trainer: str, init, path: Path) -> dict:
    """What nnUNetTrainerV2.process_plans/initialize_network/preprocess_patient take from the plans."""
    if trainer not in STAGE_ARG:
        raise DeepIslesError(
            f"{path}: trainer {trainer!r} is not supported (deepisles rebuilds {', '.join(STAGE_ARG)})"
        )
    stage = _stage(plans, trainer, init, path)
    sp = plans["plans_per_stage"][stage]
    patch = _int_list(sp["patch_size"])
    if len(patch) != 3:
        raise DeepIslesError(f"{path}: only 3D nnU-Net models are supported (patch size {patch})")
    if "pool_op_kernel_sizes" in sp:
        pools = [_int_list(p) for p in sp["pool_op_kernel_sizes"]]
    else:  # old plans: rebuild as nnUNetTrainer.process_plans does
        npa = _int_list(sp["num_pool_per_axis"])
        pools = [[2 if max(npa) - j <= i else 1 for j in npa] for i in range(max(npa))]
    if "conv_kernel_sizes" in sp:
        kernels = [_int_list(k) for k in sp["conv_kernel_sizes"]]
    else:
        kernels = [[3] * len(patch)] * (max(_int_list(sp["num_pool_per_axis"])) + 1)
    n_in = int(plans["num_modalities"])
    schemes = [str(s) for s in _per_channel(plans["normalization_schemes"], n_in, "normalization scheme", path)]
    use_mask = [bool(u) for u in _per_channel(plans["use_mask_for_norm"], n_in, "use_mask_for_norm", path)]
    intensity = None
    props = plans.get("dataset_properties", {}).get("intensityproperties")
    if any(s in ("CT", "CT2") for s in schemes):
        if props is None:
            raise DeepIslesError(f"{path}: CT normalization without intensity properties in the plans")
        intensity = []
        for c, p in enumerate(_per_channel(props, n_in, "intensity properties", path)):
            intensity.append(
                {k: float(p[k]) for k in ("mean", "sd", "percentile_00_5", "percentile_99_5")}
                if schemes[c] in ("CT", "CT2") else None
            )
    unknown = [s for s in schemes if s not in ("CT", "CT2", "noNorm", "nonCT", "MRI")]
    if unknown:
        log.info("SEALS plans use normalization %s: treated as z-score (nnU-Net's default branch)", unknown)
    preprocessor = plans.get("preprocessor_name") or "GenericPreprocessor"
    if preprocessor != "GenericPreprocessor":
        raise DeepIslesError(f"{path}: preprocessor {preprocessor!r} is not supported (GenericPreprocessor only)")
    tf, tb = plans.get("transpose_forward"), plans.get("transpose_backward")
    if tf is None or tb is None:
        tf, tb = [0, 1, 2], [0, 1, 2]
    export = plans.get("segmentation_export_params") or {}
    network = {
        "input_channels": n_in,
        "base_num_features": int(plans["base_num_features"]),
        "num_classes": int(plans["num_classes"]) + 1,
        "pool_op_kernel_sizes": pools,
        "conv_kernel_sizes": kernels,
        "conv_per_stage": int(plans.get("conv_per_stage", 2)),
        "feat_map_mul_on_downscale": 2.0,
        "max_num_features": 320,
        "norm_eps": 1e-5,
        "negative_slope": 1e-2,
    }
    preprocessing = {
        "deepisles_spacing_mm": [1.0, 1.0, 1.0],
        "target_spacing": [float(s) for s in np.asarray(sp["current_spacing"]).ravel()],
        "transpose_forward": _int_list(tf),
        "transpose_backward": _int_list(tb),
        "normalization_schemes": schemes,
        "use_mask_for_norm": use_mask,
        "intensity_properties": intensity,
        "resample_order_data": 3,
        "resample_order_seg": 1,
        "separate_z_anisotropy_threshold": 3.0,
    }
    inference = {
        "patch_size": patch,
        "step_size": 0.5,
        "mirror_axes": [0, 1, 2],
        "gaussian_sigma_scale": 0.125,
        "mixed_precision": True,
    }
    fsz = export.get("force_separate_z")
    export_cfg = {
        "interpolation_order": int(export.get("interpolation_order", 1)),
        "interpolation_order_z": int(export.get("interpolation_order_z", 0)),
        "force_separate_z": None if fsz is None else bool(fsz),
        "softmax_dtype": "float16",
    }
    return {
        "stage": stage if isinstance(stage, int | str) else int(stage),
        "network": network,
        "preprocessing": preprocessing,
        "inference": inference,
        "export": export_cfg,
    }


def strip_module(state_dict: dict) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix DDP training leaves on every key; tensors made contiguous copies."""
    out = {}
    for k, v in state_dict.items():
        key = k[len("module."):] if k.startswith("module.") else k
        if key in out:
            raise DeepIslesError(f"checkpoint holds {key!r} twice (with and without 'module.')")
        out[key] = v.detach().to("cpu").contiguous().clone()
    return out


def _check_against_network(cfg: dict, sd: dict[str, torch.Tensor], path: Path) -> None:
    from deepisles.members.nets.generic_unet import build

    net = build(cfg["network"])
    ref = net.state_dict()
    missing, unexpected = sorted(set(ref) - set(sd)), sorted(set(sd) - set(ref))
    bad = [k for k in set(ref) & set(sd) if tuple(ref[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or bad:
        raise DeepIslesError(
            f"{path}: weights do not match the architecture in the plans "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {sorted(bad)[:3]})"
        )


# --- import -------------------------------------------------------------------------------------
def import_official(folder: Path, overwrite: bool = False, say: Callable[[str], None] | None = None) -> Path:
    """Convert the trainer folder found by :func:`locate` into ``$DEEPISLES_HOME/weights/seals``."""
    folder = Path(folder)
    if not _is_model_folder(folder):
        found = locate(folder)
        if found is None:
            raise DeepIslesError(f"{folder}: no SEALS nnU-Net checkpoints ({CHECKPOINT}.model) found")
        folder = found
    folds = [k for k in FOLDS if (folder / f"fold_{k}" / f"{CHECKPOINT}.model").is_file()]
    plans_path = folder / "plans.pkl"
    msg = f"unpickling official SEALS checkpoint … ({folder}, folds {folds})"
    log.info(msg)
    if say is not None:
        say(msg)
    if plans_path.is_file():
        n_mod = load_pickle(plans_path).get("num_modalities")
        if n_mod is not None and int(n_mod) != 2:
            raise DeepIslesError(f"{plans_path}: expects {n_mod} input images; SEALS takes DWI and ADC")
    config, trainer, state_dicts, epochs = None, None, {}, {}
    for k in folds:
        pkl = folder / f"fold_{k}" / f"{CHECKPOINT}.model.pkl"
        if not pkl.is_file():
            raise DeepIslesError(f"{pkl}: missing (nnU-Net restores the trainer and plans from it)")
        info = load_pickle(pkl)
        try:
            name, init, plans = info["name"], info["init"], info["plans"]
        except (KeyError, TypeError):
            raise DeepIslesError(f"{pkl}: not a nnU-Net checkpoint description") from None
        cfg = config_from_plans(plans, name, init, pkl)
        if config is None:
            config, trainer = cfg, name
        elif cfg != config or name != trainer:
            raise DeepIslesError(f"{pkl}: plans or trainer differ from fold {folds[0]}'s; cannot store one configuration")
        ck = load_checkpoint(folder / f"fold_{k}" / f"{CHECKPOINT}.model")
        sd = strip_module(ck["state_dict"])
        _check_against_network(config, sd, pkl.with_suffix(""))
        state_dicts[k] = sd
        epochs[k] = int(ck.get("epoch", -1)) if isinstance(ck.get("epoch", -1), int) else -1
        del ck
    if config["network"]["input_channels"] != 2 or config["network"]["num_classes"] != 2:
        raise DeepIslesError(f"{folder}: expected 2 inputs (DWI, ADC) and 2 classes, got "
                             f"{config['network']['input_channels']} and {config['network']['num_classes']}")

    def writer(sd, k):
        return lambda p: save_file(sd, str(p), metadata={"member": MEMBER, "fold": str(k)})

    files = {f"fold_{k}.safetensors": writer(sd, k) for k, sd in state_dicts.items()}
    raw = {
        "source": str(folder),
        "inputs": ["dwi", "adc"],
        "network": config["network"],
        "models": [SealsMember.model_entry(k).to_json() for k in folds],
        "settings": {key: config[key] for key in ("preprocessing", "inference", "export")},
        "provenance": {
            "reference": "DeepISLES src/SEALS (nnU-Net v1.7 fork): nnUNet_predict -t 12 -tr nnUNetTrainerV2_DDP "
                         "-m 3d_fullres -f K -z --disable_postprocessing, per fold, then recover_softmax + mean",
            "trainer": trainer,
            "checkpoint": CHECKPOINT,
            "stage": config["stage"],
            "epochs": {str(k): v for k, v in epochs.items()},
        },
    }
    meta = SealsMember.parse(raw, f"{folder} (converted member.json)").to_json()  # schema-checked
    dest = store.write_member(MEMBER, meta, files, overwrite=overwrite)
    _verify(dest, state_dicts)
    return dest


def _verify(dest: Path, state_dicts: dict[int, dict[str, torch.Tensor]]) -> None:
    """Re-read what was written: checksums, then every tensor's name, shape and value."""
    meta, folder = store.read_member(MEMBER, verify=True)
    for k, sd in state_dicts.items():
        back = load_file(str(folder / f"fold_{k}.safetensors"))
        if set(back) != set(sd):
            raise DeepIslesError(f"{folder}: fold_{k}.safetensors lost or gained tensors while writing")
        for name, t in sd.items():
            if back[name].shape != t.shape or not torch.equal(back[name], t):
                raise DeepIslesError(f"{folder}: fold_{k}.safetensors differs from the checkpoint at {name}")
