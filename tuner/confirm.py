"""The end of a study: the finalists re-measured in rounds (A B C, then A B C again; on the CPU
every round's finalists load side by side and measure in turns, tuner/turns.py), judged by their
ratios within each round, so that what the machine does between rounds falls on every finalist
alike; each stored with its latency and the noise band of those ratios; then the result read back
from the database (winner, frontier, memory-model pairs)."""

from __future__ import annotations

import math
import os
import statistics
from contextlib import ExitStack
from pathlib import Path

from dittune import db as D
from dittune.engine import flags as F
from dittune.engine.run import measure_window

from .leases import HOST, heartbeat
from .options import Setup, TuneOptions, TuneResult, job
from .runner import run_trial
from .state import State, record_from
from .turns import SLOT_S, in_turns


TARGET_BAND = 0.02  # a band this narrow ends the repeats even where finalists still overlap: tied within noise
MAX_ROUNDS = 4  # re-runs per finalist at most (the search's own measurement comes on top when it ran alone)
# Rounds in turns (the CPU) at least: each finalist's fastest request then comes from requests
# spread over about a minute, and its three rounds give the fresh-run band two degrees of freedom
# (Student's t 4.30, not 12.7 with two). Replayed on the tiny FLUX's 8-minute trace of one process
# (bench/cpu_drift_replay.py), runs 1-5 minutes apart reproduced within each other's band both ways in
# 90-97% of offsets with three rounds' fastest requests, at a median band of ±18-22%; with two
# rounds' medians (the eighth session's rule), 77-89% at a median band of ±131-288%.
TURNS_ROUNDS = 3


def spread(lat: list[float]) -> float | None:
    """Run-to-run standard deviation of one finalist's independent runs (each its own process),
    relative to their median. From five runs robust (1.4826 x the median absolute deviation),
    so that one disturbed run (a busy machine) does not swamp it; with three or four at least their
    sample standard deviation, since one run is a third or a quarter of the data there, the median
    absolute deviation cannot tell a disturbed run from the spread, and it reads zero when two runs
    coincide (README's main job on the CPU: 0.034, 0.053, 0.053 s read ±0.1% and "separated");
    two runs: their sample standard deviation. None for one run."""
    n = len(lat)
    if n < 2:
        return None
    med = statistics.median(lat)
    sd = statistics.stdev(lat)
    if n == 2:
        return sd / med
    robust = 1.4826 * statistics.median(abs(x - med) for x in lat)
    return (robust if n >= 5 else max(sd, robust)) / med


def pooled_spread(runs: dict[str, list[float]]) -> float | None:
    """The run-to-run spread of the machine, pooled over the finalists (weighted by their degrees
    of freedom): they ran interleaved on the same machine, and with three runs each one finalist's
    own spread is a guess (README's main job, pair H run 2: the fastest one's 0.028, 0.031, 0.033 s
    beside another's 0.034, 0.053, 0.053 s). None without a finalist of two runs."""
    parts = [(len(lat) - 1, spread(lat)) for lat in runs.values() if len(lat) >= 2]
    dof = sum(d for d, _ in parts)
    return (sum(d * s * s for d, s in parts) / dof) ** 0.5 if dof else None


def band(lat: list[float], sigma: float | None = None) -> float | None:
    """± relative noise band of the median of independent runs, the one ties are judged by: two
    standard errors of the difference between it and the median of another finalist measured as
    often, 2 x sqrt(2) x 1.2533 sigma / sqrt(n) (1.2533 sigma / sqrt(n): the median's standard
    error), so it narrows as repeats are added. sigma: the relative run-to-run spread, pooled over
    the finalists of a confirmation (pooled_spread); without it, these runs' own (spread). None for
    one run."""
    if len(lat) < 2:
        return None
    sigma = spread(lat) if sigma is None else sigma
    return 2 * 2**0.5 * 1.2533 * sigma / len(lat) ** 0.5


