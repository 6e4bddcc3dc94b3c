"""One rank: `python -m dittune.engine.parallel.rank JOBDIR RANK` (started by launch.py only).

Joins the process group through the launcher's TCP store, runs the job's target, writes rank 0's
result, or this rank's error (class, message, time) so the launcher can raise the first one."""

from __future__ import annotations

import datetime
import importlib
import json
import os
import pickle
import sys
import time
import traceback
from pathlib import Path


def main(argv: list[str]) -> int:
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # where this rank waits (the tuner asks on a timeout)
    _die_with_launcher()
    job_dir, rank = Path(argv[0]), int(argv[1])
    job = pickle.loads((job_dir / "job.pkl").read_bytes())
    world, backend = job["world"], job["backend"]
    try:
        import torch
        import torch.distributed as dist

        host, port = os.environ["DITTUNE_RANK_STORE"].rsplit(":", 1)
        store = dist.TCPStore(host, int(port), None, False, timeout=datetime.timedelta(seconds=300))
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600))
        module, _, name = job["target"].partition(":")
        result = getattr(importlib.import_module(module), name)(rank, world, job["payload"])
        if rank == 0:
            tmp = job_dir / "result.pkl.tmp"
            tmp.write_bytes(pickle.dumps(result))
            tmp.rename(job_dir / "result.pkl")
        dist.barrier()
        # End here, without tearing down: on 2 x H200 a rank whose pipeline had captured NCCL
        # collectives in a CUDA graph (Ulysses-2, compile, graph) wrote its result, then never
        # exited: no Python stack on SIGUSR1, so past main, in the interpreter's teardown of the
        # graphs and communicators. The result is written and every rank passed the barrier;
        # the driver frees the GPU when the process ends.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    except BaseException as e:  # noqa: BLE001 - every failure is reported, then the rank ends
        from dittune.errors import DittuneError

        (job_dir / f"error-{rank}.json").write_text(json.dumps(
            {"type": type(e).__name__, "message": str(e), "time": time.time()}))
        if not isinstance(e, DittuneError):
            traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # no teardown: a peer may be gone, and destroying the group would wait for it


def _die_with_launcher() -> None:
    """End this rank when its launcher ends, however it ends: a launcher killed by SIGTERM (e.g.
    `timeout`) runs no cleanup, and its ranks, orphaned, held both H200s and their NCCL peers for
    minutes. Linux: the kernel sends SIGKILL when the parent dies (PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    launcher = int(os.environ.get("DITTUNE_LAUNCHER_PID", "0"))
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if launcher and os.getppid() != launcher:  # it died before the line above took effect
        os._exit(1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
