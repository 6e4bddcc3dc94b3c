"""Runs one trial in a child process group with a timeout; the child's failure ends the trial,
never the study. On timeout or Ctrl-C the whole group is killed (never by name).

Warm workers (`Spares`): a trial's process is started ahead of its trial, imports torch, the engine
and its model's component libraries (transformers, diffusers, inductor), then waits for its job on
stdin. The trial still runs in a fresh process of its own (its own CUDA context, caches and
peaks); only the imports, which measure nothing, leave the trial's wall time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import shutil
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
    warm: bool = False  # ran in a warm worker (Spares): its imports were done before the trial


def _dump_stacks(p: subprocess.Popen, wait_s: float = 2.0) -> None:
    """Ask every process of a timed-out trial for its Python stacks (the worker and its ranks
    register SIGUSR1 with faulthandler), so that its record says where it hung."""
    try:
        os.killpg(p.pid, signal.SIGUSR1)
    except (ProcessLookupError, PermissionError):
        return
    time.sleep(wait_s)


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


@dataclass
class _Started:
    """A worker process waiting for its job on stdin, in its own session, with its own folder."""
    proc: subprocess.Popen
    tmp: Path
    env_key: tuple


def _spawn(argv: Sequence[str], tmp: Path, env: dict[str, str], stdin) -> subprocess.Popen:
    """A worker in its own session (killed as a group), stderr into `tmp`."""
    with open(tmp / "stderr.txt", "wb") as err:
        return subprocess.Popen(argv, stdin=stdin, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **env})


def _start(worker_cmd: Sequence[str], model: str, env: dict[str, str]) -> _Started:
    tmp = Path(tempfile.mkdtemp(prefix="dittune-trial-"))
    return _Started(_spawn([*worker_cmd, "--wait", model], tmp, env, subprocess.PIPE), tmp, _key(env))


def _key(env: dict[str, str]) -> tuple:
    return tuple(sorted(env.items()))


def _discard(w: _Started) -> None:
    _kill_group(w.proc)
    shutil.rmtree(w.tmp, ignore_errors=True)


class Spares:
    """Warm workers, one waiting per environment (the GPUs a trial is pinned to are fixed when its
    process starts: CUDA reads CUDA_VISIBLE_DEVICES once). Taking one starts its successor at once,
    so that the next trial on the same GPUs finds it imported; at most `limit` wait at a time (the
    oldest go first). Thread-safe. `close()` ends every waiting worker; a worker whose orchestrator
    died reads end-of-file on stdin and exits."""

    def __init__(self, worker_cmd: Sequence[str], model: str, limit: int = 4):
        self.worker_cmd, self.model, self.limit = tuple(worker_cmd), model, max(1, limit)
        self._waiting: list[_Started] = []
        self._lock = threading.Lock()
        self._closed = False

    def take(self, env: dict[str, str]) -> _Started | None:
        """A waiting worker for `env` (None if there is none yet); its successor is started."""
        key = _key(env)
        with self._lock:
            if self._closed:
                return None
            got = next((w for w in self._waiting if w.env_key == key), None)
            if got is not None:
                self._waiting.remove(got)
            self._prime_locked(env)
        if got is not None and got.proc.poll() is not None:  # died while waiting (the OOM killer, say)
            _discard(got)
            return None
        return got

    def prime(self, env: dict[str, str]) -> None:
        """Start a worker for `env` now, ahead of the first trial that takes one. Otherwise the
        first trial on each GPU starts cold: on 2 x H200 (Z-Image-Turbo, no compile) the first
        two trials side by side took 29.5 and 30.3 s, where the second configuration took 9.7 s
        in a warm worker in the one-GPU study."""
        with self._lock:
            if not self._closed and not any(w.env_key == _key(env) for w in self._waiting):
                self._prime_locked(env)

    def _prime_locked(self, env: dict[str, str]) -> None:
        self._waiting.append(_start(self.worker_cmd, self.model, env))
        while len(self._waiting) > self.limit:
            _discard(self._waiting.pop(0))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            waiting, self._waiting = self._waiting, []
        for w in waiting:
            _discard(w)


def run_trial(job: dict[str, Any], timeout_s: float, worker_cmd: Sequence[str] = WORKER_CMD,
              env: dict[str, str] | None = None, cancel: threading.Event | None = None,
              spares: Spares | None = None) -> Outcome:
    """`cancel` (trials run side by side in threads, where Ctrl-C does not reach): when set, the
    child group is killed and the trial ends as "cancelled", not a measurement. `spares`: run the
    trial in a warm worker when one waits for this environment (Outcome.warm says so)."""
    env = dict(env or {})
    w = spares.take(env) if spares is not None else None
    tmp = w.tmp if w is not None else Path(tempfile.mkdtemp(prefix="dittune-trial-"))
    try:
        job = dict(job, perf_dump_path=str(tmp / "perf.json"))
        (tmp / "job.json").write_text(json.dumps(job))
        t0 = time.perf_counter()
        if w is not None:
            p = w.proc
            try:
                p.stdin.write(f"{tmp / 'job.json'}\n".encode())
                p.stdin.close()
            except (BrokenPipeError, OSError):
                pass  # it died: its exit code and stderr say why, below
        else:
            p = _spawn([*worker_cmd, str(tmp / "job.json")], tmp, env, subprocess.DEVNULL)
        out = _wait(p, tmp, timeout_s, cancel, t0)
        out.warm = w is not None
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _wait(p: subprocess.Popen, tmp: Path, timeout_s: float, cancel: threading.Event | None, t0: float) -> Outcome:
    """Wait for the trial's process (killing its group on timeout, cancel or Ctrl-C); read its outcome."""
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
            _dump_stacks(p)
            _kill_group(p)
    except BaseException:  # Ctrl-C: take the child group down with us
        _kill_group(p)
        raise
    wall = time.perf_counter() - t0
    tail = (tmp / "stderr.txt").read_text(errors="replace")[-(TAIL_CHARS if rc is not None else 4 * TAIL_CHARS):]
    last = next((line for line in reversed(tail.strip().splitlines()) if line.strip()), "")
    if rc is None:  # the tail holds every process's stacks at the timeout (_dump_stacks)
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
