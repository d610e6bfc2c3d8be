"""Segment a whole BIDS / ISLES'22 dataset into BIDS derivatives: resumable, kill-safe, shardable.

Each case runs the steps of :mod:`deepisles.pipeline` (members loaded once for the run) and is written by the
pipeline's writer with the BIDS layout into a private work folder inside the output root, fsynced, and the folder is renamed onto
``sub-X[/ses-Y]/dwi`` in one step: a kill at any moment leaves the complete case or nothing under the final
names. A finished case is recognised by its mask sidecar, which records the SHA-256 of the case's other
files. Work folders of dead runs are found by their lock (``flock``, released by the kernel when a process
dies) and removed. See docs/batch.md.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from deepisles import __version__
from deepisles.errors import DeepIslesError
from deepisles.io.dataset import DatasetCase, find_cases
from deepisles.io.write import fsync_dir
from deepisles.outputs.bids import (
    BIDSIGNORE,
    CaseNames,
    cohort_row,
    cohort_tsv,
    dataset_description,
    raw_link,
)
from deepisles.progress import Progress, as_progress

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no stale-work detection, no cross-process locks
    fcntl = None  # type: ignore[assignment]

WORK = ".deepisles-work"
RUN_LOCK = ".deepisles-batch.lock"
COHORT = "cohort.tsv"
FAILURES = "failures.jsonl"


@dataclass
class CaseOutcome:
    case_id: str
    status: str  # "done" (segmented now) | "skipped" (already done) | "failed" | "failed-before" (not retried)
    seconds: float = 0.0
    error: str | None = None


@dataclass
class BatchSummary:
    outroot: Path
    shard: tuple[int, int]
    cases: int  # cases of this shard
    outcomes: list[CaseOutcome] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def ok(self) -> bool:
        return not any(o.status in ("failed", "failed-before") for o in self.outcomes)


def parse_shard(spec: str | None) -> tuple[int, int]:
    """``"K/N"`` (1 <= K <= N) -> ``(K, N)``; None -> ``(1, 1)``."""
    if spec is None:
        return 1, 1
    try:
        k, n = (int(v) for v in spec.split("/"))
    except ValueError:
        k = n = 0
    if not 1 <= k <= n:
        raise DeepIslesError(f"--shard {spec}: expected K/N with 1 <= K <= N, e.g. 1/4")
    return k, n


def shard_cases(cases: list[DatasetCase], k: int, n: int) -> list[DatasetCase]:
    """Shard K of N: every N-th case of the case-id order, starting at the K-th (deterministic, balanced)."""
    ordered = sorted(cases, key=lambda c: c.case_id)
    return ordered[k - 1 :: n]


def case_names(case: DatasetCase) -> CaseNames:
    return CaseNames(case.subject, case.session)


def one_line(exc: BaseException) -> str:
    """The error on one line; internal errors keep their type name."""
    msg = " ".join(str(exc).split())
    return msg if isinstance(exc, DeepIslesError) and msg else f"{type(exc).__name__}: {msg}"


# --- files and locks ----------------------------------------------------------------------------------------
def _flock(fd: int, blocking: bool) -> bool:
    """Exclusive ``flock``; False when it is held elsewhere or locks do not work here (then nothing is
    treated as stale; blocking callers go on unlocked)."""
    if fcntl is None:  # pragma: no cover
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError:  # BlockingIOError: held by a live process; ENOLCK etc.: no locking on this file system
        return False
    return True


@contextmanager
def _locked(path: Path):
    """Hold an exclusive lock on a file or folder (blocking) for the ``with`` block."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _flock(fd, blocking=True)
        yield
    finally:
        os.close(fd)


