"""`dittune tune`: one orchestrator process owns the Optuna study (ask/tell) and is the only
database writer; every trial runs the real engine in a child process (tuner/worker.py)."""

from __future__ import annotations

import hashlib
import math
import re
import shlex
import signal
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from dittune import db as D
from dittune.engine import flags as F
from dittune.engine.budget import format_bytes, parse_budget
from dittune.engine.errors import FlagError
from dittune.engine.gpu import detect
from dittune.engine.checkpoint import fingerprint, resolve
from dittune.engine.run import check_workload

from . import memory
from .checks import check_machine, check_options
from .errors import TunerError
from .presets import load_preset
from .runner import WORKER_CMD, Outcome, run_trial
from .space import Space, build_space
from .versions import current_versions

OBJECTIVES = ("frontier", "latency")


@dataclass(frozen=True)
class TuneOptions:
    model: str | None  # None: the family of model_path's model_index.json
    vram_budget: str | None = None  # default: the whole card
    trials: int = 30  # measured trials the study should hold (a rerun continues towards it)
    timeout_s: float | None = None  # wall clock for this run
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    fix: tuple[str, ...] = ()
    allow_lossy: bool = False
    db_url: str | None = None
    study_name: str | None = None
    gpu_index: int = 0
    seed: int = 0
    objective: str = "frontier"
    patience: int = 15  # stop when the best has not improved by > 1% in this many measured trials
    confirm: int = 3  # finalists re-measured at the end
    device: str | None = None  # "cpu" forces a CPU study (tiny models); default: the GPU if any
    measure_steps: int | None = None
    trial_timeout_s: float | None = None
    worker_cmd: tuple[str, ...] = WORKER_CMD
    model_path: Path | None = None  # a diffusers checkpoint: trials load its weights


