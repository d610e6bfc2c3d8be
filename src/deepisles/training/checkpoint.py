"""Training checkpoints without pickles: network and optimizer tensors in safetensors, the rest in JSON.

A checkpoint is a folder ``checkpoint/`` with ``network.safetensors``, ``optimizer.safetensors`` and
``state.json`` (iteration, optimizer hyper-parameters, the non-tensor optimizer state, the AMP scaler, the log
so far). Every network trained is deepisles' own ``nn.Module``; a checkpoint holding ``network.ts`` (a
TorchScript network, as older versions wrote when fine-tuning the official NVAUTO models) is not loaded. It is written to a temporary sibling and swapped in with
renames, so a crash leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from deepisles.errors import DeepIslesError

CHECKPOINT = "checkpoint"


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in list(tensors.items()) + list(info.get("scalars", {}).items()):
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": info["param_groups"]}


def save_checkpoint(run_dir: Path, network: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict) -> Path:  # fmt: skip
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=run_dir))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()},
                  str(tmp / "network.safetensors"))
        tensors, info = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "optimizer": info}, indent=1) + "\n")
        dest = run_dir / CHECKPOINT
        old = run_dir / f".{CHECKPOINT}.old"
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run_dir / CHECKPOINT


def has_checkpoint(run_dir: Path) -> bool:
    return (Path(run_dir) / CHECKPOINT / "state.json").is_file()


def load_checkpoint(run_dir: Path, network: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore network and optimizer in place; returns the saved state (iteration, log, ...)."""
    ck = Path(run_dir) / CHECKPOINT
    state = json.loads((ck / "state.json").read_text())
    if not (ck / "network.safetensors").is_file():
        what = "a TorchScript network (network.ts) from an older deepisles" if (ck / "network.ts").exists() else \
            "no network.safetensors"
        raise DeepIslesError(f"{ck}: the checkpoint holds {what}; it cannot be resumed, start the run again "
                             "with --overwrite")
    network.load_state_dict(load_file(str(ck / "network.safetensors")), strict=True)
    tensors = load_file(str(ck / "optimizer.safetensors"))
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state.pop("optimizer")))
    return state
