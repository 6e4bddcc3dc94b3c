"""`dittune tune`: one orchestrator process owns the Optuna study (ask/tell) and is the only
database writer; every trial runs the real engine in a child process (tuner/worker.py).

The loop below reads in the order it runs; each of its jobs lives in its own module: options
(the request resolved on this machine), state (the study as the database holds it, dedupe),
seeds (seed repair), climb (the residency climb), confirm (finalists and the result)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import optuna
from optuna.trial import TrialState

from dittune import db as D
from dittune.engine import flags as F
from dittune.engine.budget import format_bytes
from dittune.engine.errors import FlagError
from dittune.engine.gpu import detect

from . import memory
from .climb import CLIMB_MARGIN, allocated_peak as _allocated_peak, next_climb as _next_climb  # noqa: F401 (tests)
from .climb import dominated as _dominated, residency_climb as _residency_climb  # noqa: F401 (tests)
from .climb import resident_first as _resident_first
from .confirm import confirm as _confirm, result as _result
from .cores import steadiest_core
from .options import OBJECTIVES, Setup as _Setup, TuneOptions, TuneResult, default_name as _default_name
from .options import job as _job, parse_duration, resolve
from .leases import HOST, fail_trial, heartbeat, own, single_tuner, sweep
from .pool import GpuPool, host_bound
from .progress import Progress as _Progress, raise_on_sigterm as _raise_on_sigterm
from .progress import interrupted_by_signal as _interrupted_by_signal
from .runner import WORKER_CMD, Spares, run_trial
from .seeds import enqueue_seeds as _enqueue_seeds, fit_budget as _fit_budget  # noqa: F401 (tests)
from .state import State as _State, record_from as _record_from, tell as _tell, told as _told
from .versions import current_versions

__all__ = ["OBJECTIVES", "TuneOptions", "TuneResult", "parse_duration", "tune", "CLIMB_MARGIN"]


def _setup(opt: TuneOptions) -> _Setup:
    """Everything that can be wrong with the request is found here, before the database is touched."""
    return resolve(opt, detect())


def tune(opt: TuneOptions, progress: bool = False, log: Callable[[str], None] | None = None) -> TuneResult:
    s = _setup(opt)
    db = D.open_db(opt.db_url, create=True)
    name = opt.study_name or _default_name(opt, s)
    with single_tuner(db, name):
        return _tune(opt, s, db, name, progress, log)


@dataclass
class _Run:
    """What every trial of this run shares (the loop's thread and the threads measuring trials)."""
    opt: TuneOptions
    s: _Setup
    db: D.Database
    study: optuna.Study
    study_id: int
    env: dict[str, str]
    say: Callable[[str], None]
    pool: GpuPool | None  # None on the CPU
    deadline: float | None
    cancel: threading.Event
    cut: threading.Event  # a trial was cut by --timeout
    spares: Spares | None = None  # warm workers (None: every trial starts its process cold)
    # one trial at a time that streams the DiT from host memory (tuner/pool.py host_bound)
    host: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(1))
    parked: threading.Event = field(default_factory=threading.Event)  # a host-bound trial waits for `host`


