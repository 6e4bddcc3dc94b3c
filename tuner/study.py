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
import time
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
from .climb import residency_climb as _residency_climb  # noqa: F401 (tests)
from .confirm import confirm as _confirm, result as _result
from .options import OBJECTIVES, Setup as _Setup, TuneOptions, TuneResult, default_name as _default_name
from .options import job as _job, parse_duration, resolve
from .leases import HOST, fail_trial, heartbeat, single_tuner, sweep
from .progress import Progress as _Progress, raise_on_sigterm as _raise_on_sigterm
from .runner import run_trial
from .seeds import enqueue_seeds as _enqueue_seeds, fit_budget as _fit_budget  # noqa: F401 (tests)
from .state import State as _State, record_from as _record_from, tell as _tell
from .versions import current_versions

__all__ = ["OBJECTIVES", "TuneOptions", "TuneResult", "parse_duration", "tune", "CLIMB_MARGIN"]


def _setup(opt: TuneOptions) -> _Setup:
    """Everything that can be wrong with the request is found here, before the database is touched."""
    return resolve(opt, detect())


def tune(opt: TuneOptions, progress: bool = False, log: Callable[[str], None] | None = None) -> TuneResult:
    s = _setup(opt)
    db = D.open_db(opt.db_url, create=True)
    with single_tuner(db):
        return _tune(opt, s, db, progress, log)


def _tune(opt: TuneOptions, s: _Setup, db: D.Database, progress: bool, log) -> TuneResult:
    deadline = time.monotonic() + opt.timeout_s if opt.timeout_s else None
    name = opt.study_name or _default_name(opt, s)
    versions = current_versions(s.gpu.driver or None)
    directions = ["minimize", "minimize"] if opt.objective == "frontier" else ["minimize"]
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
    env = {"TORCHINDUCTOR_CACHE_DIR": str(cache)}
    ttl = opt.lease_ttl_s
    space_size = s.space.size()
    bar = _Progress(opt.trials, progress)
    say = log or bar.log
    sweep(db, study_id, study, ttl, say)
    if not study.trials and D.leases.claim(db, study_id, "seeds", HOST, os.getpid()):
        _enqueue_seeds(study, s)
    state = _State.load(db, study_id)
    stopped = "trial budget reached"
    if s.budget_bytes is not None and s.free_bytes is not None and s.free_bytes < s.budget_bytes:
        say(f"warning: only {format_bytes(s.free_bytes)} of the GPU is free (other processes hold the rest), "
            f"less than the budget {format_bytes(s.budget_bytes)}: configurations near the budget will run out of memory")
    previous_term = _raise_on_sigterm()
    current = None  # (trial, lease id, cfg) while this process measures one
    try:
        asks = 0
        while True:
            # The study as the database holds it: other processes (other hosts) tell it too.
            sweep(db, study_id, study, ttl, say)
            state = _State.load(db, study_id)
            running = D.leases.leases(db, study_id, "trial")
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
                time.sleep(min(ttl / 4, 1.0))  # other processes hold the rest; wait for them (or their leases to expire)
                continue
            asks += 1
            if asks > 20 * opt.trials + space_size:
                stopped = "the sampler keeps proposing configurations already tried"
                break
            climb = _next_climb(s, state) if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)) else None
            if climb is not None and shlex.join(F.config_to_argv(climb)) not in {r.argv for r in running}:
                study.enqueue_trial(s.space.params(climb), skip_if_exists=False)
            trial = study.ask()
            try:
                cfg = s.space.suggest(trial)
            except FlagError:  # a registry constraint: costs nothing, the registry refuses it anyway
                study.tell(trial, state=TrialState.PRUNED)
                continue
            argv = shlex.join(F.config_to_argv(cfg))
            prior = state.tried.get(argv)
            if prior is not None:  # measured before in this study: answer from the database
                _tell(study, trial, prior, s.budget_bytes, opt.objective)
                continue
            lease = D.leases.acquire(db, study_id, "trial", argv, HOST, os.getpid(), trial.number, s.space.params(cfg))
            if lease is None:  # recorded a moment ago, or another process measures it now
                prior = _State.load(db, study_id).tried.get(argv)
                if prior is not None:
                    _tell(study, trial, prior, s.budget_bytes, opt.objective)
                else:
                    study.tell(trial, state=TrialState.FAIL)
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
            limit = s.trial_timeout_s
            if deadline is not None and deadline - time.monotonic() < limit:  # --timeout ends the trial too
                limit = max(deadline - time.monotonic(), 1.0)
            current = (trial, lease, cfg)
            with heartbeat(db, lease, ttl):
                outcome = run_trial(_job(s, cfg), limit, opt.worker_cmd, env)
            current = None
            if outcome.status == "timeout" and limit < s.trial_timeout_s:
                # cut by --timeout, not by the trial timeout: not a measurement; the rerun tries it again
                _give_back(db, study_id, study, trial, lease, s.space.params(cfg))
                stopped = "--timeout reached"
                say(f"trial {trial.number}: stopped by --timeout, not recorded: {argv or '(defaults)'}")
                break
            rec = _record_from(outcome, cfg, argv, trial.number, s, predicted)
            if not D.leases.finish(db, lease, study_id, rec):
                fail_trial(study, trial.number)
                say(f"trial {trial.number}: its lease expired while it ran and another process asks it again; not recorded")
                continue
            state.add(argv, rec)
            _tell(study, trial, rec, s.budget_bytes, opt.objective)
            if rec.status == "complete":
                say(f"trial {trial.number}: {rec.latency_s:.3f} s, peak {format_bytes(rec.peak_vram_bytes)}: {argv or '(defaults)'}")
            else:
                say(f"trial {trial.number}: {rec.status} ({rec.reason[:160]}): {argv or '(defaults)'}")
            bar.update(state.measured, state.best_text())
    except KeyboardInterrupt:
        stopped = "interrupted (Ctrl-C or SIGTERM); everything measured is kept"
        if current is not None:  # this process's trial only: other processes' trials are theirs
            _give_back(db, study_id, study, current[0], current[1], s.space.params(current[2]))
    finally:
        bar.stop()
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)

    # An interrupted or timed-out run is not the end of the study: the rerun that finishes it confirms.
    if not stopped.startswith("interrupted") and stopped != "--timeout reached" and opt.confirm > 0:
        _wait_for_others(db, study_id, study, ttl, say, deadline)
        _confirm(db, study_id, s, _State.load(db, study_id), opt, env, say)
    return _result(db, name, _State.load(db, study_id), stopped, s)


def _give_back(db, study_id: int, study, trial, lease: int, params) -> None:
    """A trial this process stopped (Ctrl-C, --timeout): not a measurement; asked again later."""
    D.leases.finish(db, lease, study_id, None)
    fail_trial(study, trial.number)
    study.enqueue_trial(params, skip_if_exists=False)


def _wait_for_others(db, study_id: int, study, ttl: float, say, deadline) -> None:
    """Finalists are chosen once every process's last trial is in (or its lease has expired)."""
    while D.leases.leases(db, study_id, "trial"):
        if deadline is not None and time.monotonic() > deadline:
            return
        time.sleep(min(ttl / 4, 1.0))
        sweep(db, study_id, study, ttl, say)
