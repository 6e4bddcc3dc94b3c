"""Reads: recommendations, the latency/VRAM frontier, stored studies."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Callable

from sqlalchemy import func, select
from sqlalchemy.orm import joinedload

from .models import Gpu, Study, Trial, Workload
from .session import Database
from .store import MEASURED


@dataclass(frozen=True)
class Result:
    """One measured configuration with its evidence."""

    trial_id: int
    study: str
    model: str
    width: int
    height: int
    steps: int
    guidance: float
    gpu: str
    gpu_memory_bytes: int
    flags: dict[str, Any]
    argv: str
    latency_s: float
    step_median_s: float | None
    step_spread: float | None
    peak_vram_bytes: int | None
    cold_start_s: float | None
    status: str
    measured_at: dt.datetime
    versions: dict[str, Any]
    registry_hash: str
    stale: bool

    @property
    def group(self) -> tuple:
        return (self.model, self.width, self.height, self.steps, self.guidance, self.gpu, self.gpu_memory_bytes)


def _is_stale(study: Study, current: dict[str, Any] | None) -> bool:
    if not current:
        return False
    stored = dict(study.versions, registry_hash=study.registry_hash)
    return any(k in stored and stored[k] != v for k, v in current.items() if v is not None)


def measured(
    db: Database, model: str | None = None, gpu: str | None = None, current: dict[str, Any] | None = None
) -> list[Result]:
    """Measured configurations, one per (group, configuration): the latest confirmation when the
    configuration was re-measured, else its fastest measurement. Fresh results hide stale ones of
    the same group: after an upgrade, old results are shown only where nothing newer exists."""
    with db.session() as s:
        q = (
            select(Trial)
            .join(Study).join(Workload).join(Gpu)
            .options(joinedload(Trial.study).joinedload(Study.workload), joinedload(Trial.study).joinedload(Study.gpu))
            .where(Trial.status.in_(MEASURED), Trial.latency_s.is_not(None))
        )
        if model:
            q = q.where(Workload.model == model)
        if gpu:
            q = q.where(func.lower(Gpu.name).contains(gpu.lower()))
        rows = s.scalars(q.order_by(Trial.id)).unique().all()
    chosen: dict[tuple, Trial] = {}
    for t in rows:
        key = (t.study_id, t.argv)
        prev = chosen.get(key)
        if prev is None:
            chosen[key] = t
        elif t.status == "confirmed" or (prev.status != "confirmed" and t.latency_s < prev.latency_s):
            chosen[key] = t
    results = [_result(t, _is_stale(t.study, current)) for t in chosen.values()]
    fresh_groups = {r.group for r in results if not r.stale}
    return [r for r in results if not r.stale or r.group not in fresh_groups]


def _result(t: Trial, stale: bool) -> Result:
    w, g = t.study.workload, t.study.gpu
    return Result(
        trial_id=t.id, study=t.study.name, model=w.model, width=w.width, height=w.height, steps=w.steps,
        guidance=w.guidance, gpu=g.name, gpu_memory_bytes=g.memory_bytes, flags=dict(t.flags), argv=t.argv,
        latency_s=t.latency_s, step_median_s=t.step_median_s, step_spread=t.step_spread,
        peak_vram_bytes=t.peak_vram_bytes, cold_start_s=t.cold_start_s, status=t.status,
        measured_at=t.created_at, versions=dict(t.study.versions), registry_hash=t.study.registry_hash, stale=stale,
    )


def _fits(r: Result, budget: Callable[[int], int] | None) -> bool:
    if budget is None:
        return True
    return r.peak_vram_bytes is not None and r.gpu_memory_bytes > 0 and r.peak_vram_bytes <= budget(r.gpu_memory_bytes)


def best(
    db: Database,
    model: str,
    gpu: str | None = None,
    budget: Callable[[int], int] | None = None,
    current: dict[str, Any] | None = None,
) -> list[Result]:
    """The fastest measured configuration whose peak VRAM fits the budget, one per GPU and workload.
    `budget` maps a GPU's memory size to the budget in bytes (so "50%" means half of each card)."""
    out: dict[tuple, Result] = {}
    for r in measured(db, model, gpu, current):
        if not _fits(r, budget):
            continue
        cur = out.get(r.group)
        if cur is None or _faster(r, cur):
            out[r.group] = r
    return sorted(out.values(), key=lambda r: r.group)


def _faster(a: Result, b: Result) -> bool:
    if a.latency_s != b.latency_s:
        return a.latency_s < b.latency_s
    return (a.peak_vram_bytes or 0) < (b.peak_vram_bytes or 0)


def pareto(rows: list[Result]) -> list[Result]:
    """Rows not beaten on both latency and peak VRAM, fastest first. A missing peak (a CPU run)
    counts as 0, so a group without VRAM figures keeps only its fastest row."""
    out: list[Result] = []
    lowest = None
    for r in sorted(rows, key=lambda r: (r.latency_s, r.peak_vram_bytes or 0)):
        peak = r.peak_vram_bytes or 0
        if lowest is None or peak < lowest:
            out.append(r)
            lowest = peak
    return out


def frontier(
    db: Database,
    model: str | None = None,
    gpu: str | None = None,
    budget: Callable[[int], int] | None = None,
    current: dict[str, Any] | None = None,
) -> list[Result]:
    """Pareto front of (latency, peak VRAM) per GPU and workload, fastest first: every row is the
    fastest configuration for budgets between its peak and the next row's."""
    groups: dict[tuple, list[Result]] = {}
    for r in measured(db, model, gpu, current):
        if _fits(r, budget):
            groups.setdefault(r.group, []).append(r)
    return [r for key in sorted(groups) for r in pareto(groups[key])]


@dataclass(frozen=True)
class StudySummary:
    name: str
    model: str
    width: int
    height: int
    steps: int
    gpu: str
    budget_bytes: int
    objective: str
    trials: int
    measured: int
    best_latency_s: float | None
    created_at: dt.datetime
    stale: bool


def studies(db: Database, current: dict[str, Any] | None = None) -> list[StudySummary]:
    with db.session() as s:
        rows = s.scalars(
            select(Study).options(joinedload(Study.workload), joinedload(Study.gpu), joinedload(Study.trials))
            .order_by(Study.created_at)
        ).unique().all()
        out = []
        for st in rows:
            lat = [t.latency_s for t in st.trials if t.status in MEASURED and t.latency_s is not None]
            out.append(StudySummary(
                name=st.name, model=st.workload.model, width=st.workload.width, height=st.workload.height,
                steps=st.workload.steps, gpu=st.gpu.name, budget_bytes=st.budget_bytes, objective=st.objective,
                trials=len(st.trials), measured=len(lat), best_latency_s=min(lat) if lat else None,
                created_at=st.created_at, stale=_is_stale(st, current),
            ))
        return out


def trials(db: Database, study_id: int | None = None, study_name: str | None = None) -> list[Trial]:
    """All trial rows of one study, oldest first (detached; read their columns only)."""
    q = select(Trial).order_by(Trial.id)
    if study_id is not None:
        q = q.where(Trial.study_id == study_id)
    if study_name is not None:
        q = q.join(Study).where(Study.name == study_name)
    with db.session() as s:
        return list(s.scalars(q).all())