def _tune(opt: TuneOptions, s: _Setup, db: D.Database, name: str, progress: bool, log) -> TuneResult:
    deadline = time.monotonic() + opt.timeout_s if opt.timeout_s else None
    versions = current_versions(s.gpu.driver or None) | ({"checkpoint": s.checkpoint} if s.checkpoint else {})
    directions = ["minimize", "minimize"] if opt.objective == "frontier" else ["minimize"]
    # constant liar: trials running side by side (here or in other processes) count as measured
    # at a pessimistic value, so concurrent asks spread out
    sampler = optuna.samplers.TPESampler(seed=opt.seed, multivariate=True, constant_liar=True, n_startup_trials=8)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with D.exclusive(db.engine, "dittune study"):  # other processes may be creating the same rows
        study_id = D.open_study(db, D.StudyKey(
            name=name, workload=D.WorkloadKey(s.spec.name, s.width, s.height, s.steps, float(s.guidance)), gpu=s.gpu,
            budget_bytes=s.budget_bytes or 0, registry_hash=F.registry_hash(), versions=versions, objective=opt.objective,
            allow_lossy=opt.allow_lossy,
        ))
        study = optuna.create_study(study_name=name, storage=db.url, directions=directions, sampler=sampler,
                                    load_if_exists=True)

    cache = Path(tempfile.gettempdir()) / "dittune-inductor" / re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    ttl = opt.lease_ttl_s
    space_size = s.space.size()
    bar = _Progress(opt.trials, progress)
    run = _Run(opt, s, db, study, study_id, {"TORCHINDUCTOR_CACHE_DIR": str(cache)}, log or bar.log,
               GpuPool(s.gpus, s.all_gpus) if s.gpus else None, deadline, threading.Event(), threading.Event())
    say = run.say
    sweep(db, study_id, study, ttl, say)
    if (resumed := _State.load(db, study_id).measured) > 0:
        say(f"resuming study {name}: {resumed} trials measured")
    if not study.trials and D.leases.claim(db, study_id, "seeds", HOST, os.getpid()):
        _enqueue_seeds(study, s)
    stopped = "trial budget reached"
    if s.budget_bytes is not None and s.free_bytes is not None and s.free_bytes < s.budget_bytes:
        say(f"warning: only {format_bytes(s.free_bytes)} of the GPU is free (other processes hold the rest), "
            f"less than the budget {format_bytes(s.budget_bytes)}: configurations near the budget will run out of memory")
    if s.device == "cpu":  # every measuring process on one core, the same one (tuner/cores.py)
        if os.environ.get("DITTUNE_CPUS"):
            say(f"CPU trials run on cores {os.environ['DITTUNE_CPUS']} (DITTUNE_CPUS)")
        else:
            core, means = steadiest_core()
            run.env["DITTUNE_CPUS"] = str(core)
            say(f"CPU trials run on core {core} with one thread" + (
                f" (dispatch benchmark, mean ms per core: {', '.join(f'{c}: {m * 1e3:.2f}' for c, m in means.items())})"
                if means else ""))
    side_by_side = run.pool is not None and run.pool.size > 1
    # one thread per GPU, and one for a host-bound trial waiting for the host's slot (_measure_later)
    executor = ThreadPoolExecutor(max_workers=run.pool.size + 1, thread_name_prefix="dittune-trial") if side_by_side else None
    inflight: set[Future] = set()
    previous_term = _raise_on_sigterm()
    asked: set[int] = set()  # Optuna trial numbers this process asked
    t0 = time.monotonic()
    # by default on GPUs with the engine's own worker (whose imports they save); never beside
    # measurements on the CPU, where an importing worker would take the trial's cores
    warm = opt.warm_workers if opt.warm_workers is not None else (s.device != "cpu" and tuple(opt.worker_cmd) == WORKER_CMD)
    if warm:
        run.spares = Spares(opt.worker_cmd, s.spec.name, limit=max(2, 2 * (run.pool.size if run.pool else 1)))
        for g in run.pool.gpus if run.pool is not None else (None,):  # the first trial on each GPU starts warm too
            run.spares.prime({**run.env, **_pinned(run, (g,) if g is not None else ())})
    try:
        asks = 0
        while True:
            inflight = _reap(inflight)
            # The study as the database holds it: other processes (other hosts) tell it too. Leases
            # first: a trial finishing between the two reads is then counted twice, never missed.
            sweep(db, study_id, study, ttl, say)
            running = D.leases.leases(db, study_id, "trial")
            state = _State.load(db, study_id)
            bar.update(state.measured, state.best_text())
            if run.cut.is_set():
                stopped = "--timeout reached"
                break
            if state.measured >= opt.trials:
                break
            if deadline is not None and time.monotonic() > deadline:
                stopped = "--timeout reached"
                break
            if len(state.tried) >= space_size:
                stopped = f"every configuration of the space ({space_size}) was tried"
                break
            if state.since_improvement >= opt.patience:
                stopped = f"no improvement > 1% in {opt.patience} measured trials"
                break
            if running and (state.measured + len(running) >= opt.trials or len(state.tried) + len(running) >= space_size):
                _wait(inflight, min(ttl / 4, 1.0))  # the rest is held by running trials (here or elsewhere)
                continue
            if side_by_side and run.pool.free() == 0:
                _wait(inflight, min(ttl / 4, 1.0))
                continue
            asks += 1
            if asks > 20 * opt.trials + space_size:
                stopped = "the sampler keeps proposing configurations already tried"
                break
            climb = _next_climb(s, state) if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)) else None
            if climb is not None and shlex.join(F.config_to_argv(climb)) not in {r.argv for r in running}:
                study.enqueue_trial(s.space.params(climb), skip_if_exists=False)
            trial = study.ask()
            asked.add(trial.number)
            own(trial)
            try:
                cfg = s.space.suggest(trial)
            except FlagError:  # a registry constraint: costs nothing, the registry refuses it anyway
                _told(study, trial, state=TrialState.PRUNED)
                continue
            argv = shlex.join(F.config_to_argv(cfg))
            prior = state.tried.get(argv)
            if prior is not None:  # measured before in this study: answer from the database
                _tell(study, trial, prior, s.budget_bytes, opt.objective)
                continue
            lease = D.leases.acquire(db, study_id, "trial", argv, HOST, os.getpid(), trial.number, s.space.params(cfg),
                                     limit=opt.trials)
            if lease is None:  # recorded a moment ago, another trial measures it now, or the study is full
                prior = _State.load(db, study_id).tried.get(argv)
                if prior is not None:
                    _tell(study, trial, prior, s.budget_bytes, opt.objective)
                else:
                    _told(study, trial, state=TrialState.FAIL)
                continue
            dom = _dominated(cfg, s, state, opt.objective)
            if dom is not None:  # cannot be faster than what was measured: no GPU time
                why = (f"dominated: {dom.argv or '(defaults)'} keeps more of the DiT resident within the budget "
                       f"({dom.latency_s:.3f} s)")
                D.leases.finish(db, lease, study_id, D.TrialRecord(
                    status="pruned", flags=F.config_to_dict(cfg), argv=argv, optuna_number=trial.number, reason=why))
                if s.budget_bytes is not None:
                    trial.set_constraint("vram", ((dom.peak_vram_bytes or 0) - s.budget_bytes) / 2**30)
                _told(study, trial, [dom.latency_s])  # a lower bound of its latency: the sampler moves on
                say(f"trial {trial.number}: pruned ({why}): {argv or '(defaults)'}")
                continue
            first = _resident_first(cfg, s, state, opt.objective)
            if first is not None:  # its resident sibling runs first; asked again later, it is pruned or runs
                D.leases.finish(db, lease, study_id, None)
                _told(study, trial, state=TrialState.PRUNED)
                first_argv = shlex.join(F.config_to_argv(first))
                if first_argv not in {r.argv for r in running}:
                    study.enqueue_trial(s.space.params(first), skip_if_exists=False)
                say(f"trial {trial.number}: deferred (the DiT resident is measured first: "
                    f"{first_argv or '(defaults)'}): {argv or '(defaults)'}")
                continue
            predicted = None
            if s.budget_bytes is not None:
                predicted = memory.predict_peak_bytes(s.spec.name, cfg, s.width, s.height)
                why = state.known_infeasible(cfg) or (
                    f"memory model predicts {format_bytes(predicted)} > budget {format_bytes(s.budget_bytes)} + "
                    f"{memory.PRUNE_MARGIN - 1:.0%}" if memory.over_budget(predicted, s.budget_bytes) else None)
                if why:
                    rec = D.TrialRecord(status="pruned", flags=F.config_to_dict(cfg), argv=argv, optuna_number=trial.number,
                                        reason=why, predicted_vram_bytes=predicted)
                    D.leases.finish(db, lease, study_id, rec)
                    _tell(study, trial, rec, s.budget_bytes, opt.objective)
                    say(f"trial {trial.number}: pruned ({why}): {argv or '(defaults)'}")
                    continue
            host = side_by_side and host_bound(cfg)
            slot = host and run.host.acquire(blocking=False)
            if host and not slot and not run.parked.is_set():
                # the host's slot is taken: this trial waits in a thread, the loop fills free GPUs meanwhile
                run.parked.set()
                say(f"trial {trial.number}: waits for the host's streaming slot: {argv or '(defaults)'}")
                inflight.add(executor.submit(_measure_later, run, trial, lease, cfg, argv, predicted))
                continue
            with heartbeat(db, lease, ttl):  # waiting for GPUs (a running trial's) keeps the lease alive
                while host and not slot and not run.host.acquire(timeout=0.5):
                    inflight = _reap(inflight)
                gpus = run.pool.take(_gpus_needed(cfg)) if run.pool is not None else ()
            if executor is not None:
                inflight.add(executor.submit(_measure, run, trial, lease, cfg, argv, predicted, gpus, host))
            else:
                _measure(run, trial, lease, cfg, argv, predicted, gpus, host)
    except BaseException as e:
        if not _interrupted_by_signal(e):
            raise
        stopped = "interrupted (Ctrl-C or SIGTERM); everything measured is kept"
        run.cancel.set()  # trials side by side give their configurations back themselves
        for f in inflight:
            f.result()
        inflight = set()
        _give_back_mine(db, study_id, study, asked)  # this process's trials only: others' are theirs
    finally:
        for f in inflight:  # trials still running here finish (or, cancelled, give back) before the end
            f.result()
        if executor is not None:
            executor.shutdown()
        if run.spares is not None:  # confirmation runs cold workers: nothing imports beside a finalist
            run.spares.close()
        bar.stop()
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    if side_by_side:
        say(f"{run.pool.size} GPUs, trials side by side: {time.monotonic() - t0:.1f} s")

    # An interrupted or timed-out run is not the end of the study: the rerun that finishes it confirms.
    if not stopped.startswith("interrupted") and stopped != "--timeout reached" and opt.confirm > 0:
        _wait_for_others(db, study_id, study, ttl, say, deadline)
        # alone: nothing else runs now, so a finalist takes the first GPUs of the pool
        _confirm(db, study_id, s, _State.load(db, study_id), opt, run.env, say, rounds=2 if side_by_side else 1,
                 pin=lambda cfg: _pinned(run, run.pool.gpus[:_gpus_needed(cfg)] if run.pool is not None else (), cpus=False))
    return _result(db, name, _State.load(db, study_id), stopped, s)


