"""Reads: recommendations, the latency/VRAM frontier, stored studies."""

from __future__ import annotations

import datetime as dt
import math
import shlex
import statistics
from dataclasses import dataclass, replace
from typing import Any, Callable

from sqlalchemy import func, select
from sqlalchemy.orm import defer, joinedload

from dittune.errors import DittuneError

from .models import Gpu, Study, Trial, Workload
from .session import Database
from .store import MEASURED

# The one rule that decides "best" everywhere (recommend, studies, export, the service, tune).
BEST_RULE = (
    "among the confirmed configurations (the search's single runs only where none was confirmed), the "
    "fastest measured latency; among configurations within the fastest one's noise band, "
    "the lowest peak VRAM (peaks within 1% of it count as equal), then the fewest flags changed from the "
    "defaults, then the shortest cold start"
)
# Peaks closer than this (relative) do not separate configurations: the VAE offload's 10 MiB on a
# 25.5 GiB Z-Image peak once picked a command with an extra flag over the fastest (2 x H200).
PEAK_TIE = 0.01


# Trials stored before the whole-footprint peak (no evidence in their manifest) ran with the torch
# allocator capped at the whole budget and stored its reserved peak, which leaves out the CUDA
# context and what lives outside the allocator (0.75 GiB on the H200, issue 14): against a budget
# they count with the allowance the worker now keeps free (engine.budget.DEFAULT_OUTSIDE_BYTES; db
# does not import engine, tests/db checks the two agree). Newer trials' peaks need none: NVML's
# peak is the whole footprint, and where NVML did not see the process the cap kept the allowance free.
LEGACY_PEAK_ALLOWANCE = 5 * 2**30 // 4


class UnknownStudy(DittuneError):
    pass


# Student's t, two-sided 95%, by degrees of freedom
_T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
          2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def t_975(df: int) -> float:
    """The 97.5% quantile of Student's t with df degrees of freedom (table to 30, then the
    Cornish-Fisher expansion around the normal's 1.96, within 0.001 of the exact value)."""
    if df < 1:
        raise ValueError(f"t quantile needs at least one degree of freedom, got {df}")
    if df <= len(_T_975):
        return _T_975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def fresh_band(repeats) -> float | None:
    """± relative 95% prediction interval of one more fresh run from these runs' latencies
    (Result.fresh_band says why this form). None without two runs."""
    n = len(repeats)
    if n < 2:
        return None
    spread = statistics.stdev(repeats) * math.sqrt(1 + 1.57 / n)
    return t_975(n - 1) * spread / statistics.median(repeats)


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
    stale_reasons: tuple[str, ...] = ()  # "torch 2.11.0 -> 2.13.0"
    rule: str = ""  # set by pick(): why this configuration is the best one of its group
    # evidence (the trial's manifest["evidence"]; older trials: what their columns imply)
    peak_kind: str | None = None  # "nvml_process" (whole footprint) | "torch_reserved" (allocator only)
    torch_reserved_peak_bytes: int | None = None
    repeats: tuple[float, ...] = ()  # confirmation: the latency of every repeat
    warmup_requests: int | None = None
    measured_requests: int | None = None  # the latency is one of this many requests (None: stored before)
    latency_stat: str = "median"  # which of them: "median", or "fastest" (the CPU's, engine.perf.latency_stat)
    verdict: str = ""  # confirmation: "separated" | "tied within noise" | "" (one finalist, or none)
    legacy_peak: bool = False  # stored before the whole-footprint peak: see LEGACY_PEAK_ALLOWANCE

    @property
    def budget_peak_bytes(self) -> int | None:
        """The figure a VRAM budget is compared with."""
        if self.peak_vram_bytes is None:
            return None
        return self.peak_vram_bytes + (LEGACY_PEAK_ALLOWANCE if self.legacy_peak else 0)

    @property
    def noise_band(self) -> float | None:
        """± relative: from the confirmation repeats when there were some, else the spread of the steps of one run."""
        return self.step_spread

    @property
    def fresh_band(self) -> float | None:
        """± relative: where one fresh run of this command should land, a 95% prediction interval.
        The confirmation runs are fresh processes each, so their spread is the run-to-run spread:
        Student's t (n - 1 degrees of freedom) sample standard deviations around their median,
        widened by the median's own uncertainty (x sqrt(1 + 1.57 / n)). With the few runs a
        confirmation makes, t is what keeps the band honest: two standard deviations, the large-n
        value, held a re-run of README's main job in 4 of 6 directions across three pairs of runs
        on this project's shared CPU, t in all 6 (docs/PERFORMANCE.md). None without two runs.
        Not the noise_band that ties are judged by (the uncertainty of a difference between two
        medians, with the spread pooled over the finalists): this one is this command's own runs,
        for one more run. Usually the wider; a finalist whose runs were tighter than the pool's can
        have it narrower. On a quiet GPU both are small; on a shared CPU whose two cores run the same
        process 1.5-2x apart, this one says so."""
        return fresh_band(self.repeats)

    @property
    def band_source(self) -> str:
        if self.status == "confirmed":
            return f"confirmation repeats (n={len(self.repeats)})" if self.repeats else "confirmation repeats"
        return "single run (spread of its steps)"

    @property
    def images_per_s_per_gpu(self) -> float:
        """Throughput per GPU of this configuration serving one request at a time: what tells one
        wide layout from replicas of a narrower one (FLUX.1-dev on 2 x H200: TP-2 0.220, one GPU
        0.279, so two single-GPU replicas serve more images while TP-2 answers each sooner)."""
        return 1.0 / (self.latency_s * self.num_gpus)

    @property
    def num_gpus(self) -> int:
        """GPUs the configuration ran on: the stored flags' "num-gpus" (absent before multi-GPU: 1)."""
        return int(self.flags.get("num-gpus", 1))

    @property
    def group(self) -> tuple:
        return (self.model, self.width, self.height, self.steps, self.guidance, self.gpu, self.gpu_memory_bytes,
                self.num_gpus)


