"""Shims for running DeepISLES' reference code in a benchmark (loaded through PYTHONPATH).

* ``SEALS_REF_DDP_SHIM=1``: the nnU-Net v1 DDP trainer calls ``init_process_group('nccl')``; we use gloo for
  a world of size 1 (also on machines without NCCL/CUDA), and ``DistributedDataParallel`` accepts
  ``device_ids`` for a CPU module. ``torch.load`` defaults to ``weights_only=False`` as the torch versions
  DeepISLES targets did. None of this changes a number.
* ``BENCH_GPU_MEM_FILE=path``: at exit, append ``torch.cuda.max_memory_allocated()`` (bytes) of this process
  to that file when CUDA was used (measurement only).
"""
import os

if os.environ.get("SEALS_REF_DDP_SHIM"):
    import socket

    import torch
    import torch.distributed as dist
    import torch.nn.parallel as par

    _orig_ipg = dist.init_process_group

    def _ipg(*a, **k):
        k["backend"] = "gloo"
        if "MASTER_PORT" not in os.environ:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
            s.close()
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        if dist.is_initialized():
            return None
        return _orig_ipg(*a, **k)

    dist.init_process_group = _ipg
    _DDP = par.DistributedDataParallel

    class _CPUDDP(_DDP):
        def __init__(self, module, device_ids=None, *a, **k):
            if next(module.parameters()).is_cuda:
                super().__init__(module, device_ids, *a, **k)
            else:
                super().__init__(module, *a, **k)

    par.DistributedDataParallel = _CPUDDP
    import torch.nn.parallel.distributed as _d

    _d.DistributedDataParallel = _CPUDDP
    _orig_load = torch.load

    def _load(*a, **k):
        k.setdefault("weights_only", False)
        return _orig_load(*a, **k)

    torch.load = _load

if os.environ.get("BENCH_GPU_MEM_FILE"):
    import atexit

    def _report():
        import sys

        torch = sys.modules.get("torch")
        if torch is None:
            return
        try:
            if torch.cuda.is_initialized():
                with open(os.environ["BENCH_GPU_MEM_FILE"], "a") as fh:
                    fh.write(f"{os.getpid()} {torch.cuda.max_memory_allocated()}\n")
        except Exception:
            pass

    atexit.register(_report)