def _gpus_needed(cfg) -> int:
    return max(1, int(getattr(cfg, "num_gpus", 1) or 1))


def _pinned(run: _Run, gpus, cpus: bool = True) -> dict[str, str]:
    return run.pool.env(gpus, cpus) if run.pool is not None and gpus else {}


def _measure(run: _Run, trial, lease: int, cfg, argv: str, predicted: int | None, gpus, host: bool = False) -> None:
    """Run one leased trial on `gpus` (given back to the pool at the end; `host`: it holds the
    host's streaming slot, given back too), record it and tell Optuna."""
    s, opt, db, study = run.s, run.opt, run.db, run.study
    try:
        limit = s.trial_timeout_s
        if run.deadline is not None and run.deadline - time.monotonic() < limit:  # --timeout ends the trial too
            limit = max(run.deadline - time.monotonic(), 1.0)
        # in a thread Ctrl-C does not reach the trial: the cancel event does (on the main thread, Ctrl-C)
        threaded = threading.current_thread() is not threading.main_thread()
        with heartbeat(db, lease, opt.lease_ttl_s):
            outcome = run_trial(_job(s, cfg), limit, opt.worker_cmd, {**run.env, **_pinned(run, gpus)},
                                cancel=run.cancel if threaded else None, spares=run.spares)
    finally:
        if run.pool is not None and gpus:
            run.pool.give(gpus)
        if host:
            run.host.release()
    if outcome.status == "cancelled":
        _give_back(db, run.study_id, study, trial, lease, s.space.params(cfg))
        return
    if outcome.status == "timeout" and limit < s.trial_timeout_s:
        # cut by --timeout, not by the trial timeout: not a measurement; the rerun tries it again
        _give_back(db, run.study_id, study, trial, lease, s.space.params(cfg))
        run.cut.set()
        run.say(f"trial {trial.number}: stopped by --timeout, not recorded: {argv or '(defaults)'}")
        return
    rec = _record_from(outcome, cfg, argv, trial.number, s, predicted)
    if not D.leases.finish(db, lease, run.study_id, rec):
        fail_trial(study, trial.number)
        run.say(f"trial {trial.number}: its lease expired while it ran and another process asks it again; not recorded")
        return
    if not _tell(study, trial, rec, s.budget_bytes, opt.objective):
        run.say(f"trial {trial.number}: another process's sweep had closed its Optuna trial; the measurement is stored")
    where = f" on GPU {','.join(str(g.index) for g in gpus)}" if run.pool is not None and run.pool.size > 1 else ""
    if rec.status == "complete":
        run.say(f"trial {trial.number}: {rec.latency_s:.3f} s, peak {format_bytes(rec.peak_vram_bytes)}{where}: "
                f"{argv or '(defaults)'}")
    else:
        run.say(f"trial {trial.number}: {rec.status} ({rec.reason[:160]}){where}: {argv or '(defaults)'}")


