"""``deepisles batch --engine ray``: the cases run on Ray actors, this process commits them (docs/batch.md, "Ray").

Ray is optional (``pip install 'deepisles[ray]'``) and imported only here, only when this engine is asked for.

- Actors: one per GPU when the cluster has GPUs and ``--device`` is ``auto`` or ``cuda``, else one per
  ``--ray-cpus-per-actor`` CPUs (default 2, or a node's CPUs if fewer), counted node by node. Each actor loads the
  members once and runs steps 1-7 of a case (:func:`deepisles.pipeline.run_case`); it writes nothing and returns
  the :class:`~deepisles.pipeline.SegmentationResult`.
- This process (the ``deepisles batch`` process that holds the output root's lock) publishes every result through
  :func:`deepisles.batch.publish_case` and records it through the same :class:`~deepisles.engines.Context` as the
  local engines: same files, same sidecars, same ``failures.jsonl``, and resume works across engines.
- At most ``AHEAD`` cases are queued per actor. An actor that dies during a case (killed, out of memory, node
  lost): that case is logged as failed (not retried; ``--retry-failed`` runs it again), the cases queued behind
  it go back to the queue, and a new actor takes its place.
- Every wait has a time limit: ``ray.wait`` polls (Ctrl-C is seen within ``POLL_S``) and a result that is ready
  is fetched with ``ray.get(..., timeout=GET_TIMEOUT_S)``; an actor that has not started (been placed, loaded its
  members) within ``START_TIMEOUT_S`` is given up, and the run stops when no actor is up.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from deepisles.errors import DeepIslesError
from deepisles.progress import Prefixed

INSTALL = "pip install 'deepisles[ray]'"
AHEAD = 2  # cases queued per actor (the one it runs and the next)
POLL_S = 1.0
GET_TIMEOUT_S = 300.0  # fetching a result that Ray reports ready
START_TIMEOUT_S = 900.0  # an actor starting: scheduled, members loaded
DEFAULT_CPUS_PER_ACTOR = 2
INPUTS = ("dwi", "adc", "flair")
# tests only: "exit:CASE_ID" makes the actor that runs that case die during it (os._exit), as a killed one would;
# "hang:CASE_ID" makes that case take 10 minutes
TEST_HOOK = "DEEPISLES_RAY_TEST_HOOK"


def import_ray():
    """The ``ray`` module, or a one-line usage error (exit code 2) naming the install command."""
    try:
        import ray
    except ImportError as exc:  # not installed: the install command; installed but broken: also why
        why = "" if isinstance(exc, ModuleNotFoundError) and exc.name == "ray" else f" ({' '.join(str(exc).split())})"
        raise DeepIslesError(f"--engine ray needs Ray, which is not installed{why}: {INSTALL}") from None
    return ray


def device_request(device: str) -> str:
    """``--device`` for the Ray engine, checked but not resolved here: the actors' device is chosen from the
    cluster's GPUs (``cuda:N`` is ``cuda``: Ray assigns each actor its GPU)."""
    d = (device or "auto").strip().lower()
    if d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit()):
        return "cuda" if d.startswith("cuda") else d
    raise DeepIslesError(f"--device {device}: expected auto, cpu, cuda or cuda:N")


