"""Measurement helpers for the benchmarks (standard library only, plus numpy/nibabel for mask comparisons).

* :func:`run_measured` runs a command and returns its wall time, CPU time (user + sys) and peak resident
  memory. The rusage comes from ``os.wait4`` on the child, so it covers the child and every descendant it
  waited for; ``ru_maxrss`` is then the peak of the largest single process in that tree (Linux keeps the
  maximum, not the sum).
* :class:`PhaseMeter` measures phases inside one process: wall time, CPU time, peak RSS since the phase started
  (``/proc/self/clear_refs`` resets the kernel's high-water mark) and peak CUDA memory
  (``torch.cuda.reset_peak_memory_stats``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


# --- processes ------------------------------------------------------------------------------------
def run_measured(cmd, *, env=None, cwd=None, log: Path | None = None, timeout: float | None = None) -> dict:
    """Run ``cmd``; wall, user+sys CPU seconds and peak RSS (MiB) of the process tree, exit code."""
    out = open(log, "w") if log else subprocess.DEVNULL
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        timed_out = False
        deadline = None if timeout is None else t0 + timeout
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                timed_out = True
                os.killpg(proc.pid, 9)
                pid, status, ru = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log:
            out.close()
    return {
        "wall_s": round(wall, 3),
        "cpu_s": round(ru.ru_utime + ru.ru_stime, 3),
        "peak_rss_mib": round(ru.ru_maxrss / 1024, 1),
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "log": str(log) if log else None,
    }


def tail(path: Path | str | None, n: int = 25) -> str:
    if not path or not Path(path).exists():
        return ""
    lines = Path(path).read_text(errors="replace").splitlines()
    return "\n".join(lines[-n:])


def gpu_mem_from_file(path: Path) -> int | None:
    """Largest ``torch.cuda.max_memory_allocated`` reported by the shim (``pid bytes`` lines)."""
    if not path.exists():
        return None
    vals = [int(line.split()[1]) for line in path.read_text().splitlines() if len(line.split()) == 2]
    return max(vals) if vals else None


# --- phases inside one process --------------------------------------------------------------------
def _read_hwm_kib() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PhaseMeter:
    """Consecutive named phases: wall seconds, peak RSS (MiB) and peak CUDA memory (MiB) of each."""

    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self.phases: list[dict] = []
        self._name = None
        self._t = None
        self.hwm_reset_ok = True

    def _torch(self):
        import torch

        return torch

    def start(self, name: str) -> None:
        self.stop()
        self._name = name
        if self.cuda:
            torch = self._torch()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.hwm_reset_ok &= _reset_hwm()
        self._cpu = time.process_time()
        self._t = time.perf_counter()

    def stop(self) -> None:
        if self._name is None:
            return
        rec = {"phase": self._name}
        if self.cuda:
            torch = self._torch()
            torch.cuda.synchronize()
            rec["gpu_peak_alloc_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            rec["gpu_peak_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        rec["wall_s"] = round(time.perf_counter() - self._t, 3)
        rec["cpu_s"] = round(time.process_time() - self._cpu, 3)  # user + sys of this process, all threads
        hwm = _read_hwm_kib()
        rec["peak_rss_mib"] = round(hwm / 1024, 1) if hwm else None
        self.phases.append(rec)
        self._name = None


# --- GPU memory as the driver sees it ----------------------------------------------------------------
def nvidia_smi(query: str, index: int = 0) -> list[str] | None:
    """``nvidia-smi --query-gpu=QUERY`` of GPU ``index`` as a list of fields, or None (no nvidia-smi / failure)."""
    import shutil

    if not shutil.which("nvidia-smi"):
        return None
    try:
        r = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-i", str(index)],
                           capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0 or not r.stdout.strip():
        return None
    return [f.strip() for f in r.stdout.strip().splitlines()[0].split(",")]


class NvidiaSmiSampler:
    """Context manager: the largest ``memory.used`` (MiB, whole GPU: every process, CUDA contexts and caching
    allocators included) that ``nvidia-smi`` reports while the block runs, sampled every ``interval`` seconds,
    and what was used before it started (``baseline_mib``). ``result()`` is None without nvidia-smi."""

    def __init__(self, enabled: bool = True, index: int = 0, interval: float = 0.25):
        self.enabled, self.index, self.interval = enabled, index, interval
        self.baseline = self.peak = None
        self.samples = 0
        self._stop = None

    def _used(self) -> float | None:
        f = nvidia_smi("memory.used", self.index)
        try:
            return float(f[0]) if f else None
        except ValueError:
            return None

    def __enter__(self):
        import threading

        if not self.enabled or self._used() is None:
            self.enabled = False
            return self
        self.baseline = self.peak = self._used()
        self._stop = threading.Event()

        def poll():
            while not self._stop.wait(self.interval):
                v = self._used()
                if v is not None:
                    self.samples += 1
                    self.peak = max(self.peak, v)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=15)
        return False

    def result(self) -> dict | None:
        if not self.enabled:
            return None
        return {"used_peak_mib": self.peak, "baseline_mib": self.baseline,
                "peak_above_baseline_mib": round(self.peak - self.baseline, 1), "samples": self.samples,
                "interval_s": self.interval}  # fmt: skip


# --- masks ----------------------------------------------------------------------------------------
def mask_agreement(a_path: Path, b_path: Path, b_threshold: float | None = None) -> dict:
    """Dice and voxel agreement of two masks on the same grid (``b >= b_threshold`` when given)."""
    import nibabel as nib
    import numpy as np

    a = np.asarray(nib.load(str(a_path)).dataobj) > 0
    b = np.asarray(nib.load(str(b_path)).dataobj)
    b = b >= b_threshold if b_threshold is not None else b > 0
    if a.shape != b.shape:
        return {"error": f"shape {a.shape} vs {b.shape}"}
    inter, tot = int(np.sum(a & b)), int(a.sum() + b.sum())
    return {"dice": round(2 * inter / tot, 5) if tot else 1.0, "voxels_differ": int(np.sum(a != b)),
            "ref_voxels": int(a.sum()), "ours_voxels": int(b.sum())}


# --- environment ----------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
COMMIT_ENV = "DEEPISLES_COMMIT"  # for copies of the tree without .git (a lent GPU machine): set it to the commit


def git_commit() -> dict:
    """The commit the benchmark ran from: ``git rev-parse HEAD`` and whether tracked files had uncommitted changes
    (``dirty``); without a git checkout, ``$DEEPISLES_COMMIT`` as given by whoever copied the tree, else unknown."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=30)  # fmt: skip
        if head.returncode == 0:
            status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=30)  # fmt: skip
            return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip()), "source": "git"}
    except (OSError, subprocess.TimeoutExpired):
        pass
    if os.environ.get(COMMIT_ENV):
        return {"commit": os.environ[COMMIT_ENV], "dirty": None, "source": f"${COMMIT_ENV}"}
    return {"commit": "unknown", "dirty": None, "source": f"no git checkout and no ${COMMIT_ENV}"}


def provenance() -> dict:
    """What every result file records: the commit (:func:`git_commit`) and the machine (:func:`machine_info`)."""
    return {"commit": git_commit(), "machine": machine_info()}


def machine_info() -> dict:
    """CPU model and cores, memory, GPU (name, memory) if any, torch version and threads, Python, platform, load."""
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except (OSError, ValueError, IndexError):
        pass
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except ImportError:
        pass
    return info


def dump_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)
