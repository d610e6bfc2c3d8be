"""How ``deepisles batch`` runs its cases (``--engine``): ``serial``, ``pipelined`` or ``ray``.

Every engine runs the steps of :mod:`deepisles.pipeline` and hands each case to :func:`deepisles.batch.publish_case`
(private work folder, fsync, one rename), logs failures through the same :class:`Context` and sees only the cases
:mod:`deepisles.batch` left to do (finished ones skipped by their sidecar): outputs, failures and resume are the same
whichever engine ran a case.

- ``serial``: one case after the other in this process (members loaded once).
- ``pipelined``: steps 1-3 (read, validate, register, brain mask) and steps 5-8 (combine, measure, report, write,
  publish) in a pool of worker processes, the members (step 4) here with the models loaded once; at most
  ``AHEAD`` cases prepared ahead and ``AHEAD`` waiting to be written (bounded memory).
- ``ray``: steps 1-7 on Ray actors (members loaded once per actor), publishing here: :mod:`deepisles.engine_ray`
  (Ray is optional and imported only for this engine).
"""

from __future__ import annotations

import functools
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from deepisles.errors import DeepIslesError, Interrupted
from deepisles.io.dataset import DatasetCase
from deepisles.outputs.bids import CaseNames, bids_uri
from deepisles.progress import Prefixed, Progress, Silent

ENGINES = ("serial", "pipelined", "ray")
AHEAD = 2  # cases prepared ahead of the members, and cases waiting to be written


@dataclass(frozen=True)
class Job:
    """One case to run: its inputs, names and the layout that writes it."""

    case_id: str
    names: CaseNames
    files: object  # deepisles.pipeline.InputFiles
    layout: object  # deepisles.pipeline.BidsLayout


@dataclass
class Context:
    """What every engine needs from the batch run: options, where to publish, how to record an outcome."""

    out: Path
    raw_root: Path
    workdir: Path  # this run's private work folder (deepisles.batch.Workspace.dir)
    opts: object  # deepisles.pipeline.RunOptions
    progress: Progress
    record: Callable  # CaseOutcome -> None
    members: object | None = None  # deepisles.pipeline.MemberSet, loaded once

    def job(self, case: DatasetCase) -> Job:
        from deepisles.batch import case_names
        from deepisles.pipeline import BidsLayout, InputFiles

        if case.problem:  # e.g. two DWI files for one subject: this case fails, the others run
            raise DeepIslesError(case.problem)
        names = case_names(case)
        sources = tuple(bids_uri(p, self.raw_root) for p in (case.dwi, case.adc, case.flair) if p is not None)
        return Job(case.case_id, names, InputFiles(case.dwi, case.adc, case.flair), BidsLayout(names, sources))

    def member_set(self):
        return replace(self.members, skipped=list(self.members.skipped))

    def done(self, case: DatasetCase, t0: float) -> None:
        from deepisles.batch import CaseOutcome

        self.record(CaseOutcome(case.case_id, "done", time.perf_counter() - t0))

    def failed(self, case: DatasetCase, t0: float, exc: BaseException | str) -> None:
        from deepisles.batch import CaseOutcome, _log_failure, one_line

        error = exc if isinstance(exc, str) else one_line(exc)
        _log_failure(self.out, case, error)
        self.record(CaseOutcome(case.case_id, "failed", time.perf_counter() - t0, error))


def run(engine: str, ctx: Context, todo: list[DatasetCase], *, workers: int = 0, ray_address: str | None = None,
        ray_cpus_per_actor: int = 0) -> None:  # fmt: skip
    if engine == "serial":
        run_serial(ctx, todo)
    elif engine == "pipelined":
        run_pipelined(ctx, todo, workers)
    elif engine == "ray":
        from deepisles.engine_ray import run_ray

        run_ray(ctx, todo, address=ray_address, cpus_per_actor=ray_cpus_per_actor)
    else:
        raise DeepIslesError(f"--engine {engine}: expected one of {', '.join(ENGINES)}")


def default_workers() -> int:
    """Worker processes of the pipelined engine when not given: one core is left to the members."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


# --- serial -------------------------------------------------------------------------------------------------
def run_serial(ctx: Context, todo: list[DatasetCase]) -> None:
    from deepisles.batch import publish_case
    from deepisles.pipeline import Trace, run_case

    for case in todo:
        t0, step = time.perf_counter(), Prefixed(ctx.progress, case.case_id)
        try:
            job = ctx.job(case)
            step.step("starting")
            result = run_case(job.files, ctx.opts, layout=job.layout, members=ctx.member_set(), progress=step,
                              trace=Trace())  # fmt: skip
            step.step("writing")
            publish_case(ctx.out, ctx.workdir, job.names, result, job.layout)
        except (KeyboardInterrupt, Interrupted):  # Ctrl-C: stop the run (the case is not published)
            raise KeyboardInterrupt from None
        except Exception as exc:  # one case never stops the run
            ctx.failed(case, t0, exc)
            continue
        ctx.done(case, t0)


# --- pipelined ----------------------------------------------------------------------------------------------
def _init_worker() -> None:
    """Worker processes: Ctrl-C is the main process's business; die with it (Linux), so that no orphan writes
    into a work folder whose lock was released."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