# --- the actor -------------------------------------------------------------------------------------------------
class CaseRunner:
    """A Ray actor (made with ``ray.remote`` at run time): the members loaded once, then one case per call.

    ``env``: this run's ``DEEPISLES_*`` variables (e.g. ``DEEPISLES_HOME``, where the weights are), set before the
    members are loaded. Errors never cross as exceptions (some cannot be unpickled): ``ready`` and ``run`` return
    their one-line text."""

    def __init__(self, opts, env: dict[str, str]):
        try:  # Ctrl-C is the driver's business (it ends the actors)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # pragma: no cover - not the main thread
            pass
        os.environ.update(env)
        self.error: str | None = None
        try:
            from deepisles.pipeline import load_members
            from deepisles.progress import Silent

            opts.check_device()
            self.opts = opts
            self.members = load_members(opts, Silent())
        except Exception as exc:
            from deepisles.batch import one_line

            self.error = one_line(exc)

    def ready(self) -> tuple[str, str | None]:
        """``(where, error)``: this actor's host and process, and why it cannot run cases (None when it can)."""
        return f"{socket.gethostname()}:{os.getpid()}", self.error

    def run(self, case_id: str, files, layout) -> tuple[str, object]:
        """``("ok", SegmentationResult)`` or ``("failed", one-line error)``; nothing is written."""
        from deepisles.batch import one_line
        from deepisles.pipeline import Trace, run_case

        hook = os.environ.get(TEST_HOOK, "")
        if hook == f"exit:{case_id}":  # tests: killed during the case
            time.sleep(0.5)
            os._exit(1)
        if hook == f"hang:{case_id}":  # tests: a case that is still running when Ctrl-C comes
            time.sleep(600)
        try:
            members = replace(self.members, skipped=list(self.members.skipped))
            return "ok", run_case(files, self.opts, layout=layout, members=members, trace=Trace())
        except Exception as exc:  # one case never stops the actor
            return "failed", one_line(exc)


# --- the driver ------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    actors: int
    num_cpus: float
    num_gpus: float
    device: str  # the actors' device: "cuda" or "cpu"


