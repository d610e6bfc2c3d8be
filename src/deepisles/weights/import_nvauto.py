"""Import the official NVAUTO weights (DeepISLES ``weights/NVAUTO/ts/model{0..14}.ts``) into the store.

The official files are TorchScript archives; they are kept as they are (``torch.jit.load`` rebuilds the
scripted graph and its tensors, it does not unpickle arbitrary Python objects). Each file is loaded and run
once on a tiny input before anything is written; ``member.json`` records the reference preprocessing
configuration, the model order and (through the store) the SHA-256 of every file.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import torch

from deepisles.errors import DeepIslesError
from deepisles.members.nvauto import DEFAULT_CONFIG, NAME, load_torchscript
from deepisles.weights import store

log = logging.getLogger(__name__)

_MODEL_RE = re.compile(r"^model(\d+)\.ts$")
OFFICIAL_COUNT = 15
PROBE_SIZES = (32, 64)  # tiny cubes to run each model on (SegResNet needs sizes divisible by 2^levels)


def _model_files(ts_dir: Path) -> list[Path]:
    found = {}
    for p in ts_dir.iterdir() if ts_dir.is_dir() else []:
        m = _MODEL_RE.match(p.name)
        if m and p.is_file():
            found[int(m.group(1))] = p
    return [found[i] for i in sorted(found)]


def locate(root: Path) -> Path | None:
    """The NVAUTO folder (the one holding ``ts/model*.ts``) inside an unpacked official archive.

    ``root`` may be the folder containing ``weights/``, ``weights/`` itself, or the NVAUTO folder.
    """
    root = Path(root)
    for cand in (root / "weights" / "NVAUTO", root / "NVAUTO", root):
        if _model_files(cand / "ts"):
            return cand
    return None


def verify_model(path: Path, in_channels: int = 2, out_channels: int = 2) -> None:
    """Load one TorchScript model on the CPU and run it on a tiny input; raise ``DeepIslesError`` if it fails."""
    log.info("loading TorchScript archive %s with torch.jit.load (no arbitrary unpickling)", path)
    try:
        model = load_torchscript(path, "cpu")
    except Exception as exc:  # corrupt archive, not TorchScript, ...
        raise DeepIslesError(
            f"{path}: not a loadable TorchScript model ({type(exc).__name__}: {exc})"
        ) from None
    errors = []
    for size in PROBE_SIZES:
        x = torch.zeros((1, in_channels, size, size, size))
        x[:, :, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1.0
        try:
            with torch.inference_mode():
                y = model(x)
        except Exception as exc:
            errors.append(f"{size}^3: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        if not isinstance(y, torch.Tensor):
            raise DeepIslesError(f"{path}: model returns {type(y).__name__}, expected one tensor of logits")
        if tuple(y.shape) != (1, out_channels, size, size, size):
            raise DeepIslesError(
                f"{path}: output shape {tuple(y.shape)} for input {tuple(x.shape)}; "
                f"expected (1, {out_channels}, {size}, {size}, {size})"
            )
        if not torch.isfinite(y).all():
            raise DeepIslesError(f"{path}: model output is not finite on a test input")
        return
    raise DeepIslesError(f"{path}: model does not run on a test input ({'; '.join(errors)})")


def import_official(folder: Path, overwrite: bool = False) -> Path:
    """Verify and copy the official TorchScript models into ``$DEEPISLES_HOME/weights/nvauto``."""
    folder = Path(folder)
    base = locate(folder)
    if base is None:
        raise DeepIslesError(f"{folder}: no NVAUTO models (expected NVAUTO/ts/model0.ts ...)")
    files = _model_files(base / "ts")
    indices = [int(_MODEL_RE.match(p.name).group(1)) for p in files]
    if indices != list(range(len(files))):
        raise DeepIslesError(f"{base / 'ts'}: model files are not numbered 0..{len(files) - 1} ({indices})")
    if len(files) != OFFICIAL_COUNT:
        log.warning(
            "%s: %d NVAUTO models found, the official release has %d", base, len(files), OFFICIAL_COUNT
        )
    cfg = dict(DEFAULT_CONFIG)
    for p in files:
        verify_model(p, in_channels=len(cfg["inputs"]), out_channels=int(cfg["out_channels"]))
    names = [p.name for p in files]
    meta = {
        "source": str(base.resolve()),
        "reference": "DeepISLES src/NVAUTO/process.py (MONAI 0.9.0 transforms and sliding-window inference)",
        "architecture": "MONAI SegResNet, TorchScript",
        "inputs": list(cfg["inputs"]),
        "models": names,
        "config": cfg,
    }

    def copier(src: Path):
        return lambda dst: shutil.copyfile(src, dst)

    dest = store.write_member(NAME, meta, {p.name: copier(p) for p in files}, overwrite=overwrite)
    log.info("imported %d NVAUTO models into %s", len(files), dest)
    return dest