def _stale_reasons(study: Study, current: dict[str, Any] | None) -> tuple[str, ...]:
    """What differs between the study's versions and `current`, e.g. ("torch 2.11.0 -> 2.13.0",)."""
    if not current:
        return ()
    stored = dict(study.versions, registry_hash=study.registry_hash)
    return tuple(f"{k} {stored[k]} -> {v}" for k, v in current.items() if v is not None and k in stored and stored[k] != v)


def _is_stale(study: Study, current: dict[str, Any] | None) -> bool:
    return bool(_stale_reasons(study, current))


def measured(
    db: Database, model: str | None = None, gpu: str | None = None, current: dict[str, Any] | None = None,
    study: str | None = None, num_gpus: int | None = None,
) -> list[Result]:
    """Measured configurations, one per (group, configuration): the latest confirmation when the
    configuration was re-measured, else its fastest measurement. Fresh results hide stale ones of
    the same group: after an upgrade, old results are shown only where nothing newer exists."""
    with db.session() as s:
        q = (
            select(Trial, Trial.manifest["evidence"])
            .join(Study).join(Workload).join(Gpu)
            .options(joinedload(Trial.study).joinedload(Study.workload), joinedload(Trial.study).joinedload(Study.gpu),
                     *(defer(c) for c in (Trial.manifest, Trial.stage_times, Trial.step_times, Trial.stderr_tail)))
            .where(Trial.status.in_(MEASURED), Trial.latency_s.is_not(None))
        )
        if model:
            q = q.where(Workload.model == model)
        if gpu:
            q = q.where(func.lower(Gpu.name).contains(gpu.lower()))
        if study:
            q = q.where(Study.name == study)
        rows = s.execute(q.order_by(Trial.id)).all()
    chosen: dict[tuple, tuple[Trial, Any]] = {}
    for t, ev in rows:
        key = (t.study_id, t.argv)
        prev = chosen.get(key)
        if prev is None:
            chosen[key] = (t, ev)
        elif t.status == "confirmed" or (prev[0].status != "confirmed" and t.latency_s < prev[0].latency_s):
            chosen[key] = (t, ev)
    results = [_result(t, _stale_reasons(t.study, current), ev) for t, ev in chosen.values()]
    if num_gpus is not None:
        results = [r for r in results if r.num_gpus == num_gpus]
    fresh_groups = {r.group for r in results if not r.stale}
    return [r for r in results if not r.stale or r.group not in fresh_groups]