def _measure_later(run: _Run, trial, lease: int, cfg, argv: str, predicted: int | None) -> None:
    """A host-bound trial asked while another held the host's slot: it waits here, its lease
    beating, for the slot and then its GPUs, so that the loop goes on filling free GPUs with
    GPU-bound trials (waiting in the loop left a GPU idle the whole time)."""
    with heartbeat(run.db, lease, run.opt.lease_ttl_s):
        while not run.host.acquire(timeout=0.5):
            if run.cancel.is_set():
                break
        else:
            run.parked.clear()
            gpus = run.pool.take(_gpus_needed(cfg), stop=run.cancel)
            if gpus is not None:
                return _measure(run, trial, lease, cfg, argv, predicted, gpus, True)
            run.host.release()
    run.parked.clear()
    _give_back(run.db, run.study_id, run.study, trial, lease, run.s.space.params(cfg))


def _reap(inflight: set[Future]) -> set[Future]:
    for f in [f for f in inflight if f.done()]:
        f.result()  # a bug in a trial's thread surfaces here
    return {f for f in inflight if not f.done()}


def _wait(inflight: set[Future], timeout: float) -> None:
    if inflight:
        futures_wait(inflight, timeout=timeout, return_when=FIRST_COMPLETED)
    else:
        time.sleep(timeout)


def _give_back(db, study_id: int, study, trial, lease: int, params) -> None:
    """A trial this process stopped (Ctrl-C, --timeout): not a measurement; asked again later."""
    D.leases.finish(db, lease, study_id, None)
    fail_trial(study, trial.number)
    study.enqueue_trial(params, skip_if_exists=False)


def _give_back_mine(db, study_id: int, study, asked: set[int]) -> None:
    """After Ctrl-C: every trial this process asked and did not finish is failed and asked again
    later, wherever the interrupt landed (between ask and lease, or mid-trial)."""
    for lease in D.leases.leases(db, study_id):
        if lease.host == HOST and lease.pid == os.getpid():
            D.leases.finish(db, lease.id, study_id, None)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.number in asked:
            fail_trial(study, t.number)
            if t.params:
                study.enqueue_trial(t.params, skip_if_exists=False)


def _wait_for_others(db, study_id: int, study, ttl: float, say, deadline) -> None:
    """Finalists are chosen once every process's last trial is in (or its lease has expired)."""
    while D.leases.leases(db, study_id, "trial"):
        if deadline is not None and time.monotonic() > deadline:
            return
        time.sleep(min(ttl / 4, 1.0))
        sweep(db, study_id, study, ttl, say)
