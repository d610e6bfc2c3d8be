"""Train the packaged default ensemble: compact SEALS, NVAUTO and FACTORIZER on synthetic cases only.

    python scripts/train_default_models.py --out /tmp/default-runs [--members seals,nvauto,factorizer]
        [--iterations 3000] [--threads 1] [--seed 1] [--device cpu] [--init none|default] [--package]

Each member is trained by ``deepisles.training`` (the code behind ``deepisles train``) from random
initialisation (``--init none``: the compact recipes, ``COMPACT_RECIPE`` in members/<member>.py) on synthetic
cases generated on the fly with domain randomisation (training streams seeded ``seed*1000+100``, validation ``seed*1000+99``; the
benchmark's held-out seed 777777 is never used here). Members run in parallel processes when several are given.
``--package`` copies each finished member into ``src/deepisles/default_models/<member>/`` with the origin note
the report prints ("default model trained on synthetic data, not clinically validated").
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import time
from pathlib import Path

from deepisles.progress import Messages, Prefixed

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO / "src" / "deepisles" / "default_models"


def _train_one(member: str, args: argparse.Namespace) -> dict:
    import torch

    from deepisles.training.loop import TrainConfig, train

    torch.set_num_threads(args.threads)
    cfg = TrainConfig(member=member, out=Path(args.out) / member, iterations=args.iterations, seed=args.seed,
                      device=args.device, lr=args.lr, warmup=args.warmup, init=args.init, amp=not args.no_amp, val_every=args.val_every,
                      checkpoint_every=args.val_every, val_cases=args.val_cases, pool_size=args.pool_size,
                      refresh_every=args.refresh_every, install=False, overwrite=not args.resume,
                      resume=args.resume, origin={"recipe": "scripts/train_default_models.py"})  # fmt: skip
    t = time.perf_counter()
    summary = train(cfg, progress=Prefixed(Messages(lambda m: print(m, flush=True)), f"[{member}]"))
    summary["wall_seconds"] = round(time.perf_counter() - t, 1)
    print(f"[{member}] done: {json.dumps(summary)}", flush=True)
    return summary


def package(member: str, out: Path) -> Path:
    from deepisles import store
    from deepisles.members.base import DEFAULT_MODELS_NOTE

    meta, folder = store.read_member_folder(out / member / "member")
    meta = {k: v for k, v in meta.items() if k not in ("files", "format", "member")}
    meta["source"] = "deepisles default model (scripts/train_default_models.py)"
    meta["origin"] = {**meta.get("origin", {}), "kind": "default", "note": DEFAULT_MODELS_NOTE}
    meta["origin"].pop("run", None)
    files = {f: (lambda dst, src=folder / f: shutil.copyfile(src, dst)) for f in
             json.loads((folder / "member.json").read_text())["files"]}
    return store.write_member_folder(PACKAGE_DIR / member, member, meta, files, overwrite=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--members", default="seals,nvauto,factorizer")
    ap.add_argument("--iterations", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--init", default="none", choices=["none", "default"],
                    help="none: from random weights; default: fine-tune the packaged default model")
    ap.add_argument("--no-amp", action="store_true", help="float32 (bfloat16 autocast on CPU otherwise)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--val-every", type=int, default=500)
    ap.add_argument("--val-cases", type=int, default=3)
    ap.add_argument("--pool-size", type=int, default=16)
    ap.add_argument("--refresh-every", type=int, default=25)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--package", action="store_true", help="copy finished members into the package")
    ap.add_argument("--package-only", action="store_true", help="only package already trained members")
    args = ap.parse_args()
    members = [m.strip() for m in args.members.split(",") if m.strip()]
    if not args.package_only:
        if len(members) == 1:
            _train_one(members[0], args)
        else:
            with mp.get_context("spawn").Pool(len(members)) as pool:
                pool.starmap(_train_one, [(m, args) for m in members])
    if args.package or args.package_only:
        for m in members:
            print(f"packaged {m}: {package(m, args.out)}")


if __name__ == "__main__":
    sys.exit(main())
