"""Leases and claims: how several tuner processes (on one host or many) share one study.

A configuration is at every moment free, leased (one process measures it; its heartbeat is
fresh) or recorded (a dittune_trial row). `acquire` inserts the lease only if no row records the
configuration yet and no other lease holds it (a unique constraint decides races); `finish`
deletes the lease and records the trial in one transaction, and records nothing when the lease
was swept meanwhile (another process may be measuring it again). Times are the database's clock,
so hosts need not agree on theirs."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.exc import IntegrityError

from .models import Claim, Lease, Trial
from .session import Database
from .store import TrialRecord, check_status


@dataclass(frozen=True)
class LeaseRow:
    id: int
    purpose: str
    argv: str
    optuna_number: int | None
    params: dict[str, Any]
    host: str
    pid: int
    heartbeat_at: dt.datetime
    age_s: float  # seconds since its last heartbeat, by the database's clock


def db_now(s) -> dt.datetime:
    now = s.scalar(select(func.now()))
    if isinstance(now, str):  # SQLite's CURRENT_TIMESTAMP, when the driver does not parse it
        now = dt.datetime.fromisoformat(now)
    if now.tzinfo is not None:
        now = now.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return now


class _Taken(Exception):
    pass


def acquire(db: Database, study_id: int, purpose: str, argv: str, host: str, pid: int,
            optuna_number: int | None = None, params: dict[str, Any] | None = None,
            limit: int | None = None) -> int | None:
    """The new lease's id, or None when the configuration is leased by another process or already
    recorded (for purpose "trial": any non-confirmation row; for "confirm": a confirmation), or
    when `limit` measured trials plus running ones are reached (the last slots of a study go to
    one process each: the count and the insert are serialised per study)."""
    try:
        with db.session() as s, s.begin():
            if limit is not None:
                if s.get_bind().dialect.name == "postgresql":
                    s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": 0x64697474 ^ study_id})
                done = s.scalar(select(func.count()).select_from(Trial).where(
                    Trial.study_id == study_id, Trial.status == "complete"))
                held = s.scalar(select(func.count()).select_from(Lease).where(
                    Lease.study_id == study_id, Lease.purpose == purpose))
                if done + held >= limit:
                    raise _Taken
            now = db_now(s)
            lease = Lease(study_id=study_id, purpose=purpose, argv=argv, optuna_number=optuna_number,
                          params=dict(params or {}), host=host, pid=pid, started_at=now, heartbeat_at=now)
            s.add(lease)
            s.flush()  # the unique constraint: a concurrent holder makes this fail (or wait, then fail)
            done = select(Trial.id).where(Trial.study_id == study_id, Trial.argv == argv)
            done = done.where(Trial.status == "confirmed") if purpose == "confirm" else done.where(Trial.status != "confirmed")
            if s.scalar(done.limit(1)) is not None:
                raise _Taken
            return lease.id
    except (IntegrityError, _Taken):
        return None


def heartbeat(db: Database, lease_id: int) -> bool:
    """False when the lease is gone (swept by another process)."""
    with db.session() as s, s.begin():
        return s.execute(update(Lease).where(Lease.id == lease_id).values(heartbeat_at=db_now(s))).rowcount == 1


def finish(db: Database, lease_id: int, study_id: int, rec: TrialRecord | None) -> bool:
    """Release the lease and record `rec` (if any) atomically. False, recording nothing, when the
    lease had been swept: the configuration belongs to whoever asks it again."""
    if rec is not None:
        check_status(rec.status)
    with db.session() as s, s.begin():
        if s.execute(delete(Lease).where(Lease.id == lease_id)).rowcount != 1:
            return False
        if rec is not None:
            s.add(Trial(study_id=study_id, **asdict(rec)))
        return True


def leases(db: Database, study_id: int, purpose: str | None = None) -> list[LeaseRow]:
    with db.session() as s:
        now = db_now(s)
        q = select(Lease).where(Lease.study_id == study_id).order_by(Lease.id)
        if purpose is not None:
            q = q.where(Lease.purpose == purpose)
        return [LeaseRow(x.id, x.purpose, x.argv, x.optuna_number, dict(x.params or {}), x.host, x.pid,
                         x.heartbeat_at, (now - x.heartbeat_at).total_seconds()) for x in s.scalars(q)]


def take_expired(db: Database, lease: LeaseRow) -> bool:
    """Delete an expired lease if nobody touched it since it was read: True for exactly one of
    several processes sweeping it at once (that one asks its configuration again)."""
    with db.session() as s, s.begin():
        return s.execute(delete(Lease).where(Lease.id == lease.id, Lease.heartbeat_at == lease.heartbeat_at)).rowcount == 1


def claim(db: Database, study_id: int, key: str, host: str, pid: int) -> bool:
    """True for the one process that claims `key` first (e.g. "seeds")."""
    try:
        with db.session() as s, s.begin():
            s.add(Claim(study_id=study_id, key=key, host=host, pid=pid))
        return True
    except IntegrityError:
        return False