@dataclass
class TuneResult:
    study: str
    db_url: str
    measured: int
    frontier: list[D.Result]
    winner: D.Result | None
    noise_band: float | None
    stopped: str  # why the loop ended
    budget_bytes: int | None
    predicted_vs_measured: list[tuple[int, int]] = field(default_factory=list)


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|)\s*", text or "")
    if not m:
        raise TunerError(f"malformed --timeout {text!r}; use e.g. 600, 600s, 10m or 1h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


@dataclass
class _Setup:
    spec: Any
    width: int
    height: int
    steps: int
    guidance: float
    measure_steps: int
    warmup: int
    trial_timeout_s: float
    device: str
    gpu: D.GpuKey
    budget_bytes: int | None
    space: Space
    seeds: tuple[dict[str, Any], ...]
    fix: dict[str, Any]
    free_bytes: int | None = None  # NVML's free memory on the GPU at start
    checkpoint: dict[str, str] | None = None  # {"path", "sha256"} of --model-path (engine.checkpoint.fingerprint)


def _setup(opt: TuneOptions) -> _Setup:
    """Everything that can be wrong with the request is found here, before the database is touched."""
    check_options(opt)
    if opt.objective not in OBJECTIVES:
        raise TunerError(f"--objective {opt.objective!r}: choose {' or '.join(OBJECTIVES)}")
    if opt.trials < 1:
        raise TunerError(f"--trials {opt.trials}: need at least one trial")
    if opt.measure_steps is not None and opt.measure_steps < 1:
        raise TunerError(f"--measure-steps {opt.measure_steps}: need at least one step")
    if opt.trial_timeout_s is not None and opt.trial_timeout_s <= 0:
        raise TunerError("--trial-timeout must be positive")
    family = resolve(opt.model, opt.model_path)
    spec = family.spec
    preset = load_preset(spec)
    width, height = opt.width or preset.width, opt.height or preset.height
    steps = opt.steps if opt.steps is not None else preset.steps
    guidance = opt.guidance if opt.guidance is not None else preset.guidance
    check_workload(spec, width, height, steps)
    measure_steps = min(opt.measure_steps or preset.measure_steps, steps)
    fix = F.parse_fix(opt.fix)

    det = detect()
    check_machine(opt, det)
    import torch

    from dittune.engine.pipeline import supported_values

    if opt.device == "cpu" or not det or not torch.cuda.is_available():
        if opt.vram_budget is not None:
            raise TunerError(f"--vram-budget needs an NVIDIA GPU ({det.reason or 'running on the CPU'})")
        device = "cpu"
        gpu = D.GpuKey("cpu", 0, "", "", 0)
        budget = free = None
    else:
        if not 0 <= opt.gpu_index < len(det.gpus):
            raise TunerError(f"--gpu {opt.gpu_index}: this machine has GPUs 0..{len(det.gpus) - 1}")
        g = det.gpus[opt.gpu_index]
        device = f"cuda:{opt.gpu_index}"
        gpu = D.GpuKey(g.name, g.total_bytes, g.driver, f"{g.compute_capability[0]}.{g.compute_capability[1]}", g.count)
        budget = parse_budget(opt.vram_budget or "100%").resolve(g.total_bytes)
        free = g.free_bytes
        if budget > g.total_bytes:
            raise TunerError(f"--vram-budget {opt.vram_budget} exceeds the card's {format_bytes(g.total_bytes)}")

    num_blocks = len(memory.footprint(spec.name).dit_block_bytes)
    space = build_space(supported_values(torch.device(device)), preset.space, fix, opt.allow_lossy, num_blocks,
                        gpu_count=max(1, gpu.count))
    ckpt = None if opt.model_path is None else {"path": str(Path(opt.model_path).resolve()), "sha256": fingerprint(opt.model_path)}
    return _Setup(spec, width, height, steps, guidance, measure_steps, preset.warmup,
                  opt.trial_timeout_s or preset.timeout_s, device, gpu, budget, space, preset.seeds, fix, free, ckpt)


def _default_name(opt: TuneOptions, s: _Setup) -> str:
    gpu = re.sub(r"[^a-z0-9]+", "-", s.gpu.name.lower()).strip("-")
    budget = "nobudget" if s.budget_bytes is None else f"{s.budget_bytes / 2**30:.0f}gib"
    extra = "-lossy" if opt.allow_lossy else ""
    fixed = "-fix-" + "-".join(f"{k}={v}" for k, v in sorted(s.fix.items())) if s.fix else ""
    # The hash covers the registry and the searched space: an Optuna study cannot change a
    # parameter's distribution, so a changed space (a preset edit, a new backend) is a new study.
    space = repr([(d.flag.name, (d.values[0], d.values[-1]) if d.ordinal else d.values) for d in s.space.dims])
    tag = hashlib.sha256((F.registry_hash() + space).encode()).hexdigest()[:8]
    ckpt = f"-ckpt{s.checkpoint['sha256'][:8]}" if s.checkpoint else ""
    return (f"{s.spec.name}{ckpt}-{s.width}x{s.height}-{s.steps}st-g{s.guidance:g}-{gpu}-{budget}-{opt.objective}{extra}"
            f"{fixed}-r{tag}")


def _record_from(outcome: Outcome, cfg, argv: str, number: int | None, s: _Setup, predicted: int | None) -> D.TrialRecord:
    rec = D.TrialRecord(status=outcome.status, flags=F.config_to_dict(cfg), argv=argv, optuna_number=number,
                        reason=outcome.reason, stderr_tail=outcome.stderr_tail if outcome.status != "complete" else "",
                        predicted_vram_bytes=predicted)
    d = outcome.dump
    if d is None:
        return rec
    st = d["stages"]
    overhead = st["denoise_s"] - sum(d["steps_s"])
    rec.manifest = {**d["manifest"], "peak_vram": d["peak_vram"], "cold_start": d["cold_start"]}  # + stage peaks, load parts
    rec.stage_times = st
    rec.step_times = d["steps_s"]
    rec.step_median_s = d["step_median_s"]
    rec.step_spread = d["step_spread"]
    # Full-request latency of the workload: its steps at the measured median.
    rec.latency_s = st["encode_s"] + st["prepare_s"] + overhead + s.steps * d["step_median_s"] + st["decode_s"]
    rec.peak_vram_bytes = d["peak_vram"]["torch_max_reserved_bytes"]
    rec.cold_start_s = d["cold_start"]["total_s"]
    return rec


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.enabled = enabled
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                              TimeRemainingColumn(), TextColumn("{task.fields[best]}"), transient=False)
            self.p.start()
            self.task = self.p.add_task("trials", total=total, best="")

    def update(self, done: int, best: str, note: str = "") -> None:
        if self.enabled:
            self.p.update(self.task, completed=done, best=f"best {best} {note}".strip())

    def log(self, msg: str) -> None:
        if self.enabled:
            self.p.console.print(msg, highlight=False)

    def stop(self) -> None:
        if self.enabled:
            self.p.stop()