@contextmanager
def run_lock(outroot: Path, shard: tuple[int, int]):
    """One batch run per output root and shard, for the whole run.

    Without sharding (1/1) the run takes an exclusive lock on ``OUTROOT/.deepisles-batch.lock``; a shard K/N
    takes it shared (shards of one job array run side by side) plus an exclusive lock on
    ``.deepisles-batch.K-of-N.lock``. A second run that would write the same cases fails at once."""
    k, n = shard
    held: list[int] = []

    def take(name: str, exclusive: bool, what: str) -> None:
        fd = os.open(outroot / name, os.O_RDWR | os.O_CREAT, 0o666)
        held.append(fd)
        if fcntl is None:  # pragma: no cover
            return
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DeepIslesError(
                f"{outroot}: another deepisles batch {what} is writing into this output root; wait for it to "
                "finish or choose another -o"
            ) from None
        except OSError:  # no locks on this file system: go on unlocked, as before
            pass

    try:
        if n == 1:
            take(RUN_LOCK, True, "run")
        else:
            take(RUN_LOCK, False, "run without --shard")
            take(f".deepisles-batch.{k}-of-{n}.lock", True, f"of shard {k}/{n}")
        yield
    finally:
        for fd in held:
            os.close(fd)


def _read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def finished_sidecar(outroot: Path, names: CaseNames, verify: bool = True) -> dict | None:
    """The mask sidecar of a finished case, or None. A case is finished when its mask sidecar lists the
    SHA-256 of the mask, probseg, agreement map, probseg sidecar and report, and (``verify``) those files match it."""
    from deepisles.io.hashing import sha256_file

    folder = outroot / names.folder
    sidecar = _read_json(folder / names.mask_json)
    ours = (sidecar or {}).get("deepisles")
    sums = ours.get("sha256") if isinstance(ours, dict) else None
    expected = {names.mask, names.probseg, names.agreement, names.probseg_json, names.report}
    if not isinstance(sums, dict) or set(sums) != expected:
        return None
    for name, digest in sums.items():
        path = folder / name
        if not path.is_file() or (verify and sha256_file(path) != digest):
            return None
    return sidecar


def read_failures(outroot: Path) -> dict[str, str]:
    """case id -> error of its latest failure in ``failures.jsonl`` (unreadable lines are ignored)."""
    out: dict[str, str] = {}
    try:
        lines = (outroot / FAILURES).read_text(encoding="utf-8").splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            rec = json.loads(line)
            out[str(rec["case"])] = str(rec["error"])
        except (ValueError, KeyError, TypeError):
            continue
    return out


