"""`dittune tune`: one orchestrator process owns the Optuna study (ask/tell) and is the only
database writer; every trial runs the real engine in a child process (tuner/worker.py).

The loop below reads in the order it runs; each of its jobs lives in its own module: options
(the request resolved on this machine), state (the study as the database holds it, dedupe),
seeds (seed repair), climb (the residency climb), confirm (finalists and the result)."""

from __future__ import annotations

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
    deadline = time.monotonic() + opt.timeout_s if opt.timeout_s else None
    db = D.open_db(opt.db_url, create=True)
    name = opt.study_name or _default_name(opt, s)
    versions = current_versions(s.gpu.driver or None)
    study_id = D.open_study(db, D.StudyKey(
        name=name, workload=D.WorkloadKey(s.spec.name, s.width, s.height, s.steps, float(s.guidance)), gpu=s.gpu,
        budget_bytes=s.budget_bytes or 0, registry_hash=F.registry_hash(), versions=versions, objective=opt.objective,
        allow_lossy=opt.allow_lossy,
    ))
    directions = ["minimize", "minimize"] if opt.objective == "frontier" else ["minimize"]
    sampler = optuna.samplers.TPESampler(seed=opt.seed, multivariate=True, constant_liar=True, n_startup_trials=8)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=db.url, directions=directions, sampler=sampler,
                                load_if_exists=True)
    _sweep_dead_trials(study)
    if not study.trials:
        _enqueue_seeds(study, s)

    cache = Path(tempfile.gettempdir()) / "dittune-inductor" / re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    env = {"TORCHINDUCTOR_CACHE_DIR": str(cache)}
    state = _State.load(db, study_id)
    space_size = s.space.size()
    bar = _Progress(opt.trials, progress)
    say = log or bar.log
    stopped = "trial budget reached"
    if s.budget_bytes is not None and s.free_bytes is not None and s.free_bytes < s.budget_bytes:
        say(f"warning: only {format_bytes(s.free_bytes)} of the GPU is free (other processes hold the rest), "
            f"less than the budget {format_bytes(s.budget_bytes)}: configurations near the budget will run out of memory")
    previous_term = _raise_on_sigterm()
    try:
        asks = 0
        while state.measured < opt.trials:
            if deadline is not None and time.monotonic() > deadline:
                stopped = "--timeout reached"
                break
            if len(state.tried) >= space_size:
                stopped = f"every configuration of the space ({space_size}) was tried"
                break
            if state.since_improvement >= opt.patience:
                stopped = f"no improvement > 1% in {opt.patience} measured trials"
                break
            asks += 1
            if asks > 20 * opt.trials + space_size:
                stopped = "the sampler keeps proposing configurations already tried"
                break
            climb = _next_climb(s, state) if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)) else None
            if climb is not None:
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
            predicted = None
            if s.budget_bytes is not None:
                predicted = memory.predict_peak_bytes(s.spec.name, cfg, s.width, s.height)
                why = state.known_infeasible(cfg) or (
                    f"memory model predicts {format_bytes(predicted)} > budget {format_bytes(s.budget_bytes)} + "
                    f"{memory.PRUNE_MARGIN - 1:.0%}" if memory.over_budget(predicted, s.budget_bytes) else None)
                if why:
                    rec = D.TrialRecord(status="pruned", flags=F.config_to_dict(cfg), argv=argv, optuna_number=trial.number,
                                        reason=why, predicted_vram_bytes=predicted)
                    D.record_trial(db, study_id, rec)
                    state.add(argv, rec)
                    _tell(study, trial, rec, s.budget_bytes, opt.objective)
                    say(f"trial {trial.number}: pruned ({why}): {argv or '(defaults)'}")
                    continue
            job = _job(s, cfg)
            limit = s.trial_timeout_s
            if deadline is not None and deadline - time.monotonic() < limit:  # --timeout ends the trial too
                limit = max(deadline - time.monotonic(), 1.0)
            outcome = run_trial(job, limit, opt.worker_cmd, env)
            if outcome.status == "timeout" and limit < s.trial_timeout_s:
                # cut by --timeout, not by the trial timeout: not a measurement; the rerun tries it again
                study.tell(trial, state=TrialState.FAIL)
                study.enqueue_trial(s.space.params(cfg))  # asked again by the rerun
                stopped = "--timeout reached"
                say(f"trial {trial.number}: stopped by --timeout, not recorded: {argv or '(defaults)'}")
                break
            rec = _record_from(outcome, cfg, argv, trial.number, s, predicted)
            D.record_trial(db, study_id, rec)
            state.add(argv, rec)
            _tell(study, trial, rec, s.budget_bytes, opt.objective)
            if rec.status == "complete":
                say(f"trial {trial.number}: {rec.latency_s:.3f} s, peak {format_bytes(rec.peak_vram_bytes)}: {argv or '(defaults)'}")
            else:
                say(f"trial {trial.number}: {rec.status} ({rec.reason[:160]}): {argv or '(defaults)'}")
            bar.update(state.measured, state.best_text())
    except KeyboardInterrupt:
        stopped = "interrupted (Ctrl-C or SIGTERM); everything measured is kept"
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(t.number, state=TrialState.FAIL)
    finally:
        bar.stop()
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)

    # An interrupted or timed-out run is not the end of the study: the rerun that finishes it confirms.
    if not stopped.startswith("interrupted") and stopped != "--timeout reached" and opt.confirm > 0:
        _confirm(db, study_id, s, state, opt, env, say)
    return _result(db, name, state, stopped, s)


def _sweep_dead_trials(study) -> None:
    """Trials left RUNNING by an orchestrator that died are failed and their parameters re-enqueued."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        if t.params:
            study.enqueue_trial(t.params, skip_if_exists=True)