def tune(opt: TuneOptions, progress: bool = False, log: Callable[[str], None] | None = None) -> TuneResult:
    s = _setup(opt)
    deadline = time.monotonic() + opt.timeout_s if opt.timeout_s else None
    db = D.open_db(opt.db_url, create=True)
    name = opt.study_name or _default_name(opt, s)
    versions = current_versions(s.gpu.driver or None) | ({"checkpoint": s.checkpoint} if s.checkpoint else {})
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


@dataclass
class _State:
    tried: dict[str, D.TrialRecord]  # argv -> latest record of that configuration in this study
    measured: int = 0
    best: float | None = None
    since_improvement: int = 0
    budget_fail: list[Any] = field(default_factory=list)  # configs that ran out of memory

    @classmethod
    def load(cls, db: D.Database, study_id: int) -> "_State":
        st = cls({})
        for t in D.trials(db, study_id=study_id):
            if t.status == "confirmed":
                continue
            st.add(t.argv, D.TrialRecord(status=t.status, flags=t.flags, argv=t.argv, latency_s=t.latency_s,
                                         peak_vram_bytes=t.peak_vram_bytes, reason=t.reason,
                                         step_spread=t.step_spread, cold_start_s=t.cold_start_s,
                                         manifest=dict(t.manifest or {})))  # its stage peaks: for the climb
        return st

    def add(self, argv: str, rec: D.TrialRecord) -> None:
        self.tried[argv] = rec
        if rec.status == "oom":
            self.budget_fail.append(F.config_from_dict(rec.flags))
        if rec.status != "complete":
            return
        self.measured += 1
        if self.best is None or rec.latency_s < self.best * 0.99:
            self.best = rec.latency_s if self.best is None else min(self.best, rec.latency_s)
            self.since_improvement = 0
        else:
            self.best = min(self.best, rec.latency_s)
            self.since_improvement += 1

    def known_infeasible(self, cfg) -> str | None:
        """Monotone rule: if k resident layers ran out of memory, k + 1 will too."""
        if not cfg.dit_layerwise_offload:
            return None
        for bad in self.budget_fail:
            if bad.dit_layerwise_offload and replace(bad, dit_resident_layers=0) == replace(cfg, dit_resident_layers=0) \
                    and cfg.dit_resident_layers >= bad.dit_resident_layers:
                return f"{bad.dit_resident_layers} resident layers already ran out of memory"
        return None

    def best_text(self) -> str:
        return f"{self.best:.3f} s" if self.best is not None else "-"


def _raise_on_sigterm():
    """SIGTERM (`timeout`, a batch system) stops the study like Ctrl-C: the running trial's child
    is killed, everything measured is kept and the frontier is still printed. Returns the handler
    to restore (None off the main thread, where signals cannot be caught)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _tell(study, trial, rec: D.TrialRecord, budget: int | None, objective: str) -> None:
    """Measured trials report (latency, peak GiB). Trials that did not fit the budget (pruned by
    the memory model, or out of memory) report as infeasible with the predicted or the budget's
    peak as the constraint value, so the sampler learns where the wall is; other failures FAIL."""
    if rec.status == "complete":
        peak = rec.peak_vram_bytes or 0
        if budget is not None:
            trial.set_constraint("vram", (peak - budget) / 2**30)
        values = [rec.latency_s, peak / 2**30] if objective == "frontier" else [rec.latency_s]
        study.tell(trial, values)
    elif budget is not None and rec.status in ("pruned", "oom"):
        peak = max(rec.predicted_vram_bytes or 0, budget + 2**30)
        trial.set_constraint("vram", (peak - budget) / 2**30)
        values = [_INFEASIBLE_LATENCY, peak / 2**30] if objective == "frontier" else [_INFEASIBLE_LATENCY]
        study.tell(trial, values)
    else:
        study.tell(trial, state=TrialState.FAIL)


_INFEASIBLE_LATENCY = 1e9  # a value Optuna accepts; constrained TPE ranks infeasible trials by violation anyway


def _sweep_dead_trials(study) -> None:
    """Trials left RUNNING by an orchestrator that died are failed and their parameters re-enqueued."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        if t.params:
            study.enqueue_trial(t.params, skip_if_exists=True)