def _log_failure(outroot: Path, case: DatasetCase, error: str) -> None:
    """Append one JSON line (one locked ``write`` on an O_APPEND file: shards never interleave)."""
    names = case_names(case)
    rec = {"case": case.case_id, "participant_id": names.subject, "session_id": names.session, "error": error,
           "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "deepisles": __version__}
    line = (json.dumps(rec) + "\n").encode("utf-8")
    path = outroot / FAILURES
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        _flock(fd, blocking=True)
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as fh:  # a line cut by a crash stays on its own
                fh.seek(size - 1)
                line = line if fh.read(1) == b"\n" else b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_cohort(outroot: Path, cases: list[DatasetCase]) -> Path:
    """cohort.tsv, one row per case of the dataset (ok / failed / pending), rebuilt from the files on disk
    under a lock on the output root and replaced atomically: concurrent shards never corrupt it."""
    from deepisles.io.write import write_text_atomic

    with _locked(outroot):
        failures = read_failures(outroot)
        rows = []
        for case in sorted(cases, key=lambda c: c.case_id):
            names = case_names(case)
            sidecar = finished_sidecar(outroot, names, verify=False)
            if sidecar is not None:
                report = _read_json(outroot / names.folder / names.report)
                rows.append(cohort_row(names, "ok", sidecar, report))
            elif case.case_id in failures:
                rows.append(cohort_row(names, "failed", error=failures[case.case_id]))
            else:
                rows.append(cohort_row(names, "pending"))
        return write_text_atomic(outroot / COHORT, cohort_tsv(rows))


class Workspace:
    """This run's private work folder ``OUTROOT/.deepisles-work/<token>/``, held by a lock on
    ``<token>.lock``; entering it removes the work folders whose lock nobody holds (killed runs)."""

    def __init__(self, outroot: Path):
        self.outroot = outroot
        self.root = outroot / WORK
        self.token = ""
        self.dir = self.root
        self._fd: int | None = None

    def __enter__(self) -> Workspace:
        for _ in range(10):
            self.token = f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"
            self.root.mkdir(parents=True, exist_ok=True)
            new = self.root / f"{self.token}.lock.new"
            try:  # the lock gets its final name only once it is held: no one sees it free while we live
                fd = os.open(new, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
                _flock(fd, blocking=True)
                try:
                    os.rename(new, self.root / f"{self.token}.lock")
                except OSError:
                    os.close(fd)
                    raise
            except FileNotFoundError:  # the work root or our new lock was cleaned away meanwhile: again
                continue
            self._fd = fd
            break
        else:
            raise DeepIslesError(f"{self.root}: cannot create a work folder")
        self.dir = self.root / self.token
        self.dir.mkdir()
        self.clean_stale()
        return self

    def clean_stale(self) -> None:
        for lock in sorted(self.root.iterdir()):
            token = lock.name.removesuffix(".new").removesuffix(".lock")
            if token in (lock.name, self.token):
                continue
            try:
                fd = os.open(lock, os.O_RDONLY)
            except OSError:
                continue
            try:
                if _flock(fd, blocking=False):  # nobody holds it: its run is dead
                    shutil.rmtree(self.root / token, ignore_errors=True)
                    lock.unlink(missing_ok=True)
            finally:
                os.close(fd)
        for folder in self.root.iterdir():  # a folder whose lock is gone: a cleanup that was itself killed
            if folder.is_dir() and not (self.root / f"{folder.name}.lock").exists():
                shutil.rmtree(folder, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        (self.root / f"{self.token}.lock").unlink(missing_ok=True)
        if self._fd is not None:
            os.close(self._fd)
        try:
            self.root.rmdir()  # only when no other run is using it
        except OSError:
            pass

    def publish(self, names: CaseNames, result, layout) -> None:
        publish_case(self.outroot, self.dir, names, result, layout)


def publish_case(outroot: Path, workdir: Path, names: CaseNames, result, layout) -> None:
    """Write the case's files into the run's work folder ``workdir`` (the pipeline's writer with the BIDS layout),
    fsync, rename the folder onto ``sub-X/[ses-Y/]dwi``. Every engine publishes through this (worker processes of
    the pipelined engine too: they die with the run that holds ``workdir``'s lock)."""
    from deepisles.pipeline import write_result

    tmp = workdir / names.stem
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_result(result, tmp, layout)  # the mask sidecar (completion record) last
    fsync_dir(tmp)
    final = outroot / names.folder
    final.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if final.exists():  # an incomplete or outdated earlier result: set aside in one step, dropped after
        old = workdir / f"old.{names.stem}"
        os.replace(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- the run -----------------------------------------------------------------------------------------------
def run_batch(
    dataset: str | Path,
    outroot: str | Path | None = None,
    *,
    members: str = "auto",
    device: str = "auto",
    fast: bool = False,
    skull_strip: str = "auto",
    shard: tuple[int, int] = (1, 1),
    retry_failed: bool = False,
    max_voxels: int | None = None,
    progress: Progress | None = None,
    on_case: Callable[[CaseOutcome], None] | None = None,
    flair_registered: bool = False,
    engine: str = "serial",
    workers: int = 0,
    precision: str = "fp32",
    ray_address: str | None = None,
    ray_cpus_per_actor: int = 0,
) -> BatchSummary:
    """Segment every case of ``dataset`` (shard ``K/N``) into BIDS derivatives under ``outroot`` (default
    ``DATASET/derivatives/deepisles``), skipping finished cases (and earlier failures unless
    ``retry_failed``); a failing case is logged to ``failures.jsonl`` and the run goes on. Rewrites
    ``cohort.tsv`` at the end. ``progress`` (:mod:`deepisles.progress`): ``advance(done, to_run)`` per case,
    ``step("CASE: stage")`` within a case; ``on_case(outcome)`` after each case. Every case runs the steps of
    :mod:`deepisles.pipeline` with the members loaded once and is written by its writer with a
    :class:`~deepisles.pipeline.BidsLayout`. ``flair_registered``: as for :func:`deepisles.api.segment`.
    ``engine``: ``serial``, ``pipelined`` (``workers`` processes, 0: the engine's default) or ``ray`` (Ray at
    ``ray_address``, default a local instance; ``ray_cpus_per_actor``, 0: the engine's default; the device is
    chosen per actor), see :mod:`deepisles.engines`. ``precision``: CPU inference precision, as for
    :func:`deepisles.api.segment`.
    """
    from deepisles.core import resolve_device
    from deepisles.engines import ENGINES
    from deepisles.io.outdir import ensure_writable_folder
    from deepisles.io.read import DEFAULT_MAX_VOXELS
    from deepisles.pipeline import RunOptions

    t0 = time.perf_counter()
    dataset = Path(dataset)
    opts = RunOptions(members=members, fast=fast, skull_strip=skull_strip, flair_registered=flair_registered,
                      max_voxels=DEFAULT_MAX_VOXELS if max_voxels is None else max_voxels,
                      precision=precision)  # fmt: skip
    opts.check()
    if engine not in ENGINES:
        raise DeepIslesError(f"--engine {engine}: expected one of {', '.join(ENGINES)}")
    if workers < 0:
        raise DeepIslesError(f"--workers {workers}: expected 0 (automatic) or more")
    if engine == "ray":  # Ray missing: fails now; the device is resolved per actor, from the cluster's GPUs
        from deepisles.engine_ray import device_request, import_ray

        import_ray()
        if ray_cpus_per_actor < 0:
            raise DeepIslesError(f"--ray-cpus-per-actor {ray_cpus_per_actor}: expected 0 (automatic) or more")
        opts = replace(opts, device=device_request(device))
    else:
        opts = replace(opts, device=resolve_device(device))
        opts.check_device()
    cases = find_cases(dataset, require_mask=False, keep_ambiguous=True)
    k, n = shard
    mine = shard_cases(cases, k, n)
    out = Path(outroot) if outroot is not None else dataset / "derivatives" / "deepisles"
    ensure_writable_folder(out)  # before any model is loaded
    with run_lock(out, (k, n)):
        return _run_locked(dataset, out, cases, mine, opts, shard=(k, n), retry_failed=retry_failed,
                           progress=as_progress(progress), on_case=on_case, t0=t0,
                           engine=dict(engine=engine, workers=workers, ray_address=ray_address,
                                       ray_cpus_per_actor=ray_cpus_per_actor))  # fmt: skip


def _run_locked(dataset, out, cases, mine, opts, *, shard, retry_failed, progress, on_case, t0,
                engine: dict) -> BatchSummary:  # fmt: skip
    from deepisles import engines
    from deepisles.io.write import write_json_atomic, write_text_atomic
    from deepisles.pipeline import load_members

    k, n = shard
    # the networks, once for the whole run (the Ray engine's actors load their own)
    member_set = None if engine["engine"] == "ray" else load_members(opts, progress)
    raw_root = dataset / "rawdata" if (dataset / "rawdata").is_dir() else dataset
    write_json_atomic(out / "dataset_description.json", dataset_description(raw_link(raw_root, out)))
    write_text_atomic(out / ".bidsignore", "\n".join(BIDSIGNORE) + "\n")

    summary = BatchSummary(out, (k, n), len(mine))
    with Workspace(out) as ws:
        failed_before = read_failures(out)
        todo = []
        for case in mine:
            if finished_sidecar(out, case_names(case)) is not None:
                summary.outcomes.append(CaseOutcome(case.case_id, "skipped"))
            elif case.case_id in failed_before and not retry_failed:
                summary.outcomes.append(CaseOutcome(case.case_id, "failed-before", error=failed_before[case.case_id]))
            else:
                todo.append(case)
        progress.advance(0, len(todo), f"{len(todo)} to segment ({len(mine) - len(todo)} already handled)")
        first = len(summary.outcomes)

        def record(outcome: CaseOutcome) -> None:
            summary.outcomes.append(outcome)
            progress.advance(len(summary.outcomes) - first, len(todo), outcome.case_id)
            if on_case:
                on_case(outcome)

        ctx = engines.Context(out, raw_root, ws.dir, opts, progress, record, member_set)
        engines.run(engine.pop("engine"), ctx, todo, **engine)
    write_cohort(out, cases)
    summary.seconds = time.perf_counter() - t0
    return summary
