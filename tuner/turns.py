"""Finalists measured in turns: every finalist's worker process loaded and warmed up (one after
another, so that each cold start is measured alone), then their measured requests in alternating
slots, A B C A B C ..., one process measuring at a time. Whatever the host does over seconds (a
shared CPU's contention moved the tiny FLUX 20-40% between processes started a minute apart) then
falls on every finalist alike, and their ratios within one round hold where their latencies do not.

The protocol, over a Unix socket the orchestrator listens on (the job's "turns" path): the worker,
warm, connects and sends "ready"; each "go S" lets it measure requests for S seconds (it starts no
request after S), and it answers "slot"; "stop" ends its measurement. Its perf dump then has
`measured.slots`: the index of the first request of every slot."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from .runner import WORKER_CMD, Outcome, _kill_group, _spawn, _wait

SLOT_S = 0.5  # short enough that the host's load changes little between neighbouring slots
_names = itertools.count()


class Pace:
    """The worker's side: `GenerateRequest.pace`, asked before every measured request."""

    def __init__(self, path: str):
        self.path, self.sock, self.end, self.slots = path, None, 0.0, []

    def _command(self, reply: bytes) -> float | None:
        self.sock.sendall(reply)
        line = self._file.readline().decode().strip()
        if line.startswith("go "):
            return float(line[3:])
        return None  # "stop", or the orchestrator is gone

    def __call__(self, measured: int) -> bool:
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(self.path)
            self._file = self.sock.makefile("rb")
            reply = b"ready\n"
        elif time.perf_counter() < self.end:
            return True
        else:
            reply = b"slot\n"
        slot = self._command(reply)
        if slot is None:
            self.sock.close()
            return False
        self.slots.append(measured)
        self.end = time.perf_counter() + slot
        return True


class _Turn:
    """One worker: started, then (ready) warm and connected, then its turns, then (finish) its outcome.
    `timeout_s` bounds each phase: load and warm-up, every turn, the end."""

    def __init__(self, job: dict[str, Any], env: dict[str, str], timeout_s: float, worker_cmd: Sequence[str]):
        self.tmp = Path(tempfile.mkdtemp(prefix="dittune-trial-"))
        # Linux's abstract namespace: no path (a long TMPDIR cannot break it), gone with the socket
        self.path = f"\0dittune-turns-{os.getpid()}-{next(_names)}"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.listener.settimeout(0.2)
        job = dict(job, perf_dump_path=str(self.tmp / "perf.json"), turns=self.path)
        (self.tmp / "job.json").write_text(json.dumps(job))
        self.t0 = time.perf_counter()
        self.timeout_s = timeout_s
        self.proc = _spawn([*worker_cmd, str(self.tmp / "job.json")], self.tmp, env, subprocess.DEVNULL)
        self.conn = self.file = None

    def ready(self) -> bool:
        """Wait until the worker is warm and connected (False: it exited or ran out of time)."""
        end = time.monotonic() + self.timeout_s
        while time.monotonic() < end and self.proc.poll() is None:
            try:
                self.conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            self.conn.settimeout(self.timeout_s)
            self.file = self.conn.makefile("rb")
            return self._read() == "ready"
        return False

    def _read(self) -> str:
        try:
            return self.file.readline().decode().strip()
        except OSError:  # the timeout: the worker hangs; _wait below kills it and says so
            return ""

    def turn(self, slot_s: float) -> bool:
        try:
            self.conn.sendall(f"go {slot_s}\n".encode())
        except OSError:
            return False
        return self._read() == "slot"

    def finish(self) -> Outcome:
        if self.conn is not None:
            try:
                self.conn.sendall(b"stop\n")
            except OSError:
                pass
        try:
            return _wait(self.proc, self.tmp, self.timeout_s, None, self.t0)
        finally:
            self.close()

    def close(self) -> None:
        for s in (self.file, self.conn, self.listener):
            if s is not None:
                s.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def in_turns(jobs: Sequence[tuple[dict[str, Any], dict[str, str]]], slots: int, timeout_s: float,
             worker_cmd: Sequence[str] = WORKER_CMD, slot_s: float = SLOT_S) -> list[Outcome]:
    """Run `jobs` ((job, env) each, one process each) in turns: load and warm up one after another,
    then `slots` rounds of one slot each; an Outcome per job, in order. A worker that fails or
    hangs drops out; the others go on. Ctrl-C takes every worker down."""
    started: list[_Turn] = []
    try:
        live = []
        for job, env in jobs:
            t = _Turn(job, env, timeout_s, worker_cmd)
            started.append(t)
            if t.ready():
                live.append(t)
        for _ in range(slots):
            live = [t for t in live if t.turn(slot_s)]
        return [t.finish() for t in started]
    except BaseException:  # Ctrl-C, SIGTERM: no worker outlives the tuner
        for t in started:
            _kill_group(t.proc)
            t.close()
        raise
