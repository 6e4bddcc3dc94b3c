"""`dittune generate` as a library call: validate the request, cap VRAM, load, warm up, run the
measured request, save the PNG and the perf dump (format: docs/PERF_DUMP.md)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Expandable segments let the caching allocator grow and shrink segments in place instead of
# keeping stage-sized blocks it cannot reuse: what the process reserves stays near what it
# allocates, so a configuration fits a smaller VRAM budget. Read when CUDA first allocates; a
# user's own setting wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

from .errors import BudgetExceededError, EngineError  # noqa: E402
from .flags import EngineConfig, validate  # noqa: E402
from .checkpoint import resolve  # noqa: E402
from .checks import check_guidance, check_host_memory, parse_device  # noqa: E402
from .perf import memory, summarize_steps, versions  # noqa: E402

PERF_DUMP_SCHEMA = 1
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class GenerateRequest:
    model: str | None = None  # None: the family of model_path's model_index.json
    prompt: str = "A photo of a cat sitting on a windowsill"
    negative_prompt: str = ""
    model_path: Path | None = None
    width: int | None = None  # None: the model's default
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0  # the noise of diffusers' pipeline with generator=torch.Generator("cpu").manual_seed(seed)
    max_sequence_length: int | None = None  # None: the model's (FLUX.1-dev 512, schnell 256)
    output: Path | None = None  # PNG
    perf_dump_path: Path | None = None
    device: str | None = None  # default: cuda if available
    dtype: str | None = None  # default: bf16 on cuda, fp32 on cpu
    warmup: int = 0  # requests before the measured one
    vram_budget: str | None = None  # caps this process (the tuner's worker sets it)
    flags: Any = field(default_factory=EngineConfig)


@dataclass
class GenerateResult:
    dump: dict[str, Any]
    image: torch.Tensor  # [1, 3, H, W] uint8

    def summary(self) -> str:
        d = self.dump
        med = d["step_median_s"]
        mem = d["peak_vram"]["torch_max_reserved_bytes"]
        parts = [
            f"{d['model']} {d['workload']['width']}x{d['workload']['height']}, {d['workload']['steps']} steps:",
            f"request {d['request_s']:.3f} s",
            f"step median {med * 1e3:.1f} ms" if med is not None else "",
            f"peak VRAM {mem / 2**30:.2f} GiB" if mem else "",
            f"cold start {d['cold_start']['total_s']:.1f} s",
        ]
        return " | ".join(p for p in parts if p)


def check_workload(spec, width: int, height: int, steps: int) -> None:
    m = spec.size_multiple
    for name, v in (("width", width), ("height", height)):
        if v <= 0 or v % m:
            raise EngineError(f"--{name} {v} must be a positive multiple of {m} for {spec.name}")
    if steps < 1:
        raise EngineError(f"--steps {steps}: need at least one denoise step")


def _resolve(req: GenerateRequest):
    family = resolve(req.model, Path(req.model_path) if req.model_path is not None else None, req.max_sequence_length)
    spec = family.spec
    width = req.width if req.width is not None else spec.width
    height = req.height if req.height is not None else spec.height
    steps = req.steps if req.steps is not None else spec.steps
    guidance = req.guidance if req.guidance is not None else spec.guidance
    check_workload(spec, width, height, steps)
    check_guidance(family, req.guidance, req.negative_prompt)
    if req.warmup < 0:
        raise EngineError(f"--warmup {req.warmup} must be >= 0")
    device = parse_device(req.device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype_name = req.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if dtype_name not in _DTYPES:
        raise EngineError(f"--dtype {dtype_name!r}: choose bf16, fp16 or fp32")
    if device.type == "cpu":
        check_host_memory(family, _DTYPES[dtype_name])
    return family, width, height, steps, guidance, device, _DTYPES[dtype_name]


def _cap_vram(budget_text: str, device: torch.device) -> int:
    from .budget import parse_budget

    total = torch.cuda.get_device_properties(device).total_memory
    budget = parse_budget(budget_text).resolve(total)
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    return budget


def generate(req: GenerateRequest, progress: bool = False) -> GenerateResult:
    from .pipeline import Pipeline

    validate(req.flags)
    family, width, height, steps, guidance, device, dtype = _resolve(req)
    budget = None
    if req.vram_budget is not None:
        if device.type != "cuda":
            raise EngineError("--vram-budget caps GPU memory; it needs a CUDA device")
        budget = _cap_vram(req.vram_budget, device)
    if req.perf_dump_path is not None:
        Path(req.perf_dump_path).parent.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    try:
        t_start = time.perf_counter()
        pipe = Pipeline(family, req.flags, device, dtype, Path(req.model_path) if req.model_path else None)
        run = lambda on_step=None: pipe(  # noqa: E731
            req.prompt, req.negative_prompt, width, height, steps, guidance, req.seed, on_step
        )
        warm = []
        for _ in range(req.warmup):
            t = time.perf_counter()
            _, wt = run()
            warm.append((time.perf_counter() - t, wt))
        t = time.perf_counter()
        if progress:
            image, times = _with_progress(run, steps)
        else:
            image, times = run()
        request_s = time.perf_counter() - t
    except torch.OutOfMemoryError as e:
        if budget is not None:
            raise BudgetExceededError(
                f"out of GPU memory under the VRAM budget {req.vram_budget} ({budget / 2**30:.2f} GiB): {str(e).splitlines()[0][:200]}"
            ) from None
        raise EngineError(f"out of GPU memory: {str(e).splitlines()[0][:200]}") from None

    first_request_s = warm[0][0] if warm else request_s
    stats = summarize_steps(times.steps)
    st = times.stages
    denoise_overhead = st["denoise_s"] - sum(times.steps)
    latency_s = st["encode_s"] + st["prepare_s"] + denoise_overhead + steps * stats["step_median_s"] + st["decode_s"]
    manifest = pipe.manifest()
    if warm:
        manifest["compile"]["first_request_denoise_s"] = warm[0][1].stages["denoise_s"]
        if req.flags.enable_torch_compile:
            manifest["compile"]["compile_s"] = max(0.0, warm[0][1].stages["denoise_s"] - st["denoise_s"])
    manifest["versions"] = versions()
    manifest["cuda_alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    manifest["vram_budget_bytes"] = budget
    dump = {
        "schema": PERF_DUMP_SCHEMA,
        "model": family.spec.name,
        "workload": {"width": width, "height": height, "steps": steps, "guidance": guidance, "seed": req.seed},
        "cold_start": {"load_s": pipe.load_s, "load_parts": dict(pipe.load_parts), "first_request_s": first_request_s,
                       "total_s": pipe.load_s + first_request_s},
        "warmup_requests": req.warmup,
        "stages": dict(st),
        "steps_s": times.steps,
        **stats,
        "request_s": request_s,
        "latency_s": latency_s,
        "peak_vram": memory(device, pipe.peaks),
        "manifest": manifest,
        "pid": os.getpid(),
        "started_at": time.time() - (time.perf_counter() - t_start),
    }
    t = time.perf_counter()
    if req.output is not None:
        save_png(image, Path(req.output))
    dump["stages"]["save_s"] = time.perf_counter() - t
    if req.perf_dump_path is not None:
        Path(req.perf_dump_path).write_text(json.dumps(dump, indent=2))
    return GenerateResult(dump, image)


def _with_progress(run, steps: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    with Progress("denoise", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), transient=True) as p:
        task = p.add_task("denoise", total=steps)
        return run(lambda i: p.update(task, completed=i + 1))


def save_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = image[0].permute(1, 2, 0).contiguous().numpy()  # [H, W, 3]
    try:
        Image.fromarray(arr).save(path, format="PNG")
    except OSError as e:
        raise EngineError(f"cannot write {path}: {e}") from None