def _result(t: Trial, stale: tuple[str, ...], ev: dict[str, Any] | None = None) -> Result:
    w, g = t.study.workload, t.study.gpu
    ev = ev if isinstance(ev, dict) else {}
    kind = ev.get("peak_kind") or ("torch_reserved" if t.peak_vram_bytes is not None else None)  # before NVML peaks
    return Result(
        trial_id=t.id, study=t.study.name, model=w.model, width=w.width, height=w.height, steps=w.steps,
        guidance=w.guidance, gpu=g.name, gpu_memory_bytes=g.memory_bytes, flags=dict(t.flags), argv=t.argv,
        latency_s=t.latency_s, step_median_s=t.step_median_s, step_spread=t.step_spread,
        peak_vram_bytes=t.peak_vram_bytes, cold_start_s=t.cold_start_s, status=t.status,
        measured_at=t.created_at, versions=dict(t.study.versions), registry_hash=t.study.registry_hash, stale=bool(stale),
        stale_reasons=stale, peak_kind=kind,
        torch_reserved_peak_bytes=ev.get("torch_reserved_peak_bytes", t.peak_vram_bytes if kind == "torch_reserved" else None),
        repeats=tuple(ev.get("repeats") or ()), warmup_requests=ev.get("warmup_requests"),
        measured_requests=ev.get("measured_requests"), latency_stat=ev.get("latency_stat") or "median",
        verdict=ev.get("verdict") or "",
        legacy_peak=not ev and t.peak_vram_bytes is not None,
    )


def _fits(r: Result, budget: Callable[[int], int] | None) -> bool:
    if budget is None:
        return True
    return r.peak_vram_bytes is not None and r.gpu_memory_bytes > 0 and r.budget_peak_bytes <= budget(r.gpu_memory_bytes)


def pick(rows: list[Result]) -> Result | None:
    """BEST_RULE applied to the configurations of one question (one workload, GPU kind and GPU
    count, already cut to the budget). The noise band is the fastest row's: the spread between its
    confirmation runs, or between the steps of its single run. The pick carries `rule`: which
    part of the rule chose it."""
    if not rows:
        return None
    # Confirmation re-measured the search's fastest in rounds against each other; a row it did not
    # re-measure has one run, from another minute of the machine, and is not weighed against them
    # (README's main job on a busy CPU: the defaults' one 0.039 s run of the search came within the
    # band of finalists measured at 0.038-0.046 s while the host was busier, and its fewer flags won)
    confirmed = [r for r in rows if r.status == "confirmed"]
    considered = f"{len(confirmed)} confirmed of {len(rows)} candidates" if confirmed and len(confirmed) < len(rows) \
        else f"{len(rows)} candidates"
    rows = confirmed or rows
    fastest = min(rows, key=lambda r: (r.latency_s, r.peak_vram_bytes or 0, r.trial_id))
    band = fastest.step_spread or 0.0
    close = [r for r in rows if r.latency_s <= fastest.latency_s * (1 + band)]
    low = min(r.peak_vram_bytes or 0 for r in close)
    lowest = [r for r in close if (r.peak_vram_bytes or 0) <= low * (1 + PEAK_TIE)]
    chosen = min(lowest, key=lambda r: (_changed(r.argv), r.cold_start_s if r.cold_start_s is not None else math.inf,
                                        r.latency_s, r.peak_vram_bytes or 0, r.trial_id))
    source = fastest.band_source
    if chosen is fastest:
        why = f"fastest measured ({considered})"
        if len(close) > 1:
            why += (f"; {len(close) - 1} others within its noise band ±{band:.1%} ({source}) have no lower peak VRAM "
                    "and no fewer changed flags")
    else:
        why = (f"within the noise band ±{band:.1%} ({source}) of the fastest ({fastest.latency_s:.3f} s, trial "
               f"{fastest.trial_id}; {considered}), with a lower peak VRAM, fewer changed flags or a shorter cold start")
    return replace(chosen, rule=f"{why}. Rule: {BEST_RULE}")


def _changed(argv: str) -> int:
    """Flags a command changes from the defaults. Within noise the simpler command is the answer:
    a deterministic tie-break, where a cold start measured with a warm compile cache is not (on
    the CPU, two tunes' tied finalists were told apart by 4.42 against 4.83 s)."""
    return sum(1 for tok in shlex.split(argv or "") if tok.startswith("--"))


def study_pick(rows: list[Result]) -> Result | None:
    """One answer for one study (tune's last line, `studies`): pick() per workload, GPU kind and
    GPU count, then the fastest of those picks (a study that measured several GPU counts)."""
    groups: dict[tuple, list[Result]] = {}
    for r in rows:
        groups.setdefault(r.group, []).append(r)
    picks = [p for g in groups.values() if (p := pick(g)) is not None]
    return min(picks, key=lambda r: (r.latency_s, r.trial_id)) if picks else None