def _enqueue_seeds(study, s: _Setup) -> None:
    """The preset's seeds, each repaired to fit the budget when the memory model says it does not:
    the sampler then starts from good feasible points instead of searching for the wall."""
    seen = set()
    for seed in s.seeds:
        try:
            cfg = F.config_from_dict({**seed, **s.fix})
        except FlagError:
            continue
        if s.budget_bytes is not None:
            cfg = _fit_budget(cfg, s)
        if cfg is None or not s.space.contains(cfg):
            continue
        key = tuple(F.config_to_argv(cfg))
        if key not in seen:
            seen.add(key)
            study.enqueue_trial(s.space.params(cfg), skip_if_exists=True)


def _fit_budget(cfg, s: _Setup):
    """`cfg`, or the closest variant predicted to fit: offload the text encoders and VAE, then
    stream the DiT keeping as many blocks resident as fit (engine.offload.resident_set: nested, so
    the memory model's peak grows with their number), then whole-DiT offload."""

    def fits(c) -> bool:
        try:
            F.validate(c)
        except FlagError:
            return False
        if not s.space.contains(c):
            return False
        return memory.predict_peak_bytes(s.spec.name, c, s.width, s.height) <= s.budget_bytes

    if fits(cfg):
        return cfg
    for extra in ({"text_encoder_cpu_offload": True}, {"text_encoder_cpu_offload": True, "vae_cpu_offload": True}):
        c = replace(cfg, **extra)
        if fits(c):
            return c
    base = replace(cfg, text_encoder_cpu_offload=True, vae_cpu_offload=True, dit_cpu_offload=False,
                   dit_layerwise_offload=True, enable_cuda_graph=False)  # graphs need a resident DiT
    if base.enable_torch_compile:
        base = replace(base, compile_scope="regional")
    residents = next((d.values for d in s.space.dims if d.flag.name == "dit-resident-layers"), (0,))
    for r in sorted(residents, reverse=True):  # monotone: the most resident layers that fit
        c = replace(base, dit_resident_layers=r)
        if fits(c):
            return c
    c = replace(cfg, text_encoder_cpu_offload=True, vae_cpu_offload=True, dit_cpu_offload=True, enable_cuda_graph=False)
    return c if fits(c) else None


CLIMB_MARGIN = 0.995  # the climb's target: allocated bytes within 99.5% of the budget


def _allocated_peak(rec: D.TrialRecord) -> int | None:
    """The largest allocated (not reserved) peak over a trial's stages. Under the engine's VRAM
    cap the caching allocator gives reserved memory back before it fails, so a capped trial's
    reserved peak says little about how much more would fit; allocated bytes do."""
    stages = ((rec.manifest or {}).get("peak_vram") or {}).get("stages") or {}
    vals = [v.get("allocated_bytes") for v in stages.values() if isinstance(v, dict)]
    vals = [v for v in vals if isinstance(v, int)]
    return max(vals) if vals else None


def _residency_climb(cfg, rec: D.TrialRecord, s: _Setup, state: "_State"):
    """After a layerwise trial fits the budget, the same configuration with the most resident
    blocks that should still fit, judged from the *measured* allocated peak plus the memory
    model's allocated difference between the two residencies (so the model's absolute error and
    its allocator-overhead guess cancel out): more resident blocks stream fewer bytes, and under a
    budget that is usually the largest win. None when there is nothing to climb."""
    if s.budget_bytes is None or not cfg.dit_layerwise_offload or not rec.peak_vram_bytes:
        return None
    if rec.peak_vram_bytes > s.budget_bytes:
        return None
    measured = _allocated_peak(rec) or int(rec.peak_vram_bytes / memory.ALLOCATOR_OVERHEAD)
    residents = next((d.values for d in s.space.dims if d.flag.name == "dit-resident-layers"), ())
    base = memory.predict_peak_bytes(s.spec.name, cfg, s.width, s.height)
    for r in sorted((r for r in residents if r > cfg.dit_resident_layers), reverse=True):
        c = replace(cfg, dit_resident_layers=r)
        if shlex.join(F.config_to_argv(c)) in state.tried or state.known_infeasible(c):
            continue
        extra = (memory.predict_peak_bytes(s.spec.name, c, s.width, s.height) - base) / memory.ALLOCATOR_OVERHEAD
        if measured + extra <= s.budget_bytes * CLIMB_MARGIN:
            return c
    return None