def paired(runs: dict[str, list[float]]) -> tuple[dict[str, list[float]], list[float]]:
    """(ratios, levels): every finalist's latency in round r divided by the round's level, the
    geometric mean of the finalists' latencies in it (runs hold one latency per round each, in
    order). A host that runs slower for a round slows every finalist of it alike and leaves the
    ratios alone: on the CPU the tiny FLUX's compile variants moved 20-40% between rounds while
    their ratios within a round held within a few percent. One finalist: its own latencies, level 1."""
    if len(runs) < 2:
        return {a: list(v) for a, v in runs.items()}, [1.0] * max((len(v) for v in runs.values()), default=0)
    n = min(len(v) for v in runs.values())
    levels = [math.exp(statistics.fmean(math.log(v[r]) for v in runs.values())) for r in range(n)]
    return {a: [v[r] / levels[r] for r in range(n)] for a, v in runs.items()}, levels


def verdict(runs: dict[str, list[float]]) -> tuple[str | None, set[str]]:
    """(verdict, tied), judged as db.pick judges ties: "separated" when no other finalist's median
    lies within the fastest one's noise band, "tied within noise" when some do and every band
    involved is within TARGET_BAND, None while undecided (one finalist: while its band is wider
    than TARGET_BAND). The bands use the spread pooled over the finalists. `tied`: the fastest and
    the finalists within its band."""
    if any(len(lat) < 2 for lat in runs.values()):
        return None, set()
    sigma = pooled_spread(runs)
    bands = {a: band(lat, sigma) for a, lat in runs.items()}
    if any(len(lat) == 2 and abs(lat[0] - lat[1]) / statistics.median(lat) > TARGET_BAND for lat in runs.values()):
        # two runs that disagree say little about how far a third would land (on the CPU two tunes
        # "separated" finalists from 2 runs each that 5 runs then found tied): measure on
        return None, set()
    med = {a: statistics.median(lat) for a, lat in runs.items()}
    lead = min(med, key=med.get)
    tied = {lead} | {a for a in runs if med[a] <= med[lead] * (1 + bands[lead])}
    if len(runs) == 1:
        return ("" if bands[lead] <= TARGET_BAND else None), set()
    if len(tied) == 1:
        return "separated", set()
    return ("tied within noise" if all(bands[a] <= TARGET_BAND for a in tied) else None), tied


