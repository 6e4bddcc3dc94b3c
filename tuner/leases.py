"""Trial leases on the tuner's side: this process's identity (host, pid), a heartbeat thread
while a trial runs, and the sweep of leases whose holder died. Several `dittune tune` processes
share one study through these (PostgreSQL: any number of hosts); SQLite allows one tuner per
database file, refused clearly otherwise (`single_tuner`)."""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from optuna.trial import TrialState

from dittune import db as D
from dittune.db.session import _sqlite_path

from .errors import TunerError

HOST = socket.gethostname()
OWNER = "dittune_worker"  # Optuna user attribute: [host, pid] of the process that asked the trial


def own(trial) -> None:
    """Mark a just-asked trial as this process's, so that a rerun on this host after a crash
    between ask and lease sweeps it at once."""
    trial.set_user_attr(OWNER, [HOST, os.getpid()])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def expired(lease: D.leases.LeaseRow, ttl_s: float) -> bool:
    """No heartbeat within the TTL, or held by a process of this host that no longer exists (so a
    rerun after a crash resumes at once instead of waiting out the TTL)."""
    if lease.age_s > ttl_s:
        return True
    return lease.host == HOST and lease.pid != os.getpid() and not _alive(lease.pid)


def sweep(db: D.Database, study_id: int, study, ttl_s: float, say: Callable[[str], None]) -> int:
    """Expired leases are deleted by exactly one sweeper, their Optuna trial failed and their
    configuration enqueued to be asked again. Optuna trials left RUNNING with no lease (a process
    that died between ask and lease) are failed likewise once older than the TTL."""
    n = 0
    leased = set()
    for lease in D.leases.leases(db, study_id):
        if lease.optuna_number is not None:
            leased.add(lease.optuna_number)
        if not expired(lease, ttl_s) or not D.leases.take_expired(db, lease):
            continue
        n += 1
        leased.discard(lease.optuna_number)
        if lease.purpose != "trial":
            continue
        say(f"lease of {lease.host} pid {lease.pid} expired: asking {lease.argv or '(defaults)'} again")
        fail_trial(study, lease.optuna_number)
        if lease.params:
            study.enqueue_trial(lease.params, skip_if_exists=False)
    now = dt.datetime.now()  # Optuna's datetime_start is the asking process's local clock
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.number in leased or t.datetime_start is None:
            continue
        host, pid = t.user_attrs.get(OWNER, (None, None))
        dead = host == HOST and pid != os.getpid() and not _alive(pid)
        if not dead and (now - t.datetime_start).total_seconds() <= ttl_s:
            continue
        fail_trial(study, t.number)
        if t.params:
            study.enqueue_trial(t.params, skip_if_exists=True)
        n += 1
    return n


def fail_trial(study, number: int | None) -> None:
    if number is None:
        return
    try:
        study.tell(number, state=TrialState.FAIL)
    except (ValueError, RuntimeError):  # already finished (its holder told it before dying)
        pass


@contextmanager
def heartbeat(db: D.Database, lease_id: int, ttl_s: float) -> Iterator[threading.Event]:
    """Beat every TTL / 4 while the body runs; the yielded event is set if the lease was lost
    (swept by another process: this measurement will not be recorded)."""
    stop, lost = threading.Event(), threading.Event()

    def beat() -> None:
        while not stop.wait(ttl_s / 4):
            try:
                if not D.leases.heartbeat(db, lease_id):
                    lost.set()
                    return
            except Exception:  # a transient database error: the next beat retries
                continue

    t = threading.Thread(target=beat, name=f"dittune-lease-{lease_id}", daemon=True)
    t.start()
    try:
        yield lost
    finally:
        stop.set()
        t.join()


@contextmanager
def single_tuner(db: D.Database, study: str) -> Iterator[None]:
    """SQLite cannot share a study between processes safely (Optuna's ask takes a waiting trial
    with a read then a write that SQLite does not lock together), so one tuner per study and
    SQLite file: a second one is refused while the first runs (tunes of other studies may share
    the file, as the service's jobs on different GPUs do). Released when this process ends, however."""
    path = _sqlite_path(db.url)
    if path is None:
        yield
        return
    import fcntl
    import hashlib

    lock = open(f"{path}.{hashlib.sha256(study.encode()).hexdigest()[:12]}.tune-lock", "a+")
    try:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TunerError(
                f"another `dittune tune` is running study {study} on {path}; SQLite cannot share a study between "
                "processes safely: use a PostgreSQL --db (postgresql://...) for several processes"
            ) from None
        yield
    finally:
        lock.close()