def _next_climb(s: _Setup, state: "_State"):
    """Under a budget, once nothing is queued (the seeds and earlier climbs have run): the
    residency climb of the *fastest* streamed configuration measured within the budget, if it has
    one left. Climbing only the fastest spends one trial where climbing every seed variant would
    spend one each (H100, FLUX under 24 GiB: four seeds climbed 43 -> 46 one after another). After
    a climb runs out of memory, the next climb from the same configuration stops below it
    (_State.known_infeasible), so the count settles on the largest that fits."""
    if s.budget_bytes is None:
        return None
    best = None
    for rec in state.tried.values():
        if rec.status != "complete" or not rec.peak_vram_bytes or rec.peak_vram_bytes > s.budget_bytes:
            continue
        cfg = F.config_from_dict(rec.flags)
        if cfg.dit_layerwise_offload and (best is None or rec.latency_s < best[0].latency_s):
            best = (rec, cfg)
    if best is None:
        return None
    return _residency_climb(best[1], best[0], s, state)


def _job(s: _Setup, cfg, seed: int = 0) -> dict[str, Any]:
    return {
        "model": s.spec.name, "width": s.width, "height": s.height, "steps": s.measure_steps, "guidance": s.guidance,
        "warmup": s.warmup, "device": s.device, "flags": F.config_to_dict(cfg), "seed": seed,
        "vram_budget": f"{s.budget_bytes}B" if s.budget_bytes is not None else None,
        "model_path": s.checkpoint["path"] if s.checkpoint else None,
    }


def _confirm(db, study_id: int, s: _Setup, state: _State, opt: TuneOptions, env, say) -> None:
    """Re-measure the finalists, interleaved, and store each one's median latency with its noise band."""
    fits = [(argv, r) for argv, r in state.tried.items() if r.status == "complete"
            and (s.budget_bytes is None or (r.peak_vram_bytes or 0) <= s.budget_bytes)]
    finalists = sorted(fits, key=lambda x: x[1].latency_s)[: opt.confirm]
    confirmed = {t.argv for t in D.trials(db, study_id=study_id) if t.status == "confirmed"}
    finalists = [(argv, r) for argv, r in finalists if argv not in confirmed]  # a rerun does not redo them
    if not finalists:
        return
    say(f"confirming the {len(finalists)} fastest configurations")
    for argv, first in finalists:
        cfg = F.config_from_dict(first.flags)
        outcome = run_trial(_job(s, cfg, seed=1), s.trial_timeout_s, opt.worker_cmd, env)
        rec = _record_from(outcome, cfg, argv, None, s, None)
        if rec.status != "complete":
            say(f"confirmation of {argv or '(defaults)'} failed: {rec.reason[:160]}")
            continue
        lat = [first.latency_s, rec.latency_s]
        med = statistics.median(lat)
        rec.latency_s = med
        rec.step_spread = (max(lat) - min(lat)) / med  # the noise band between independent runs
        rec.status = "confirmed"
        peaks = [p for p in (rec.peak_vram_bytes, first.peak_vram_bytes) if p is not None]
        rec.peak_vram_bytes = max(peaks) if peaks else None
        D.record_trial(db, study_id, rec)
        say(f"confirmed {argv or '(defaults)'}: {lat[0]:.3f} s then {lat[1]:.3f} s")


def _result(db, name: str, state: _State, stopped: str, s: _Setup) -> TuneResult:
    rows = [r for r in D.measured(db, s.spec.name, None) if r.study == name]
    fits = [r for r in rows if s.budget_bytes is None or (r.peak_vram_bytes or 0) <= s.budget_bytes]
    winner = None
    band = None
    if fits:
        fastest = min(fits, key=lambda r: r.latency_s)
        band = fastest.step_spread or 0.0
        # Within the winner's noise band, prefer less VRAM, then a shorter cold start.
        close = [r for r in fits if r.latency_s <= fastest.latency_s * (1 + band)]
        winner = min(close, key=lambda r: (r.peak_vram_bytes or 0, r.cold_start_s or math.inf, r.latency_s))
    frontier = D.pareto(rows)
    pairs = [(t.predicted_vram_bytes, t.peak_vram_bytes) for t in D.trials(db, study_name=name)
             if t.predicted_vram_bytes and t.peak_vram_bytes and t.status == "complete"]
    return TuneResult(name, db.url, state.measured, frontier, winner, band, stopped, s.budget_bytes, pairs)
