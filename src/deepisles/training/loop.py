"""``deepisles train``: train or fine-tune one member (one fold) on ISLES'22-layout data or synthetic cases.

The data path is the inference path: cases are loaded and validated by ``deepisles.io``, turned into a
``Case`` by ``preprocess.case.build_case`` and brought to the network's grid by the member's own
``preprocess`` stage. Patches (half of them centred on lesion voxels) get MONAI augmentations; the loss is
Dice + cross-entropy (softmax members) or Dice + BCE (FACTORIZER's single logit). AdamW, linear warm-up then
polynomial decay; mixed precision (float16 with loss scaling on CUDA, bfloat16 on CPU). Validation runs the
member's inference runtime on whole held-out cases and scores them with the official ISLES'22 metrics.

Run folder ``OUT/fold_K/``: ``checkpoint/`` (safetensors + JSON, see checkpoint.py; ``--resume`` continues
from it), ``log.csv``, ``tensorboard/`` (when the ``tensorboard`` package is installed) and the final weights.
``OUT/member/`` is the member in the store format with every finished fold; it is installed into the weight
store unless ``install=False``.

Multi-GPU / multi-process: launched by ``torchrun``, every process trains on its own share of the data (its
own synthetic stream) and DDP averages the gradients; rank 0 validates, logs and writes files.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from deepisles.errors import DeepIslesError
from deepisles.progress import Progress, Silent, as_progress
from deepisles.training.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from deepisles.training.members import Sample, Trainable, make_trainable

log = logging.getLogger(__name__)

LOG_FIELDS = ["iteration", "loss", "lr", "seconds", "val_dice", "val_f1", "val_abs_volume_ml",
              "val_abs_count", "val_cases", "skipped_steps"]  # fmt: skip
# a step whose gradients are not finite (a NaN/inf from reduced precision, one bad patch) is skipped, as
# PyTorch's GradScaler does for float16; this many in a row means training has diverged: stop and say so
MAX_SKIPPED_IN_A_ROW = 5


@dataclass
class TrainConfig:
    member: str
    out: Path
    data: Path | None = None  # ISLES'22-layout dataset; None -> synthetic cases generated on the fly
    fold: int = 0
    folds: int = 5
    init: str = "none"  # none | default | official
    arch: str = "resunet"  # FACTORIZER: which architecture of the family to train
    patch: list[int] | None = None  # training patch; default: the member's inference window
    iterations: int = 2000
    batch_size: int = 2
    lr: float | None = None  # default 1e-3 from scratch, 1e-4 when fine-tuning
    weight_decay: float = 3e-5
    warmup: int = 50
    val_every: int = 250
    checkpoint_every: int = 250
    val_cases: int = 4  # synthetic validation cases (a separate seed)
    pool_size: int = 24  # synthetic: cases held in memory ...
    refresh_every: int = 10  # ... one replaced by a new one every this many iterations
    pos_fraction: float = 0.5
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    resume: bool = False
    overwrite: bool = False
    install: bool = True
    origin: dict = field(default_factory=dict)  # extra fields for member.json "origin"

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / f"fold_{self.fold}"


# --- distributed -----------------------------------------------------------------------------------
def _dist() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    from deepisles.core import resolve_device

    dev = torch.device(resolve_device(cfg.device))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


# --- data --------------------------------------------------------------------------------------------
def _load(trainable: Trainable, tc) -> tuple:
    """One dataset case through the inference loading and preprocessing: ``(Case, label uint8)``."""
    from deepisles.preprocess.case import build_case
    from deepisles.training.datasets import load_case

    loaded, mask = load_case(tc, with_flair=trainable.needs_flair())
    case, _, _, _ = build_case(loaded, "auto", "cpu")
    return case, np.asarray(mask.data).astype(np.uint8)


def _dataset_samples(trainable: Trainable, cases, what: str, say) -> list[Sample]:
    out = []
    for i, tc in enumerate(cases):
        say(f"preparing {what} case {i + 1}/{len(cases)}: {tc.case_id}")
        case, label = _load(trainable, tc)
        try:
            out.append(trainable.sample(case, label, tc.case_id))
        except ValueError as exc:
            log.warning("%s: skipped (%s)", tc.case_id, exc)
    return out


class Pool:
    """Training samples in memory; synthetic pools replace their oldest sample every ``refresh_every`` draws."""

    def __init__(self, samples: list[Sample], source=None, refresh_every: int = 0, next_index: int = 0):
        self.samples, self.source, self.refresh_every = samples, source, refresh_every
        self.next_index, self.draws, self.oldest = next_index, 0, 0

    def draw(self, rng: np.random.Generator) -> Sample:
        self.draws += 1
        if self.source is not None and self.refresh_every and self.draws % self.refresh_every == 0:
            self.samples[self.oldest] = self.source(self.next_index)
            self.next_index += 1
            self.oldest = (self.oldest + 1) % len(self.samples)
        return self.samples[int(rng.integers(len(self.samples)))]


def random_patch(s: Sample, patch: list[int], rng: np.random.Generator, pos_fraction: float):
    """A patch (C, *patch) and its label (1, *patch); with probability ``pos_fraction`` centred (with jitter) on a
    lesion voxel, else on a random non-zero voxel. The lesion voxel is drawn from a lesion (connected component,
    26-connectivity) chosen uniformly, so a shower's one-voxel emboli are trained as often as a territorial
    infarct (a voxel drawn uniformly would almost always fall in the largest lesion)."""
    img, lab = s.image, s.label
    need = [max(0, p - n) for p, n in zip(patch, lab.shape, strict=True)]
    if any(need):
        pads = [(n // 2, n - n // 2) for n in need]
        img = np.pad(img, [(0, 0), *pads])
        lab = np.pad(lab, pads)
    if lab.any() and rng.random() < pos_fraction:
        import cc3d

        comps, n = cc3d.connected_components(lab > 0, connectivity=26, return_N=True)
        pts = np.argwhere(comps == int(rng.integers(1, n + 1)))
    else:
        pts = np.argwhere(img[0] != 0)
        if len(pts) == 0:
            pts = np.argwhere(np.ones(lab.shape, bool))
    centre = pts[int(rng.integers(len(pts)))]
    jitter = rng.integers(-np.asarray(patch) // 4, np.asarray(patch) // 4 + 1)
    start = np.clip(centre + jitter - np.asarray(patch) // 2, 0, np.asarray(lab.shape) - np.asarray(patch))
    sl = tuple(slice(int(a), int(a) + p) for a, p in zip(start, patch, strict=True))
    return img[(slice(None), *sl)], lab[sl][None]


def augmentation(seed: int):
    """MONAI augmentations on (image, label) patches: spatial (affine, flips) and intensity."""
    from monai.transforms import (
        Compose,
        RandAffined,
        RandFlipd,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    keys = ["image", "label"]
    t = Compose([
        RandAffined(keys, prob=0.3, rotate_range=(0.26, 0.26, 0.26), scale_range=(0.15, 0.15, 0.15),
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandFlipd(keys, prob=0.5, spatial_axis=2),
        RandScaleIntensityd("image", factors=0.15, prob=0.3),
        RandShiftIntensityd("image", offsets=0.1, prob=0.3),
        RandGaussianNoised("image", prob=0.15, std=0.1),
        RandGaussianSmoothd("image", prob=0.1, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
    ])  # fmt: skip
    t.set_random_state(seed)
    return t


def _batch(pool: Pool, trainable: Trainable, aug, rng, cfg: TrainConfig):
    xs, ys = [], []
    for _ in range(cfg.batch_size):
        img, lab = random_patch(pool.draw(rng), trainable.train_patch, rng, cfg.pos_fraction)
        d = aug({"image": torch.from_numpy(np.ascontiguousarray(img)),
                 "label": torch.from_numpy(np.ascontiguousarray(lab, dtype=np.float32))})
        xs.append(torch.as_tensor(d["image"]).float())
        ys.append(torch.as_tensor(d["label"]).float())
    return torch.stack(xs), torch.stack(ys)


# --- validation ----------------------------------------------------------------------------------------
def validate(trainable: Trainable, cases: list[tuple], device: torch.device) -> dict:
    from deepisles.metrics import case_metrics

    if not cases:
        return {}
    net = trainable.network
    was_training = net.training
    net.eval()
    rows = []
    try:
        member = trainable.runtime(device=str(device))
        for _, case, label in cases:
            with torch.no_grad():
                res = member.run(case)
            rows.append(case_metrics(res.mask, label, case.dwi.voxel_volume_ml))
    finally:
        net.train(was_training)
    return {
        "val_dice": float(np.mean([r["dice"] for r in rows])),
        "val_f1": float(np.mean([r["lesion_f1"] for r in rows])),
        "val_abs_volume_ml": float(np.mean([r["abs_volume_diff_ml"] for r in rows])),
        "val_abs_count": float(np.mean([r["abs_lesion_count_diff"] for r in rows])),
        "val_cases": len(rows),
    }


# --- the run -----------------------------------------------------------------------------------------
def _check_install_target(cfg: TrainConfig) -> None:
    if not cfg.install:
        return
    from deepisles import store

    try:
        meta, _ = store.read_member(cfg.member)
    except FileNotFoundError:
        return
    except DeepIslesError:
        meta = {}
    run = (meta.get("origin") or {}).get("run")
    if run != str(Path(cfg.out).resolve()) and not cfg.overwrite:
        raise DeepIslesError(
            f"member {cfg.member} is already installed in {store.member_dir(cfg.member)} (not from this run); "
            "pass --overwrite to replace it with the trained one, or --no-install to keep it")


def _lr_at(cfg: TrainConfig, base: float, it: int) -> float:
    if it < cfg.warmup:
        return base * (it + 1) / cfg.warmup
    return base * (1 - it / max(cfg.iterations, 1)) ** 0.9


class _Logs:
    def __init__(self, run_dir: Path, resume_at: int | None):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "log.csv"
        rows = []
        if resume_at is not None and self.path.is_file():
            with open(self.path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["iteration"]) <= resume_at]
        with open(self.path, "w", newline="") as fh:
            w = csv.DictWriter(fh, LOG_FIELDS)
            w.writeheader()
            w.writerows(rows)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            log.info("tensorboard not installed: logging to log.csv only (pip install tensorboard)")

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, LOG_FIELDS).writerow({k: row.get(k, "") for k in LOG_FIELDS})
        if self.tb is not None:
            for k, v in row.items():
                if k != "iteration" and isinstance(v, int | float):
                    self.tb.add_scalar(k, v, row["iteration"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def train(cfg: TrainConfig, progress: Progress | None = None) -> dict:
    """Train one fold of one member; returns a summary (final validation, files, time). ``progress``
    (:mod:`deepisles.progress`, rank 0 only): ``step`` for data preparation, ``advance(iteration, iterations,
    "loss ... val Dice ...")`` as training goes."""
    from deepisles.training.synthetic import SyntheticSource

    rank, world, local = _dist()
    distributed = world > 1
    progress = as_progress(progress) if rank == 0 else Silent()
    say = progress.step
    if cfg.member == "factorizer" and cfg.arch != "resunet" and cfg.init == "none":
        raise DeepIslesError("the compact recipe trains the FACTORIZER Res-U-Net; other architectures need "
                             "--init official")
    run_dir = cfg.run_dir
    resuming = cfg.resume and has_checkpoint(run_dir)
    if rank == 0:
        if has_checkpoint(run_dir) and not (cfg.resume or cfg.overwrite):
            raise DeepIslesError(f"{run_dir} already holds a training run; pass --resume to continue it or "
                                 "--overwrite to start again")
        _check_install_target(cfg)
    device = _device(cfg, local)
    if distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed * 1000 + rank)

    trainable = make_trainable(cfg.member, cfg.init, cfg.fold, cfg.arch)
    if cfg.patch:
        trainable.patch_override = [int(p) for p in cfg.patch]
    net = trainable.network.to(device).train()
    base_lr = cfg.lr if cfg.lr is not None else (1e-3 if cfg.init == "none" else 1e-4)
    opt = torch.optim.AdamW(net.parameters(), lr=base_lr, weight_decay=cfg.weight_decay)
    start_it, log_state = 0, {}
    if resuming:
        log_state = load_checkpoint(run_dir, net, opt)
        start_it = int(log_state["iteration"])
        say(f"resuming {run_dir} at iteration {start_it}")
    rng = np.random.default_rng([cfg.seed, rank, start_it])
    aug = augmentation(int(rng.integers(2**31)))

    # data: a dataset fold, or synthetic cases (a separate seed stream per process, validation on its own seed)
    val_cases: list[tuple] = []
    if cfg.data is not None:
        from deepisles.training.datasets import find_cases, split_folds

        cases = find_cases(cfg.data, require_flair=trainable.needs_flair())
        train_cases, held_out = split_folds(cases, cfg.folds, cfg.fold, seed=cfg.seed or 12345)
        samples = _dataset_samples(trainable, train_cases[rank::world], "training", say)
        if not samples:
            raise DeepIslesError(f"{cfg.data}: no usable training case for this process")
        pool = Pool(samples)
        if rank == 0:
            val_cases = [(tc.case_id, *_load(trainable, tc)) for tc in held_out]
        data_desc = {"data": str(Path(cfg.data).resolve()), "train_cases": len(train_cases),
                     "val_cases": len(held_out), "fold": cfg.fold, "folds": cfg.folds}
    else:
        stream = SyntheticSource(cfg.seed * 1000 + 100 + rank, with_flair=trainable.needs_flair())

        def source(i: int) -> Sample:
            case, label = stream.case(i)
            return trainable.sample(case, label, f"synth-{i}")

        first = start_it // max(cfg.refresh_every, 1) if cfg.refresh_every else 0
        samples = []
        for i in range(cfg.pool_size):
            say(f"generating synthetic case {i + 1}/{cfg.pool_size}")
            samples.append(source(first + i))
        pool = Pool(samples, source, cfg.refresh_every, next_index=first + cfg.pool_size)
        if rank == 0 and cfg.val_cases:
            vsrc = SyntheticSource(cfg.seed * 1000 + 99, with_flair=trainable.needs_flair())
            val_cases = [(f"val-{i}", *vsrc.case(i)) for i in range(cfg.val_cases)]
        data_desc = {"data": "synthetic", "synthetic_seed": cfg.seed, "pool_size": cfg.pool_size,
                     "refresh_every": cfg.refresh_every, "val_cases": len(val_cases)}

    model = net
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        # find_unused_parameters: nnU-Net's deep-supervision heads exist (for the official state dicts) but the
        # loss uses the full-resolution output only
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=True)
    loss_fn = trainable.loss()
    use_amp = cfg.amp
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and device.type == "cuda")
    logs = _Logs(run_dir, start_it if resuming else None) if rank == 0 else None
    elapsed0 = float(log_state.get("seconds", 0.0))
    t0 = time.perf_counter()
    last: dict = dict(log_state.get("last", {}))
    running = []
    skipped = int(log_state.get("skipped_steps", 0))
    in_a_row = 0

    progress.advance(start_it, cfg.iterations, f"train {cfg.member} fold {cfg.fold}")
    try:
        for it in range(start_it, cfg.iterations):
            lr = _lr_at(cfg, base_lr, it)
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = _batch(pool, trainable, aug, rng, cfg)
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                out = model(x)
            loss = loss_fn(out.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            # after DDP's all-reduce every process sees the same norm, so all of them skip the same steps
            finite = bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)))
            if finite or scaler.is_enabled():
                scaler.step(opt)  # an enabled scaler skips a non-finite step itself (and lowers its scale)
                scaler.update()
            value = float(loss.detach())
            # float16 on CUDA: an overflow of the scaled gradients with a finite loss is the scaler finding its
            # scale (it skipped the step and lowered the scale), not a sign of divergence
            if math.isfinite(value) and (finite or scaler.is_enabled()):
                running.append(value)
                in_a_row = 0
            else:
                skipped, in_a_row = skipped + 1, in_a_row + 1
                log.warning("iteration %d: %s; step skipped", it + 1, f"loss {value}" if not math.isfinite(value)
                            else "gradients not finite")
                if in_a_row >= MAX_SKIPPED_IN_A_ROW:
                    raise DeepIslesError(f"training diverged: {in_a_row} steps in a row with a non-finite loss or "
                                         f"gradients (iteration {it + 1}, loss {value}); lower --lr, try --no-amp "
                                         "or check the data")
            done = it + 1
            is_val = cfg.val_every and (done % cfg.val_every == 0 or done == cfg.iterations)
            is_ck = cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.iterations)
            if rank == 0:
                row = {"iteration": done, "loss": float(np.mean(running)) if running else float("nan"), "lr": lr,
                       "seconds": round(elapsed0 + time.perf_counter() - t0, 2), "skipped_steps": skipped}
                if is_val and val_cases:
                    row.update(validate(trainable, val_cases, device))
                    last = {k: v for k, v in row.items() if k.startswith("val_")}
                if is_val or is_ck or done % 25 == 0:
                    logs.write(row)
                    running = []
                if is_ck:
                    save_checkpoint(run_dir, net, opt, {"iteration": done, "seconds": row["seconds"], "skipped_steps": skipped,
                                                        "last": last, "config": _jsonable(cfg)})
                info = f"loss {row['loss']:.3f}" + (f" val Dice {last['val_dice']:.3f}" if last else "")
                progress.advance(done, cfg.iterations, f"train {cfg.member} fold {cfg.fold}: {info}")
            if distributed and (is_val or is_ck):
                torch.distributed.barrier()
    finally:
        if logs is not None:
            logs.close()
    seconds = elapsed0 + time.perf_counter() - t0
    summary = {"member": cfg.member, "fold": cfg.fold, "iterations": cfg.iterations, "seconds": round(seconds, 1),
               "device": str(device), "world_size": world, "skipped_steps": skipped, **last, **data_desc}
    if rank == 0:
        summary.update(_finish(cfg, trainable, summary))
    if distributed:
        torch.distributed.barrier()
    return summary


def _jsonable(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def _finish(cfg: TrainConfig, trainable: Trainable, summary: dict) -> dict:
    """Final weights of this fold, the member folder with every finished fold, and its installation."""
    from deepisles import store
    from deepisles.io.write import write_json_atomic

    run_dir = cfg.run_dir
    fname = trainable.weight_file()
    tmp = run_dir / f".{fname}.tmp"
    trainable.save_weights(tmp)
    os.replace(tmp, run_dir / fname)
    write_json_atomic(run_dir / "final.json", {"file": fname, "fold": cfg.fold, "summary": summary})

    out = Path(cfg.out)
    folds: dict[int, str] = {}
    files: dict[str, Path] = {}
    for fd in sorted(out.glob("fold_*")):
        fin = fd / "final.json"
        if fin.is_file():
            info = json.loads(fin.read_text())
            folds[int(info["fold"])] = info["file"]
            files[info["file"]] = fd / info["file"]
    meta = trainable.member_meta(folds)
    from deepisles import __version__

    meta["source"] = f"deepisles train ({out.resolve()})"
    meta["origin"] = {"kind": "trained", "run": str(out.resolve()), "init": cfg.init,
                      "data": summary.get("data"), "iterations": cfg.iterations, "seconds": summary["seconds"],
                      "device": summary["device"], "world_size": summary["world_size"],
                      "deepisles_version": __version__, **cfg.origin}
    writers = {name: (lambda dst, src=src: dst.write_bytes(Path(src).read_bytes())) for name, src in files.items()}
    member_folder = store.write_member_folder(out / "member", cfg.member, meta, writers, overwrite=True)
    result = {"weights": str(run_dir / fname), "member_folder": str(member_folder)}
    if cfg.install:
        dest = store.write_member(cfg.member, meta, writers, overwrite=True)
        result["installed"] = str(dest)
    return result
