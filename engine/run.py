"""`dittune generate` as a library call: validate the request, cap VRAM, load, warm up, run the
measured request, save the PNG and the perf dump (format: docs/PERF_DUMP.md)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Expandable segments let the caching allocator grow and shrink segments in place instead of
# keeping stage-sized blocks it cannot reuse: what the process reserves stays near what it
# allocates, so a configuration fits a smaller VRAM budget. Read when CUDA first allocates; a
# user's own setting wins (DITTUNE_ALLOC_CONF marks ours, so that child processes can tell).
if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    os.environ["DITTUNE_ALLOC_CONF"] = "default"

import torch  # noqa: E402

from .errors import BudgetExceededError, EngineError  # noqa: E402
from .flags import EngineConfig, validate, validate_for_model  # noqa: E402
from .checkpoint import resolve  # noqa: E402
from .checks import check_guidance, check_host_memory, parse_device  # noqa: E402
from .perf import memory, summarize_steps, versions  # noqa: E402

PERF_DUMP_SCHEMA = 1
# Warm-up until two consecutive requests agree: their latencies (stages + steps x step median, the
# figure the tuner stores) within WARMUP_AGREE. A compiled configuration's first requests differ
# by several times (CPU, tiny FLUX: 1.361 s after one warm-up, 0.123 s after two), request-to-
# request noise of a warm configuration is a few percent on a busy CPU and well under 1% on the
# GPU, so 5% tells "still warming up" from noise. WARMUP_CAP bounds the cost where it never
# settles (the measured request is then the last one; the dump says it did not settle).
WARMUP_AGREE = 0.05
WARMUP_CAP = 4
# After warm-up, the measured requests: more of them until MEASURE_S seconds are measured (at most
# MEASURE_CAP), the latency their median (the tuner stores perf.latency_stat's). One request of a
# fast workload is a single draw of a noisy machine; a GPU request of a second or more is measured
# once as before. The tuner measures so (worker, re-measure command); `dittune generate` when asked.
# On the CPU the window is longer: a 3-4 s median halved the spread between fresh processes of the
# tiny FLUX (30% -> 12% relative standard deviation, docs/PERFORMANCE.md, seventh session).
MEASURE_S = 0.5
MEASURE_S_CPU = 3.0
MEASURE_CAP = 200


def measure_window(device: str) -> float:
    """The seconds of measured requests the tuner asks for on `device` ("cpu" or a GPU's)."""
    return MEASURE_S_CPU if device == "cpu" else MEASURE_S

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
    warmup: int = 0  # requests before the measured one (at least)
    max_warmup: int | None = None  # more, up to this many, until two consecutive requests agree (None: = warmup)
    measure_s: float = 0.0  # measured requests until this many seconds (at most MEASURE_CAP); 0: one
    # Or, when set, asked before every measured request (with how many ran) whether to run one: the
    # tuner's worker takes turns with other finalists' processes so (tuner/turns.py). The warm-up
    # loop's last request is then not measured: other processes may have been loading beside it.
    pace: Any = field(default=None, compare=False)
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
        nv = d["peak_vram"].get("nvml_process_peak_bytes")
        parts = [
            f"{d['model']} {d['workload']['width']}x{d['workload']['height']}, {d['workload']['steps']} steps:",
            f"request {d['request_s']:.3f} s" + (f" (median of {n} measured, fastest {d['measured']['fastest_s']:.3f} s)"
                                                 if (n := d["measured"]["requests"]) > 1 else ""),
            f"step median {med * 1e3:.1f} ms" if med is not None else "",
            f"peak VRAM {nv / 2**30:.2f} GiB (NVML, whole process)" if nv else "",
            f"torch reserved peak {mem / 2**30:.2f} GiB" if mem else "",
            f"{d['warmup_requests']} warm-up request(s)",
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


def _workload(req: GenerateRequest):
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
    if req.max_warmup is not None and req.max_warmup < req.warmup:
        raise EngineError(f"--max-warmup {req.max_warmup} must be >= --warmup {req.warmup}")
    if not req.measure_s >= 0:  # also refuses nan
        raise EngineError(f"--measure-s {req.measure_s} must be >= 0 seconds")
    validate_for_model(req.flags, spec, guidance)
    return family, width, height, steps, guidance


def _resolve(req: GenerateRequest):
    family, width, height, steps, guidance = _workload(req)
    device = parse_device(req.device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype_name = req.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if dtype_name not in _DTYPES:
        raise EngineError(f"--dtype {dtype_name!r}: choose bf16, fp16 or fp32")
    if device.type == "cpu":
        check_host_memory(family, _DTYPES[dtype_name])
    return family, width, height, steps, guidance, device, _DTYPES[dtype_name]


def _cap_vram(budget_text: str, device: torch.device, num_gpus: int) -> tuple[int, int, int | None]:
    """Cap torch's allocator so that the whole process fits the budget: the budget less what lives
    outside the allocator (engine/budget.py). Returns (budget, allowance outside, context read)."""
    from . import gpu as gpu_mod
    from .budget import allocator_cap, outside_allowance, parse_budget

    total = torch.cuda.get_device_properties(device).total_memory
    budget = parse_budget(budget_text).resolve(total)
    torch.zeros(1, device=device)  # the CUDA context exists from here on
    index = gpu_mod.nvml_index(device)
    used = gpu_mod.process_used_bytes(index) if index is not None else None
    context = None if used is None else max(used - torch.cuda.memory_reserved(device), 0)
    outside = outside_allowance(context, num_gpus)
    torch.cuda.set_per_process_memory_fraction(min(1.0, allocator_cap(budget, outside) / total), device)
    return budget, outside, context


def _agree(a: float, b: float) -> bool:
    return abs(a - b) <= WARMUP_AGREE * min(a, b)


def _latency(times, steps: int) -> float:
    """Full-request latency as stored: stages, the denoise loop's overhead, steps x step median."""
    st = times.stages
    med = summarize_steps(times.steps)["step_median_s"] or 0.0
    return st["encode_s"] + st["prepare_s"] + st["denoise_s"] - sum(times.steps) + steps * med + st["decode_s"]


def generate(req: GenerateRequest, progress: bool = False) -> GenerateResult:
    from .parallel import context
    from .pipeline import Pipeline

    validate(req.flags)
    if req.pace is not None and req.flags.num_gpus > 1:
        raise EngineError("a paced measurement (turns with other processes) runs one process, not --num-gpus ranks")
    par = context.current()
    if req.flags.num_gpus > 1 and par is None:
        return _launch(req, progress)
    family, width, height, steps, guidance, device, dtype = _resolve(req)
    budget = outside = context = None
    if req.vram_budget is not None:
        if device.type != "cuda":
            raise EngineError("--vram-budget caps GPU memory; it needs a CUDA device")
        budget, outside, context = _cap_vram(req.vram_budget, device, req.flags.num_gpus)
    if req.perf_dump_path is not None:
        Path(req.perf_dump_path).parent.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    from .gpu import ProcessPeak, nvml_index

    nvml = ProcessPeak(nvml_index(device) if device.type == "cuda" else None)
    cap = max(req.warmup, req.max_warmup if req.max_warmup is not None else req.warmup)
    try:
        t_start = time.perf_counter()
        with nvml:  # the whole footprint's peak over load, warm-up and the measured request
            pipe = Pipeline(family, req.flags, device, dtype, Path(req.model_path) if req.model_path else None, par)
            run = lambda on_step=None: pipe(  # noqa: E731
                req.prompt, req.negative_prompt, width, height, steps, guidance, req.seed, on_step
            )
            requests = []  # (seconds, times, latency) of every request; the last one is measured
            while True:
                t = time.perf_counter()
                image, times = _with_progress(run, steps) if progress else run()
                requests.append((time.perf_counter() - t, times, _latency(times, steps)))
                ran = len(requests) - 1  # warm-up requests before this one
                done = ran >= req.warmup and (ran >= cap or (ran >= 1 and _agree(requests[-2][2], requests[-1][2])))
                if par is not None:  # every rank runs the same requests (collectives): rank 0 decides
                    done = par.broadcast(done)
                if done:
                    break
            measured = [requests.pop()] if req.pace is None else []  # the first measured: the warm-up loop's last
            while True:
                more = bool(req.pace(len(measured))) if req.pace is not None else (
                    sum(m[0] for m in measured) < req.measure_s and len(measured) < MEASURE_CAP)
                if par is not None:
                    more = par.broadcast(more)
                if not more:
                    break
                t = time.perf_counter()
                image, times = run()
                measured.append((time.perf_counter() - t, times, _latency(times, steps)))
        if not measured:
            raise EngineError("no request was measured: the pace said to stop before the first")
        # The request of median latency (the lower middle of an even count) stands for them all.
        request_s, times, latency_s = sorted(measured, key=lambda m: m[2])[(len(measured) - 1) // 2]
        warm = [(secs, wt) for secs, wt, _ in requests]
    except torch.OutOfMemoryError as e:
        if budget is not None:
            raise BudgetExceededError(
                f"out of GPU memory under the VRAM budget {req.vram_budget} ({budget / 2**30:.2f} GiB): {str(e).splitlines()[0][:200]}"
            ) from None
        raise EngineError(f"out of GPU memory: {str(e).splitlines()[0][:200]}") from None

    first_request_s = warm[0][0] if warm else measured[0][0]
    stats = summarize_steps(times.steps)
    st = times.stages
    manifest = pipe.manifest()
    if warm:
        manifest["compile"]["first_request_denoise_s"] = warm[0][1].stages["denoise_s"]
        if req.flags.enable_torch_compile:
            manifest["compile"]["compile_s"] = max(0.0, warm[0][1].stages["denoise_s"] - st["denoise_s"])
    manifest["versions"] = versions()
    manifest["cuda_alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    manifest["vram_budget_bytes"] = budget
    manifest["outside_allocator"] = {"allowance_bytes": outside, "context_bytes_at_start": context}
    dump = {
        "schema": PERF_DUMP_SCHEMA,
        "model": family.spec.name,
        "workload": {"width": width, "height": height, "steps": steps, "guidance": guidance, "seed": req.seed},
        "cold_start": {"load_s": pipe.load_s, "load_parts": dict(pipe.load_parts), "first_request_s": first_request_s,
                       "total_s": pipe.load_s + first_request_s},
        "warmup_requests": len(warm),
        "warmup": {"min": req.warmup, "max": cap, "agree": WARMUP_AGREE, "settled": len(requests) >= 1 and _agree(
            requests[-1][2], measured[0][2]), "latencies_s": [x[2] for x in requests + measured[:1]]},
        "measured": {"requests": len(measured), "min_s": req.measure_s, "latencies_s": [m[2] for m in measured],
                     "fastest_s": min(m[2] for m in measured),
                     "step_medians_s": [summarize_steps(m[1].steps)["step_median_s"] for m in measured]},
        "stages": dict(st),
        "steps_s": times.steps,
        **stats,
        "request_s": request_s,
        "latency_s": latency_s,
        "peak_vram": memory(device, pipe.peaks, nvml.peak),
        "manifest": manifest,
        **({"parallel": _parallel_report(pipe, par, req, width, height, guidance, nvml.peak)} if par is not None else {}),
        "pid": os.getpid(),
        "started_at": time.time() - (time.perf_counter() - t_start),
    }
    if par is not None:
        dump["peak_vram"] = _binding_peak(dump["parallel"]["ranks"])
    t = time.perf_counter()
    if req.output is not None and image is not None:  # several ranks: rank 0 has the image
        save_png(image, Path(req.output))
    dump["stages"]["save_s"] = time.perf_counter() - t
    if req.perf_dump_path is not None and (par is None or par.is_main):
        Path(req.perf_dump_path).write_text(json.dumps(dump, indent=2))
    return GenerateResult(dump, image)


# --- several GPUs ---------------------------------------------------------------------------------


def _launch(req: GenerateRequest, progress: bool) -> GenerateResult:
    """--num-gpus N: check the request here, then run it as N ranks (engine/parallel/launch.py)."""
    from .parallel import launch

    _workload(req)  # a bad model, workload or layout fails here, before any rank starts
    n = req.flags.num_gpus
    kind = (req.device or ("cuda" if torch.cuda.is_available() else "cpu")).split(":")[0]
    if kind == "cuda":
        if req.device not in (None, "cuda"):
            raise EngineError(f"--device {req.device} with --num-gpus {n}: the ranks use cuda:0..{n - 1} of the "
                              "visible GPUs; choose them with CUDA_VISIBLE_DEVICES and pass --device cuda")
        if not torch.cuda.is_available():
            raise EngineError("--device cuda: no CUDA device is available to PyTorch here")
        count = torch.cuda.device_count()
        if count < n:
            raise EngineError(f"--num-gpus {n}: only {count} CUDA device(s) visible")
    elif kind != "cpu":
        raise EngineError(f"--device {req.device!r}: only cuda and cpu are supported")
    if req.perf_dump_path is not None:
        Path(req.perf_dump_path).parent.mkdir(parents=True, exist_ok=True)
    return launch.run(n, "dittune.engine.run:rank_generate", (req, progress), "nccl" if kind == "cuda" else "gloo",
                      env=rank_env(req.flags))


def rank_env(flags) -> dict[str, str]:
    """The ranks' allocator setting. With collectives inside the captured CUDA graph (Ulysses,
    ring or TP with --enable-cuda-graph), NCCL graph capture with expandable segments is reported
    to hang (pytorch/torchtitan#3306: context parallel + CUDA graphs hang until the watchdog with
    expandable_segments:True, complete with False): such runs take expandable_segments:False,
    unless the user set PYTORCH_CUDA_ALLOC_CONF. The manifest's cuda_alloc_conf says what ran.
    Not verified here: the Ulysses-2 + graph trials that did not finish on 2 x H200 turned out to
    hang at interpreter exit, after their result, with this setting already False (fixed in
    parallel/rank.py); whether True hangs the capture on our stack has not been measured."""
    collectives_in_graph = flags.enable_cuda_graph and flags.ulysses_degree * flags.ring_degree * flags.tp_size > 1
    if collectives_in_graph and os.environ.get("DITTUNE_ALLOC_CONF") == "default":
        return {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}
    return {}


def rank_generate(rank: int, world: int, payload) -> GenerateResult | None:
    """One rank of `_launch`: join the layout, run the request; rank 0 returns the result."""
    from .parallel import Layout, context

    req, progress = payload
    device = torch.device("cuda", rank) if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    context.enter(Layout.from_flags(req.flags), rank, world, device)
    result = generate(dataclasses.replace(req, device=str(device)), progress=progress and rank == 0)
    return result if rank == 0 else None


def _parallel_report(pipe, par, req: GenerateRequest, width: int, height: int, guidance: float,
                     nvml_peak: int | None) -> dict[str, Any]:
    """Every rank's device and peaks (rank 0 gets them all), and the bytes one step sends."""
    from . import gpu as gpu_mod

    device = pipe.device
    mine = {"rank": par.rank, "device": str(device), **par.groups.coords,
            "peak_vram": memory(device, pipe.peaks, nvml_peak)}
    if device.type == "cuda":
        mine["gpu"] = torch.cuda.get_device_name(device)
        mine["nvml_index"] = gpu_mod.nvml_index(device)
    try:
        collectives = pipe.account_collectives(req.prompt, req.negative_prompt, width, height, guidance)
    except torch.OutOfMemoryError:
        collectives = None  # the accounting pass runs eagerly and may not fit where the compiled step did
    mine["collectives_per_step"] = collectives
    ranks = par.all_ranks(mine)
    lay = par.layout
    return {
        "layout": {"world_size": lay.world, "cfg": lay.cfg, "ulysses": lay.ulysses, "ring": lay.ring, "tp": lay.tp,
                   "describe": lay.describe()},
        "text_encoders": f"rank {par.encoder_rank} (embeddings broadcast to every rank)",
        "vae": "rank 0",
        "text_tokens": "sharded with the image tokens",
        "ranks": ranks,
    }


def _binding_peak(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-GPU figure a budget binds: each peak's maximum over the ranks (stages: that rank's)."""
    peaks = [r["peak_vram"] for r in ranks]
    out: dict[str, Any] = {}
    for key in ("torch_max_reserved_bytes", "torch_max_allocated_bytes", "nvml_process_bytes", "nvml_process_peak_bytes"):
        vals = [p.get(key) for p in peaks if p.get(key) is not None]
        out[key] = max(vals) if vals else None
    top = max(range(len(peaks)), key=lambda i: peaks[i].get("torch_max_reserved_bytes") or 0)
    if "stages" in peaks[top]:
        out["stages"] = peaks[top]["stages"]
    out["rank"] = top
    return out


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