def best(
    db: Database,
    model: str | None,
    gpu: str | None = None,
    budget: Callable[[int], int] | None = None,
    current: dict[str, Any] | None = None,
    num_gpus: int | None = None,
    study: str | None = None,
) -> list[Result]:
    """THE answer to "best for (model, workload, GPU kind, GPU count, budget)": one pick() per
    workload, GPU kind and GPU count among the measured configurations whose peak VRAM fits the
    budget. `budget` maps a GPU's memory size to the budget in bytes (so "50%" means half of each
    card). num_gpus=None answers for every GPU count measured (one row each); `study` restricts
    to one study's trials."""
    groups: dict[tuple, list[Result]] = {}
    for r in measured(db, model, gpu, current, study=study, num_gpus=num_gpus):
        if _fits(r, budget):
            groups.setdefault(r.group, []).append(r)
    return [p for key in sorted(groups) if (p := pick(groups[key])) is not None]


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
    num_gpus: int | None = None,
) -> list[Result]:
    """Pareto front of (latency, peak VRAM) per GPU and workload, fastest first: every row is the
    fastest configuration for budgets between its peak and the next row's."""
    groups: dict[tuple, list[Result]] = {}
    for r in measured(db, model, gpu, current, num_gpus=num_gpus):
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
    guidance: float
    gpu: str
    gpu_memory_bytes: int
    budget_bytes: int
    objective: str
    trials: int
    measured: int
    best_latency_s: float | None  # the pick() of the study's measured trials within its budget
    best: Result | None
    created_at: dt.datetime
    stale: bool
    stale_reasons: tuple[str, ...]
    versions: dict[str, Any]
    registry_hash: str
    allow_lossy: bool


def studies(db: Database, current: dict[str, Any] | None = None, name: str | None = None) -> list[StudySummary]:
    """Stored studies, oldest first, each with its best configuration by BEST_RULE (one row per
    GPU count when a study measured several: the summary shows the fastest of those picks)."""
    q = select(Study).options(joinedload(Study.workload), joinedload(Study.gpu), joinedload(Study.trials))
    if name is not None:
        q = q.where(Study.name == name)
    with db.session() as s:
        rows = s.scalars(q.order_by(Study.created_at, Study.id)).unique().all()
    # Every study keeps its own results here, stale or not (measured() without `current`).
    by_study: dict[str, list[Result]] = {}
    for r in (measured(db, study=name) if rows else []):
        by_study.setdefault(r.study, []).append(r)
    out = []
    for st in rows:
        cap = st.budget_bytes
        fits = [r for r in by_study.get(st.name, []) if not cap or r.peak_vram_bytes is None or r.budget_peak_bytes <= cap]
        top = study_pick(fits)
        reasons = _stale_reasons(st, current)
        out.append(StudySummary(
            name=st.name, model=st.workload.model, width=st.workload.width, height=st.workload.height,
            steps=st.workload.steps, guidance=st.workload.guidance, gpu=st.gpu.name, gpu_memory_bytes=st.gpu.memory_bytes,
            budget_bytes=st.budget_bytes, objective=st.objective, trials=len(st.trials),
            measured=sum(1 for t in st.trials if t.status in MEASURED and t.latency_s is not None),
            best_latency_s=top.latency_s if top else None, best=top, created_at=st.created_at, stale=bool(reasons),
            stale_reasons=reasons, versions=dict(st.versions), registry_hash=st.registry_hash, allow_lossy=st.allow_lossy,
        ))
    return out


def study(db: Database, name: str, current: dict[str, Any] | None = None) -> StudySummary:
    found = studies(db, current, name=name)
    if not found:
        raise UnknownStudy(f"no study named {name!r}; `dittune studies` lists them")
    return found[0]


def trials(db: Database, study_id: int | None = None, study_name: str | None = None) -> list[Trial]:
    """All trial rows of one study, oldest first (detached; read their columns only)."""
    q = select(Trial).order_by(Trial.id)
    if study_id is not None:
        q = q.where(Trial.study_id == study_id)
    if study_name is not None:
        q = q.join(Study).where(Study.name == study_name)
    with db.session() as s:
        return list(s.scalars(q).all())
