"""Writes: the tuner records studies and trials only through these functions (and tests insert
rows through them too, so queries are tested on what the tuner really writes)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import select

from .models import Gpu, Study, Trial, Workload
from .session import Database, DatabaseError

MEASURED = ("complete", "confirmed")


@dataclass(frozen=True)
class GpuKey:
    name: str
    memory_bytes: int
    driver: str
    compute_capability: str
    count: int = 1


@dataclass(frozen=True)
class WorkloadKey:
    model: str
    width: int
    height: int
    steps: int
    guidance: float


@dataclass(frozen=True)
class StudyKey:
    name: str
    workload: WorkloadKey
    gpu: GpuKey
    budget_bytes: int
    registry_hash: str
    versions: dict[str, Any] = field(default_factory=dict)
    objective: str = "frontier"
    allow_lossy: bool = False


@dataclass
class TrialRecord:
    status: str
    flags: dict[str, Any]
    argv: str
    optuna_number: int | None = None
    reason: str = ""
    manifest: dict[str, Any] = field(default_factory=dict)
    stage_times: dict[str, Any] = field(default_factory=dict)
    step_times: list[float] = field(default_factory=list)
    step_median_s: float | None = None
    step_spread: float | None = None
    latency_s: float | None = None
    peak_vram_bytes: int | None = None
    predicted_vram_bytes: int | None = None
    cold_start_s: float | None = None
    stderr_tail: str = ""


_STATUSES = frozenset({*MEASURED, "pruned", "oom", "timeout", "failed"})


def _get_or_create(s, cls, **values):
    row = s.scalar(select(cls).filter_by(**values))
    if row is None:
        row = cls(**values)
        s.add(row)
        s.flush()
    return row


def open_study(db: Database, key: StudyKey) -> int:
    """Create the study row, or return the existing one after checking it is the same study."""
    with db.session() as s, s.begin():
        study = s.scalar(select(Study).where(Study.name == key.name))
        if study is not None:
            w = study.workload
            if (w.model, w.width, w.height, w.steps, w.guidance) != tuple(asdict(key.workload).values()):
                raise DatabaseError(
                    f"study {key.name!r} already exists for another workload "
                    f"({w.model} {w.width}x{w.height}, {w.steps} steps); choose another --study name"
                )
            return study.id
        workload = _get_or_create(s, Workload, **asdict(key.workload))
        gpu = _get_or_create(s, Gpu, **asdict(key.gpu))
        study = Study(
            name=key.name, workload=workload, gpu=gpu, budget_bytes=key.budget_bytes,
            registry_hash=key.registry_hash, versions=dict(key.versions), objective=key.objective,
            allow_lossy=key.allow_lossy,
        )
        s.add(study)
        s.flush()
        return study.id


def check_status(status: str) -> None:
    if status not in _STATUSES:
        raise ValueError(f"unknown trial status {status!r}")


def record_trial(db: Database, study_id: int, rec: TrialRecord) -> int:
    check_status(rec.status)
    with db.session() as s, s.begin():
        row = Trial(study_id=study_id, **asdict(rec))
        s.add(row)
        s.flush()
        return row.id


def find_measured(db: Database, study_id: int, argv: str) -> Trial | None:
    """A trial of this exact configuration already measured (or refused) in the study."""
    with db.session() as s:
        return s.scalar(
            select(Trial).where(Trial.study_id == study_id, Trial.argv == argv).order_by(Trial.id.desc())
        )
