"""Tune jobs queued through the service: each runs `dittune tune` in its own process (session),
so it survives a client that disconnects and a service that restarts. A job is a JSON record,
its log and its exit status, as files in the jobs directory next to the database; a restarted
service reads them back and reports each job as it ended (finished, failed, stopped,
interrupted), or as still running when its process is alive. One job runs at a time per lane
(a GPU index, or the CPU), so two studies never measure on the same device at once."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from dittune.errors import DittuneError

ENDED = ("finished", "failed", "stopped", "interrupted")
_TRIAL = re.compile(r"^trial (\d+): (\d+(?:\.\d+)?) s, peak [^:]*: (.*)$")
_STUDY = re.compile(r"^study (\S+): (\d+) measured trials; stopped: (.*)$")
_RESUMED = re.compile(r"^resuming study (\S+): (\d+) trials measured")


class UnknownJob(DittuneError):
    pass


def jobs_dir_for(db_url: str) -> Path:
    """Next to a SQLite database; under the XDG data dir for a server database."""
    u = make_url(db_url)
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        return Path(u.database).resolve().parent / "dittune-jobs"
    data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data / "dittune" / "jobs"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class JobRunner:
    def __init__(self, directory: Path, db_url: str, command: list[str] | None = None):
        """`command` runs `dittune` (default: this Python's `-m dittune`); tests put a driver there."""
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db_url = db_url
        self.command = command or [sys.executable, "-m", "dittune"]
        self._lock = threading.RLock()
        self._jobs: dict[str, dict[str, Any]] = {}
        self._closed = False
        for p in sorted(self.dir.glob("*.json")):
            try:
                rec = json.loads(p.read_text())
            except (OSError, ValueError):
                continue  # a torn write of a record never finished: nothing was started from it
            self._jobs[rec["id"]] = rec
        for rec in self._jobs.values():
            if rec["state"] == "running":
                self._adopt(rec)
        self._pump()

    # -- records ------------------------------------------------------------------------------
    def _path(self, job_id: str, ext: str) -> Path:
        return self.dir / f"{job_id}.{ext}"

    def _save(self, rec: dict[str, Any]) -> None:
        tmp = self._path(rec["id"], "json.tmp")
        tmp.write_text(json.dumps(rec, indent=1))
        os.replace(tmp, self._path(rec["id"], "json"))

    def submit(self, request: dict[str, Any], argv: list[str], lane: str, trials: int) -> dict[str, Any]:
        """Queue `dittune tune` with `argv` (everything after `dittune`) on this runner's database."""
        rec = {
            "id": uuid.uuid4().hex[:12], "state": "queued", "request": request, "argv": argv, "lane": lane,
            "trials_target": trials, "created_at": _now(), "started_at": None, "ended_at": None, "pid": None,
            "returncode": None, "stop_requested": False, "note": "", "seq": time.time_ns(),
        }
        with self._lock:
            self._jobs[rec["id"]] = rec
            self._save(rec)
            self._pump()
        return self.view(rec["id"])

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            ids = sorted(self._jobs, key=lambda i: self._jobs[i].get("seq", 0))
        return [self.view(i) for i in ids]

    def stop(self, job_id: str) -> dict[str, Any]:
        """SIGTERM to a running job (tune keeps every measured trial); a queued job never starts."""
        with self._lock:
            rec = self._get(job_id)
            if rec["state"] == "queued":
                rec.update(state="stopped", ended_at=_now(), stop_requested=True, note="stopped before it started")
                self._save(rec)
            elif rec["state"] == "running" and not rec["stop_requested"]:
                rec["stop_requested"] = True
                self._save(rec)
                try:
                    os.kill(rec["pid"], signal.SIGTERM)
                except ProcessLookupError:
                    pass
        return self.view(job_id)

    def _get(self, job_id: str) -> dict[str, Any]:
        rec = self._jobs.get(job_id)
        if rec is None:
            raise UnknownJob(f"no job {job_id!r}; GET /v1/jobs lists them")
        return rec

    # -- processes ----------------------------------------------------------------------------
    def _pump(self) -> None:
        """Start the oldest queued job of every idle lane."""
        with self._lock:
            if self._closed:
                return
            busy = {r["lane"] for r in self._jobs.values() if r["state"] == "running"}
            for rec in sorted(self._jobs.values(), key=lambda r: r.get("seq", 0)):
                if rec["state"] == "queued" and rec["lane"] not in busy:
                    self._start(rec)
                    busy.add(rec["lane"])

    def _start(self, rec: dict[str, Any]) -> None:
        cmd = [sys.executable, "-m", "dittune.service.jobchild", str(self._path(rec["id"], "rc")), *self.command,
               *rec["argv"]]
        env = dict(os.environ, PYTHONUNBUFFERED="1", DITTUNE_JOB=rec["id"], DITTUNE_DB=self.db_url)
        with open(self._path(rec["id"], "log"), "ab") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        rec.update(state="running", started_at=_now(), pid=proc.pid)
        self._save(rec)
        threading.Thread(target=self._wait, args=(rec, proc), daemon=True).start()

    def _adopt(self, rec: dict[str, Any]) -> None:
        """A job that was running when the service stopped: still alive, or ended meanwhile."""
        if self._path(rec["id"], "rc").exists():
            self._finish(rec)
        elif _alive(rec["pid"], rec["id"]):
            rec["note"] = "adopted after a service restart"
            threading.Thread(target=self._wait, args=(rec, None), daemon=True).start()
        else:
            rec.update(state="interrupted", ended_at=_now(),
                       note="its process ended while the service was down, without an exit status")
            self._save(rec)

    def _wait(self, rec: dict[str, Any], proc: subprocess.Popen | None) -> None:
        if proc is not None:
            proc.wait()
        else:
            while _alive(rec["pid"], rec["id"]):
                time.sleep(0.5)
        with self._lock:
            if self._closed:  # the next service adopts it from the files
                return
            self._finish(rec)
            self._pump()

    def close(self) -> None:
        """The service stops: running jobs go on in their own sessions; this runner records and
        starts nothing more (a restarted service reads the jobs back)."""
        with self._lock:
            self._closed = True

    def _finish(self, rec: dict[str, Any]) -> None:
        try:
            rc = int(self._path(rec["id"], "rc").read_text())
        except (OSError, ValueError):
            rc = None
        if rec["stop_requested"]:
            state = "stopped"
        elif rc == 0:
            state = "finished"
        elif rc in (130, 143, -2, -15) or rc is None:
            state = "interrupted"
        else:
            state = "failed"
        rec.update(state=state, returncode=rc, ended_at=_now())
        self._save(rec)

    # -- what a client sees -------------------------------------------------------------------
    def view(self, job_id: str) -> dict[str, Any]:
        with self._lock:
            rec = dict(self._get(job_id))
        log = self.log_text(job_id)
        progress = parse_log(log)
        done = progress["trials_done"]
        eta = None
        if rec["state"] == "running" and done and rec["started_at"]:
            elapsed = (dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(rec["started_at"])).total_seconds()
            eta = max(elapsed / done * (rec["trials_target"] - done), 0.0)
        error = progress.pop("error")
        rec.update(progress, eta_s=eta, log_tail=log.splitlines()[-12:])
        if rec["state"] == "failed":
            rec["note"] = error or f"dittune tune exited with status {rec['returncode']}"
        rec["resumable"] = rec["state"] in ("stopped", "interrupted", "failed") and done > 0
        if rec["resumable"]:
            rec["resume"] = "POST the same request to /v1/tune again: the study continues from its measured trials"
        return rec

    def log_text(self, job_id: str) -> str:
        try:
            return self._path(job_id, "log").read_text(errors="replace")
        except OSError:
            return ""


def parse_log(text: str) -> dict[str, Any]:
    """Progress from tune's own log lines (non-interactive output): trials measured, best so far,
    and, once it ended, the study name and why it stopped."""
    done, best, study, stopped, error = 0, None, None, None, None
    for line in text.splitlines():
        m = _TRIAL.match(line)
        if m:
            done += 1
            lat = float(m.group(2))
            if best is None or lat < best["latency_s"]:
                best = {"latency_s": lat, "trial": int(m.group(1)), "flags": m.group(3)}
        elif (m := _RESUMED.match(line)) is not None:  # a rerun: the study's earlier trials count too
            done += int(m.group(2))
        elif (m := _STUDY.match(line)) is not None:
            study, stopped = m.group(1), m.group(3)
        elif line.startswith("error: "):
            error = line[len("error: "):]
    return {"trials_done": done, "best_so_far": best, "study": study, "stopped": stopped, "error": error}


def _alive(pid: int | None, job_id: str) -> bool:
    """The job's own wrapper process is alive (not just any process that reused the pid)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return "dittune.service.jobchild" in cmdline and job_id in cmdline