class CaseError(DeepIslesError):
    """A case's error as it crosses a process boundary: its one-line text (some exceptions, e.g. ``InputError``,
    cannot be unpickled, and one that cannot breaks the whole process pool)."""


def _one_line_errors(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        from deepisles.batch import one_line

        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise CaseError(one_line(exc)) from None

    return wrapped


@_one_line_errors
def _prepare(files, opts):
    """Stage 1 (a worker): steps 1 and 3, read + validate and FLAIR registration + brain mask."""
    from deepisles.pipeline import Trace, prepare_case, validate

    t, trace = time.perf_counter(), Trace()
    loaded = validate(files, opts, trace, Silent())
    case = prepare_case(loaded, opts, trace, Silent())
    return loaded, case, trace, time.perf_counter() - t


@_one_line_errors
def _finish(job: Job, loaded, case, runs, opts, trace, elapsed: float, out: Path, workdir: Path) -> None:
    """Stage 3 (a worker): steps 5-8 and publishing."""
    from deepisles.batch import publish_case
    from deepisles.pipeline import finish_case

    result = finish_case(job.files, loaded, case, runs, opts, trace, Silent(), layout=job.layout, elapsed=elapsed)
    publish_case(out, workdir, job.names, result, job.layout)


class _Pool:
    """A ``spawn`` process pool (no fork of a process holding torch threads) that is made anew when a worker
    died (the cases it held fail with ``BrokenProcessPool``, the next ones run)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.ex = None

    def submit(self, fn, *args):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        for _ in range(2):
            if self.ex is None:
                self.ex = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                              initializer=_init_worker)  # fmt: skip
            try:
                return self.ex.submit(fn, *args)
            except BrokenProcessPool:
                self.ex.shutdown(wait=False, cancel_futures=True)
                self.ex = None
        raise DeepIslesError("the pipelined engine's worker processes keep dying")  # pragma: no cover

    def close(self) -> None:
        if self.ex is not None:
            self.ex.shutdown(wait=True)

    def stop(self) -> None:
        """Cancel what is queued and end the workers now (a case they were writing is not published)."""
        if self.ex is None:
            return
        procs = list((getattr(self.ex, "_processes", None) or {}).values())
        self.ex.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(5)


def run_pipelined(ctx: Context, todo: list[DatasetCase], workers: int = 0) -> None:
    """Three stages over the cases: prepare (pool) -> members (here) -> finish and publish (pool)."""
    from deepisles.pipeline import run_members

    pool = _Pool(workers or default_workers())
    pending = iter(todo)
    prepared: deque = deque()  # (case, job, future of _prepare, t0), in case order
    finishing: deque = deque()  # (case, future of _finish, t0)

    def feed() -> None:
        while len(prepared) < AHEAD:
            case = next(pending, None)
            if case is None:
                return
            t0 = time.perf_counter()
            try:
                job = ctx.job(case)
            except Exception as exc:
                ctx.failed(case, t0, exc)
                continue
            prepared.append((case, job, pool.submit(_prepare, job.files, ctx.opts), t0))

    def collect(limit: int) -> None:
        """Record the finished writes, waiting (oldest first) until at most ``limit`` are left."""
        while finishing and (len(finishing) > limit or finishing[0][1].done()):
            case, fut, t0 = finishing.popleft()
            try:
                fut.result()
            except Exception as exc:
                ctx.failed(case, t0, exc)
            else:
                ctx.done(case, t0)

    try:
        feed()
        while prepared:
            case, job, fut, t0 = prepared.popleft()
            feed()  # keep the workers busy while this case runs its members
            step = Prefixed(ctx.progress, case.case_id)
            try:
                step.step("reading, registering (worker)")
                loaded, pcase, trace, elapsed = fut.result()
                t = time.perf_counter()
                runs = run_members(ctx.member_set(), pcase, trace, step, ctx.opts.precision)
                elapsed += time.perf_counter() - t
                step.step("writing (worker)")
                fin = pool.submit(_finish, job, loaded, pcase, runs, ctx.opts, trace, elapsed, ctx.out, ctx.workdir)
            except (KeyboardInterrupt, Interrupted):
                raise KeyboardInterrupt from None
            except Exception as exc:
                ctx.failed(case, t0, exc)
                continue
            finishing.append((case, fin, t0))
            collect(AHEAD)
        collect(0)
    except BaseException:
        pool.stop()
        raise
    pool.close()