def plan(ray, device: str, cpus_per_actor: int, cases: int) -> Plan:
    """How many actors of which size: from the live nodes' CPUs and GPUs (an actor must fit on one node)."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if not nodes:
        total = ray.cluster_resources()
        nodes = [{"CPU": total.get("CPU", 0), "GPU": total.get("GPU", 0)}]
    gpus = sum(int(n.get("GPU", 0)) for n in nodes)
    if device == "cuda" and not gpus:
        raise DeepIslesError("--device cuda: the Ray cluster has no GPU (use --device cpu or auto)")
    if device != "cpu" and gpus:
        # one actor per GPU, with its share of the node's CPUs (registration, biomarkers)
        share = min(max(1, int(n.get("CPU", 0)) // int(n["GPU"])) for n in nodes if int(n.get("GPU", 0)))
        cpus = min(cpus_per_actor, share) if cpus_per_actor else share
        return Plan(max(1, min(gpus, cases)), cpus, 1, "cuda")
    biggest = max(int(n.get("CPU", 0)) for n in nodes)
    if biggest < 1:
        raise DeepIslesError("the Ray cluster has no CPU")
    per = min(cpus_per_actor or DEFAULT_CPUS_PER_ACTOR, biggest)
    actors = sum(int(n.get("CPU", 0)) // per for n in nodes)
    return Plan(max(1, min(actors, cases)), per, 0, "cpu")


def connect(ray, address: str | None) -> bool:
    """Ray for this run: the caller's when already initialised (a notebook, the tests), else a new local instance
    (``address`` None) or the cluster at ``address`` (``auto``, ``HOST:PORT``, ``ray://...``). Ray's logs stay in
    its session folder (``/tmp/ray``), not on this terminal and never in the output root. True when this call
    started or joined Ray (then :func:`run_ray` shuts it down at the end)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report over the network
    quiet = dict(log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(include_dashboard=False, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"--ray-address {address}" if address else "a local Ray instance"
        raise DeepIslesError(f"{where}: cannot start or join Ray: {' '.join(str(exc).split())}") from None
    return True


def _died(exc: BaseException) -> str:
    """One line on an actor that died during a case, from Ray's multi-line ``ActorDiedError``."""
    text = " ".join(str(exc).split())
    kind = re.search(r"Worker exit type: (\w+)", text)
    pid, ip = re.search(r"\bpid: (\d+)", text), re.search(r"\bip: (\S+)", text)
    if "OUT_OF_MEMORY" in text or "low on memory" in text:
        why = "out of memory"
    elif getattr(exc, "preempted", False):
        why = "its node was preempted"
    else:
        why = "killed, crashed, out of memory or its node was lost"
    detail = "".join([f", exit type {kind[1]}" if kind else "", f", pid {pid[1]}" if pid else "",
                      f" on {ip[1]}" if ip else ""])  # fmt: skip
    return f"the Ray actor running this case died ({why}{detail}); see the Ray logs"


@contextmanager
def _no_worker_died_notices(ray):
    """Ray's driver prints a paragraph on stdout for every worker that died (``listen_error_messages`` in
    ``ray._private.worker``, whatever ``log_to_driver`` says); the run reports such a case as one failed line
    instead. Private API: when it is not there, nothing changes."""
    module = getattr(getattr(ray, "_private", None), "worker", None)
    original = getattr(module, "print_to_stdstream", None)
    if original is None:
        yield
        return

    def filtered(data, *args, **kwargs):
        if isinstance(data, dict) and data.get("pid") == "raylet":
            logging.getLogger(__name__).debug("ray: %s", " ".join(map(str, data.get("lines", []))))
            return None
        return original(data, *args, **kwargs)

    module.print_to_stdstream = filtered
    try:
        yield
    finally:
        module.print_to_stdstream = original


def _absolute(path):
    """Input paths as the actors must see them: absolute (an actor's working folder is not this process's)."""
    return path.absolute() if isinstance(path, Path) else path


@dataclass
class _Call:
    ref: object
    case: object  # DatasetCase
    job: object  # deepisles.engines.Job
    t0: float


@dataclass
class _Slot:
    actor: object
    starting: object | None  # the ``ready`` call until it answered
    since: float
    queue: deque = field(default_factory=deque)  # _Call, in the order the actor runs them
    given_up: bool = False  # not started within START_TIMEOUT_S while others run


def run_ray(ctx, todo: list, *, address: str | None = None, cpus_per_actor: int = 0) -> None:
    """Run ``todo`` on Ray actors; publish and record each case here (see the module's docstring)."""
    if not todo:  # nothing to do (e.g. a resumed run): Ray is not started
        return
    ray = import_ray()
    started = connect(ray, address)
    driver = None
    with _no_worker_died_notices(ray):
        try:
            p = plan(ray, ctx.opts.device, cpus_per_actor, len(todo))
            gpu = f", {p.num_gpus:g} GPU" if p.num_gpus else ""
            ctx.progress.step(f"starting {p.actors} Ray actor(s) ({p.num_cpus:g} CPU{gpu} each)")
            driver = _Driver(ray, ctx, p)
            driver.run(todo)
        finally:  # also on Ctrl-C: the actors end; a case not yet published stays unpublished
            if driver is not None:
                driver.stop_all()
            if started:
                ray.shutdown()


class _Driver:
    """The actors (``slots``), their queues, and the loop that feeds them and commits what they return."""

    def __init__(self, ray, ctx, p: Plan):
        self.ray, self.ctx, self.plan = ray, ctx, p
        opts = replace(ctx.opts, device=p.device)
        env = {k: v for k, v in os.environ.items() if k.startswith("DEEPISLES_")}
        cls = ray.remote(num_cpus=p.num_cpus, num_gpus=p.num_gpus, max_restarts=0)(CaseRunner)
        self.new_actor = lambda: cls.remote(opts, env)
        self.slots: list[_Slot] = []
        self.slots = [self.spawn() for _ in range(p.actors)]

    def spawn(self) -> _Slot:
        actor = self.new_actor()
        return _Slot(actor, actor.ready.remote(), time.monotonic())

    def stop(self, slot: _Slot) -> None:
        try:
            self.ray.kill(slot.actor, no_restart=True)
        except Exception:  # already gone
            pass

    def stop_all(self) -> None:
        for slot in self.slots:
            self.stop(slot)

    def run(self, todo: list) -> None:
        pending = deque(todo)
        while True:
            for slot in self.slots:
                if slot.starting is None:
                    self.feed(slot, pending)
            refs = [s.starting for s in self.slots if s.starting is not None]
            refs += [s.queue[0].ref for s in self.slots if s.queue]  # an actor runs its calls in order
            if not any(s.queue for s in self.slots) and not pending:
                return
            ready, _ = self.ray.wait(refs, num_returns=1, timeout=POLL_S)
            for i, slot in enumerate(self.slots):
                if slot.starting is not None:
                    self.check_started(slot, slot.starting in ready)
                elif slot.queue and slot.queue[0].ref in ready:
                    if not self.commit(slot.queue.popleft()):  # the actor died: the cases behind go back
                        pending.extendleft(c.case for c in reversed(slot.queue))
                        self.stop(slot)
                        self.slots[i] = self.spawn()
            for slot in [s for s in self.slots if s.given_up]:  # never placed: the others go on
                self.stop(slot)
                self.slots.remove(slot)

    def feed(self, slot: _Slot, pending: deque) -> None:
        while len(slot.queue) < AHEAD and pending:
            case, t0 = pending.popleft(), time.perf_counter()
            try:
                job = self.ctx.job(case)
            except Exception as exc:  # e.g. an ambiguous case: fails here, as in the other engines
                self.ctx.failed(case, t0, exc)
                continue
            files = replace(job.files, **{k: _absolute(getattr(job.files, k)) for k in INPUTS})
            slot.queue.append(_Call(slot.actor.run.remote(case.case_id, files, job.layout), case, job, t0))
            Prefixed(self.ctx.progress, case.case_id).step("queued on a Ray actor")

    def check_started(self, slot: _Slot, answered: bool) -> None:
        from ray.exceptions import GetTimeoutError, RayError

        from deepisles.batch import one_line

        if not answered:
            if time.monotonic() - slot.since > START_TIMEOUT_S:
                if any(s.starting is None for s in self.slots):  # other actors run the cases
                    slot.given_up = True
                    return
                what = "GPUs" if self.plan.num_gpus else "CPUs"
                raise DeepIslesError(f"no Ray actor started within {START_TIMEOUT_S:.0f} s (not enough free "
                                     f"{what} in the Ray cluster?)")  # fmt: skip
            return
        try:
            where, error = self.ray.get(slot.starting, timeout=GET_TIMEOUT_S)
        except (RayError, GetTimeoutError) as exc:
            raise DeepIslesError(f"a Ray actor could not start: {one_line(exc)[:300]}") from None
        if error:
            raise DeepIslesError(f"a Ray actor could not load the members: {error}")
        slot.starting = None
        self.ctx.progress.step(f"Ray actor up ({where})")

    def commit(self, call: _Call) -> bool:
        """Publish and record one finished call; False when its actor died during it (the case is failed)."""
        from ray.exceptions import GetTimeoutError, RayActorError, RayError

        from deepisles.batch import publish_case

        ctx = self.ctx
        try:
            status, payload = self.ray.get(call.ref, timeout=GET_TIMEOUT_S)
        except RayActorError as exc:  # killed, out of memory, node lost: this case fails, the rest run
            ctx.failed(call.case, call.t0, _died(exc))
            return False
        except (RayError, GetTimeoutError) as exc:
            ctx.failed(call.case, call.t0, f"Ray: {' '.join(str(exc).split())[:300]}")
            return True
        if status != "ok":
            ctx.failed(call.case, call.t0, payload)
            return True
        try:
            Prefixed(ctx.progress, call.case.case_id).step("writing")
            publish_case(ctx.out, ctx.workdir, call.job.names, payload, call.job.layout)
        except Exception as exc:  # e.g. disk full: this case fails, as in the other engines
            ctx.failed(call.case, call.t0, exc)
            return True
        ctx.done(call.case, call.t0)
        return True
