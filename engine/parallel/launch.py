"""Start one process per GPU and end them together.

`run(world, target, payload, backend)` starts `world` copies of `python -m
dittune.engine.parallel.rank`, which join one process group through a TCP store this process
hosts (port chosen by the OS: no port to pick or to collide on), call `target(rank, world,
payload)` and write rank 0's return value back. When any rank fails the others are stopped at
once and the first failure is raised here as the same exception class it was in the rank (out of
memory stays out of memory, a refused configuration stays refused), so a caller sees the exit
status a single process would give. A rank that crashed (a bug, not an expected failure) is a
RankCrashed with its exit code; its traceback is on stderr above.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import errors


class RankCrashed(RuntimeError):
    """A rank died of something other than an expected failure."""


def run(world: int, target: str, payload: Any, backend: str, poll_s: float = 0.05,
        env: dict[str, str] | None = None) -> Any:
    """Run `target(rank, world, payload)` in `world` rank processes (`env`: added to their
    environment); rank 0's return value, or the first failure re-raised."""
    import torch.distributed as dist

    with tempfile.TemporaryDirectory(prefix="dittune-ranks-") as tmp:
        job = Path(tmp)
        (job / "job.pkl").write_bytes(pickle.dumps({"target": target, "payload": payload, "world": world,
                                                    "backend": backend}))
        store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
        rank_env = dict(os.environ, **(env or {}), DITTUNE_RANK_STORE=f"127.0.0.1:{store.port}",
                        DITTUNE_LAUNCHER_PID=str(os.getpid()))
        procs = [subprocess.Popen([sys.executable, "-m", "dittune.engine.parallel.rank", tmp, str(r)], env=rank_env)
                 for r in range(world)]
        stopped: set[int] = set()
        try:
            failed = _watch(procs, poll_s)
        finally:
            stopped = _stop(procs)
            del store
        if failed is not None:
            raise _first_error(job, procs, failed, stopped)
        return pickle.loads((job / "result.pkl").read_bytes())


def _watch(procs: list[subprocess.Popen], poll_s: float) -> int | None:
    """Wait until every rank exits 0 (-> None) or one fails (-> its rank)."""
    while True:
        codes = [p.poll() for p in procs]
        for r, rc in enumerate(codes):
            if rc is not None and rc != 0:
                return r
        if all(rc == 0 for rc in codes):
            return None
        time.sleep(poll_s)


def _stop(procs: list[subprocess.Popen], grace_s: float = 5.0) -> set[int]:
    """End the ranks still running; returns which they were."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in live:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return {procs.index(p) for p in live}


def _first_error(job: Path, procs: list[subprocess.Popen], failed: int, stopped: set[int]) -> BaseException:
    """The failure that caused the others. When one rank fails, its peers fail next in their
    collectives, so: an expected failure (out of memory, refusal) if any rank recorded one, else
    a rank that died without recording anything (killed, or exited hard), else the earliest error."""
    recorded = {}
    for r in range(len(procs)):
        f = job / f"error-{r}.json"
        if f.exists():
            try:
                recorded[r] = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                pass
    expected = [(e["time"], r) for r, e in recorded.items() if _dittune_class(e["type"]) is not None]
    if expected:
        err = recorded[min(expected)[1]]
        return _dittune_class(err["type"])(err["message"])
    silent = [r for r, p in enumerate(procs) if p.returncode != 0 and r not in recorded and r not in stopped]
    if silent or not recorded:
        silent = silent or [failed]
        r = failed if failed in silent else silent[0]
        rc = procs[r].returncode
        how = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
        return RankCrashed(f"rank {r} of {len(procs)} ended with {how} before reporting an error")
    r = min(recorded, key=lambda k: recorded[k]["time"])
    err = recorded[r]
    return RankCrashed(f"rank {r} of {len(procs)} failed: {err['type']}: {err['message']} (traceback above)")


def _dittune_class(name: str) -> type | None:
    cls = getattr(errors, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, errors.DittuneError) else None