def confirm(db, study_id: int, s: Setup, state: State, opt: TuneOptions, env, say, rounds: int = 1,
            pin=lambda cfg: {}) -> None:
    """Finalists re-run in rounds (in turns on the CPU, `_in_turns`) until the fastest one's noise
    band separates it from the others, or the bands (all within TARGET_BAND) say they are tied, or
    MAX_ROUNDS; judged on their ratios within the rounds (`paired`). rounds=1: the search's
    measurement (a trial run alone) counts as the first round. rounds>1 (the search ran trials side
    by side, so its measurements may carry a neighbour's load), or turns: at least that many
    re-runs (TURNS_ROUNDS in turns), the search's measurement left out. The stored latency is the median
    ratio at the rounds' median level, its band `band()` of the ratios. `pin(cfg)`: the environment
    that puts a finalist on its GPUs (nothing else runs then)."""
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
        cfg_of = {argv: F.config_from_dict(first.flags) for argv, first, _ in leased}
        together = _in_turns(s, list(cfg_of.values()))
        rounds = max(rounds, TURNS_ROUNDS) if together else rounds  # the search's run was not in turns: not a round
        say(f"confirming the {len(leased)} fastest configurations (rounds"
            + (" of turns side by side" if together else "")
            + f" until their ratios separate them or say they are tied, at most {max(rounds, MAX_ROUNDS)})")
        runs: dict[str, list[D.TrialRecord]] = {argv: [] for argv, _, _ in leased}
        lat: dict[str, list[float]] = {argv: ([first.latency_s] if rounds == 1 else []) for argv, first, _ in leased}
        failed: set[str] = set()
        outcome, tied, r = None, set(), 0
        while r < max(rounds, MAX_ROUNDS):
            todo = [argv for argv, _, _ in leased if argv not in failed]
            cfgs = [cfg_of[argv] for argv in todo]
            if together:
                slots = max(1, round(measure_window(s.device) / SLOT_S))
                outs = in_turns([(job(s, cfg, seed=1 + r), {**env, **pin(cfg)}) for cfg in cfgs], slots,
                                s.trial_timeout_s, opt.worker_cmd)
            else:
                outs = [run_trial(job(s, cfg, seed=1 + r), s.trial_timeout_s, opt.worker_cmd, {**env, **pin(cfg)})
                        for cfg in cfgs]
            for argv, cfg, out in zip(todo, cfgs, outs):
                rec = record_from(out, cfg, argv, None, s, None)
                if rec.status != "complete":
                    say(f"confirmation of {argv or '(defaults)'} failed: {rec.reason[:160]}")
                    failed.add(argv)
                    continue
                runs[argv].append(rec)
                lat[argv].append(rec.latency_s)
            r += 1
            live = {a: v for a, v in lat.items() if a not in failed}
            ratios, levels = paired(live)
            if not live:
                break
            outcome, tied = verdict(ratios)
            if r >= rounds and outcome is not None:
                break
        if outcome is None and len(live) > 1:  # the cap: what still overlaps is tied at the band reached
            _, tied = verdict(ratios)
            outcome = "tied within noise" if len(tied) > 1 else "separated"
        sigma = pooled_spread(ratios)
        level = statistics.median(levels) if levels else None
        for argv, first, lease in leased:
            got = runs[argv]
            if argv in failed or not got:
                continue
            rec = got[-1]
            rec.latency_s = statistics.median(ratios[argv]) * level  # its median ratio at the median round's level
            rec.step_spread = band(ratios[argv], sigma)
            rec.status = "confirmed"
            peaks = [p for p in (first.peak_vram_bytes, *(x.peak_vram_bytes for x in got)) if p is not None]
            rec.peak_vram_bytes = max(peaks) if peaks else None
            reserved = [x.manifest.get("evidence", {}).get("torch_reserved_peak_bytes") for x in got]
            rec.manifest["evidence"] = {
                **rec.manifest.get("evidence", {}), "band_source": "confirmation repeats", "repeats": lat[argv],
                "ratios": ratios[argv], "in_turns": together,
                "band": "2 standard errors of the difference between the median of its ratios to each round's "
                        "geometric mean and another finalist's, the ratios' spread pooled over the finalists",
                "verdict": (outcome if argv in tied or outcome == "separated" else "separated") if len(live) > 1 else "",
                "torch_reserved_peak_bytes": max([v for v in reserved if v is not None], default=None),
            }
            if D.leases.finish(db, lease, study_id, rec):  # False: its lease expired; whoever took it over records it
                say(f"confirmed {argv or '(defaults)'}: {' then '.join(f'{x:.3f} s' for x in lat[argv])}, "
                    f"{rec.latency_s:.3f} s ±{rec.step_spread or 0:.1%}" + (f", {rec.manifest['evidence']['verdict']}"
                                                        if rec.manifest['evidence']['verdict'] else ""))


def _in_turns(s: Setup, cfgs) -> bool:
    """Finalists load side by side and measure in turns (tuner/turns.py) on the CPU, where the host's
    load moves between seconds, when each runs as one process and host memory holds them all. On a
    GPU they run one after another (each alone on its GPUs, its memory its own; a GPU's latency
    repeats within 1-2% between rounds)."""
    if s.device != "cpu" or any(int(getattr(c, "num_gpus", 1) or 1) > 1 for c in cfgs):
        return False
    try:
        import torch

        from dittune.engine.checks import available_host_bytes, weights_bytes
        from dittune.engine.checkpoint import resolve

        family = resolve(None, Path(s.checkpoint["path"]), None) if s.checkpoint else resolve(s.spec.name, None, None)
        have = available_host_bytes()
        return have is None or 2 * weights_bytes(family, torch.float32) * len(cfgs) <= have
    except Exception:  # noqa: BLE001  (a family that cannot be sized: one after another, as on a GPU)
        return False


def result(db, name: str, state: State, stopped: str, s: Setup) -> TuneResult:
    rows = [r for r in D.measured(db, s.spec.name, None) if r.study == name]
    fits = [r for r in rows if s.budget_bytes is None or (r.budget_peak_bytes or 0) <= s.budget_bytes]
    winner = None
    band = None
    if fits:  # the one rule that recommend, export, studies and the service apply (db.pick), as `studies` applies it
        winner = D.study_pick(fits)
        band = winner.noise_band
    frontier = D.pareto(rows)
    pairs = [(t.predicted_vram_bytes, t.peak_vram_bytes) for t in D.trials(db, study_name=name)
             if t.predicted_vram_bytes and t.peak_vram_bytes and t.status == "complete"]
    return TuneResult(name, db.url, state.measured, frontier, winner, band, stopped, s.budget_bytes, pairs)
