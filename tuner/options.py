"""What a `dittune tune` run was asked (TuneOptions), what it resolved to on this machine (Setup:
workload, device, budget, space, seeds) and what it returns (TuneResult). Everything that can be
wrong with the request is found in `resolve`, before the database is touched."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dittune import db as D
from dittune.engine import flags as F
from dittune.engine.budget import format_bytes, parse_budget
from dittune.engine.checkpoint import fingerprint, resolve as resolve_model
from dittune.engine.run import WARMUP_CAP, check_workload, measure_window

from . import memory
from .checks import check_machine, check_options
from .errors import TunerError
from .pool import choose
from .presets import load_preset
from .runner import WORKER_CMD
from .space import Space, build_space

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
    gpu_index: int | None = None  # one GPU (the older --gpu); gpus wins when both are given
    gpus: tuple[int, ...] | None = None  # the study's GPUs by NVML index; None: every visible GPU
    max_gpus_per_trial: int | None = None  # limits parallel layouts; None: as many as the study has
    seed: int = 0
    objective: str = "frontier"
    patience: int = 15  # stop when the best has not improved by > 1% in this many measured trials
    confirm: int = 3  # finalists re-measured at the end
    device: str | None = None  # "cpu" forces a CPU study (tiny models); default: the GPU if any
    measure_steps: int | None = None
    trial_timeout_s: float | None = None
    worker_cmd: tuple[str, ...] = WORKER_CMD
    model_path: Path | None = None  # a diffusers checkpoint: trials load its weights
    # trials run in warm workers (tuner/runner.py Spares); None: on for GPU studies with the engine's
    # worker, off on the CPU (a worker importing beside a measured trial would take its cores)
    warm_workers: bool | None = None
    lease_ttl_s: float = 60.0  # a trial whose process stopped beating for this long is asked again


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
class Setup:
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
    free_bytes: int | None = None  # NVML's free memory on the GPU at start (the least over the study's GPUs)
    gpus: tuple[Any, ...] = ()  # the study's GPUs (engine.gpu.GpuInfo); () on the CPU
    all_gpus: tuple[Any, ...] = ()  # every GPU of the host, as NVML lists them
    max_gpus_per_trial: int = 1
    checkpoint: dict[str, str] | None = None  # {"path", "sha256"} of --model-path (engine.checkpoint.fingerprint)


def resolve(opt: TuneOptions, det) -> Setup:
    """The request checked and resolved against `det` (engine.gpu.detect()'s answer)."""
    check_options(opt)
    if opt.objective not in OBJECTIVES:
        raise TunerError(f"--objective {opt.objective!r}: choose {' or '.join(OBJECTIVES)}")
    if opt.trials < 1:
        raise TunerError(f"--trials {opt.trials}: need at least one trial")
    if opt.measure_steps is not None and opt.measure_steps < 1:
        raise TunerError(f"--measure-steps {opt.measure_steps}: need at least one step")
    if opt.trial_timeout_s is not None and opt.trial_timeout_s <= 0:
        raise TunerError("--trial-timeout must be positive")
    if opt.max_gpus_per_trial is not None and opt.max_gpus_per_trial < 1:
        raise TunerError(f"--max-gpus-per-trial {opt.max_gpus_per_trial}: need at least one GPU")
    family = resolve_model(opt.model, opt.model_path)
    spec = family.spec
    preset = load_preset(spec)
    width, height = opt.width or preset.width, opt.height or preset.height
    steps = opt.steps if opt.steps is not None else preset.steps
    guidance = opt.guidance if opt.guidance is not None else preset.guidance
    check_workload(spec, width, height, steps)
    measure_steps = min(opt.measure_steps or preset.measure_steps, steps)
    fix = F.parse_fix(opt.fix)
    check_machine(opt, det)

    import torch

    from dittune.engine.pipeline import supported_values

    if opt.device == "cpu" or not det or not torch.cuda.is_available():
        if opt.vram_budget is not None:
            raise TunerError(f"--vram-budget needs an NVIDIA GPU ({det.reason or 'running on the CPU'})")
        device = "cpu"
        gpu = D.GpuKey("cpu", 0, "", "", 0)
        budget = free = None
        gpus: tuple = ()
    else:
        if opt.gpus is None and opt.gpu_index is not None:
            if not 0 <= opt.gpu_index < len(det.gpus):
                raise TunerError(f"--gpu {opt.gpu_index}: this machine has GPUs 0..{len(det.gpus) - 1}")
        gpus = choose(det.gpus, opt.gpus if opt.gpus is not None else
                      (opt.gpu_index,) if opt.gpu_index is not None else None)
        g = gpus[0]
        device = "cuda"  # each trial's child sees only its GPUs (pool.visible_devices); its ranks use them in order
        gpu = D.GpuKey(g.name, g.total_bytes, g.driver, f"{g.compute_capability[0]}.{g.compute_capability[1]}", g.count)
        budget = parse_budget(opt.vram_budget or "100%").resolve(g.total_bytes)
        free = min(x.free_bytes for x in gpus)
        if budget > g.total_bytes:
            raise TunerError(f"--vram-budget {opt.vram_budget} exceeds the card's {format_bytes(g.total_bytes)}")
    per_trial = min(opt.max_gpus_per_trial or max(1, len(gpus)), max(1, len(gpus)))

    num_blocks = len(memory.footprint(spec.name).dit_block_bytes)
    space = build_space(supported_values(torch.device(device)), preset.space, fix, opt.allow_lossy, num_blocks,
                        gpu_count=per_trial, check=lambda c: F.validate_for_model(c, spec, guidance))
    return Setup(spec, width, height, steps, guidance, measure_steps, preset.warmup,
                 opt.trial_timeout_s or preset.timeout_s, device, gpu, budget, space, preset.seeds, fix, free,
                 gpus, tuple(det.gpus) if det else (), per_trial, _checkpoint(opt))


def _checkpoint(opt: TuneOptions) -> dict[str, str] | None:
    if opt.model_path is None:
        return None
    return {"path": str(Path(opt.model_path).resolve()), "sha256": fingerprint(opt.model_path)}


def default_name(opt: TuneOptions, s: Setup) -> str:
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


def job(s: Setup, cfg, seed: int = 0) -> dict[str, Any]:
    """The trial worker's job file for `cfg` (tuner/worker.py reads it)."""
    return {
        "model": s.spec.name, "width": s.width, "height": s.height, "steps": s.measure_steps, "guidance": s.guidance,
        "warmup": s.warmup, "max_warmup": max(s.warmup, WARMUP_CAP), "measure_s": measure_window(s.device), "device": s.device, "flags": F.config_to_dict(cfg), "seed": seed,
        "vram_budget": f"{s.budget_bytes}B" if s.budget_bytes is not None else None,
        "model_path": s.checkpoint["path"] if s.checkpoint else None,
    }
