"""Runs one trial in a child process group with a timeout; the child's failure ends the trial,
never the study. On timeout or Ctrl-C the whole group is killed (never by name)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .worker import EXIT_OOM, EXIT_REFUSED

WORKER_CMD = (sys.executable, "-m", "dittune.tuner.worker")
TAIL_CHARS = 4000


@dataclass
class Outcome:
    status: str  # complete | oom | timeout | failed | cancelled
    dump: dict[str, Any] | None
    reason: str
    stderr_tail: str
    wall_s: float


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def run_trial(job: dict[str, Any], timeout_s: float, worker_cmd: Sequence[str] = WORKER_CMD,
              env: dict[str, str] | None = None, cancel: threading.Event | None = None) -> Outcome:
    """`cancel` (trials run side by side in threads, where Ctrl-C does not reach): when set, the
    child group is killed and the trial ends as "cancelled", not a measurement."""
    with tempfile.TemporaryDirectory(prefix="dittune-trial-") as tmp:
        tmp = Path(tmp)
        job = dict(job, perf_dump_path=str(tmp / "perf.json"))
        (tmp / "job.json").write_text(json.dumps(job))
        err_path = tmp / "stderr.txt"
        t0 = time.perf_counter()
        with open(err_path, "wb") as err:
            p = subprocess.Popen([*worker_cmd, str(tmp / "job.json")], stdout=subprocess.DEVNULL, stderr=err,
                                 start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
            end = time.monotonic() + timeout_s
            try:
                rc = None
                while rc is None and time.monotonic() < end:
                    try:
                        rc = p.wait(timeout=min(0.2, max(end - time.monotonic(), 0.01)) if cancel is not None else timeout_s)
                    except subprocess.TimeoutExpired:
                        if cancel is not None and cancel.is_set():
                            _kill_group(p)
                            return Outcome("cancelled", None, "cancelled", "", time.perf_counter() - t0)
                if rc is None:
                    _kill_group(p)
            except BaseException:  # Ctrl-C: take the child group down with us
                _kill_group(p)
                raise
        wall = time.perf_counter() - t0
        tail = err_path.read_text(errors="replace")[-TAIL_CHARS:]
        last = next((line for line in reversed(tail.strip().splitlines()) if line.strip()), "")
        if rc is None:
            return Outcome("timeout", None, f"timed out after {timeout_s:.0f} s", tail, wall)
        if rc == 0:
            try:
                dump = json.loads((tmp / "perf.json").read_text())
            except (OSError, json.JSONDecodeError) as e:
                return Outcome("failed", None, f"worker exited 0 without a readable perf dump ({e})", tail, wall)
            return Outcome("complete", dump, "", tail, wall)
        if rc == EXIT_OOM:
            return Outcome("oom", None, last.removeprefix("oom: ") or "out of memory", tail, wall)
        if rc == EXIT_REFUSED:
            return Outcome("failed", None, last or "engine refused the configuration", tail, wall)
        if rc < 0:  # killed: the stderr's last line is whatever it printed before (a warning, say), not why
            name = signal.Signals(-rc).name if -rc in signal.valid_signals() else str(-rc)
            oom = " (the kernel's out-of-memory killer sends it: host memory ran out?)" if -rc == signal.SIGKILL else ""
            return Outcome("failed", None, f"worker killed by {name}{oom}", tail, wall)
        return Outcome("failed", None, f"worker crashed (exit code {rc}): {last[:300]}", tail, wall)
