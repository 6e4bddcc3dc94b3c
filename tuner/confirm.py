"""The end of a study: the finalists re-measured alone and interleaved (A B C, then A B C again:
drift in the machine hits every finalist alike), each stored with its median latency and the
noise band between its runs; then the result read back from the database (winner, frontier,
memory-model pairs)."""

from __future__ import annotations

import os
import statistics
from contextlib import ExitStack

from dittune import db as D
from dittune.engine import flags as F

from .leases import HOST, heartbeat
from .options import Setup, TuneOptions, TuneResult, job
from .runner import run_trial
from .state import State, record_from


def confirm(db, study_id: int, s: Setup, state: State, opt: TuneOptions, env, say, rounds: int = 1,
            pin=lambda cfg: {}) -> None:
    """rounds=1: one re-run each, the band between it and the search's measurement (a trial run
    alone). rounds>1 (the search ran trials side by side, so its measurements may carry a
    neighbour's load): that many interleaved re-runs, the search's measurement left out.
    `pin(cfg)`: the environment that puts a finalist on its GPUs (nothing else runs then)."""
    fits = [(argv, r) for argv, r in state.tried.items() if r.status == "complete"
            and (s.budget_bytes is None or (r.peak_vram_bytes or 0) <= s.budget_bytes)]
    finalists = sorted(fits, key=lambda x: x[1].latency_s)[: opt.confirm]
    confirmed = {t.argv for t in D.trials(db, study_id=study_id) if t.status == "confirmed"}
    finalists = [(argv, r) for argv, r in finalists if argv not in confirmed]  # a rerun does not redo them
    if not finalists:
        return
    with ExitStack() as stack:
        leased = []
        for argv, first in finalists:
            lease = D.leases.acquire(db, study_id, "confirm", argv, HOST, os.getpid())
            if lease is None:  # another process confirms it (or has)
                continue
            stack.callback(D.leases.finish, db, lease, study_id, None)  # released unless recorded below
            stack.enter_context(heartbeat(db, lease, opt.lease_ttl_s))
            leased.append((argv, first, lease))
        if not leased:
            return
        say(f"confirming the {len(leased)} fastest configurations" + (f", {rounds} rounds" if rounds > 1 else ""))
        runs: dict[str, list[D.TrialRecord]] = {argv: [] for argv, _, _ in leased}
        for r in range(rounds):
            for argv, first, _ in leased:
                cfg = F.config_from_dict(first.flags)
                outcome = run_trial(job(s, cfg, seed=1 + r), s.trial_timeout_s, opt.worker_cmd, {**env, **pin(cfg)})
                rec = record_from(outcome, cfg, argv, None, s, None)
                if rec.status != "complete":
                    say(f"confirmation of {argv or '(defaults)'} failed: {rec.reason[:160]}")
                    continue
                runs[argv].append(rec)
        for argv, first, lease in leased:
            got = runs[argv]
            if len(got) < rounds:
                continue
            lat = ([first.latency_s] if rounds == 1 else []) + [x.latency_s for x in got]
            rec = got[-1]
            med = statistics.median(lat)
            rec.latency_s = med
            rec.step_spread = (max(lat) - min(lat)) / med  # the noise band between independent runs
            rec.status = "confirmed"
            peaks = [p for p in (first.peak_vram_bytes, *(x.peak_vram_bytes for x in got)) if p is not None]
            rec.peak_vram_bytes = max(peaks) if peaks else None
            if D.leases.finish(db, lease, study_id, rec):  # False: its lease expired; whoever took it over records it
                say(f"confirmed {argv or '(defaults)'}: {' then '.join(f'{x:.3f} s' for x in lat)}")
def result(db, name: str, state: State, stopped: str, s: Setup) -> TuneResult:
    rows = [r for r in D.measured(db, s.spec.name, None) if r.study == name]
    fits = [r for r in rows if s.budget_bytes is None or (r.peak_vram_bytes or 0) <= s.budget_bytes]
    winner = None
    band = None
    if fits:  # the one rule that recommend, export, studies and the service apply (db.pick)
        winner = D.pick(fits)
        band = min(fits, key=lambda r: (r.latency_s, r.peak_vram_bytes or 0, r.trial_id)).step_spread or 0.0
    frontier = D.pareto(rows)
    pairs = [(t.predicted_vram_bytes, t.peak_vram_bytes) for t in D.trials(db, study_name=name)
             if t.predicted_vram_bytes and t.peak_vram_bytes and t.status == "complete"]
    return TuneResult(name, db.url, state.measured, frontier, winner, band, stopped, s.budget_bytes, pairs)
