"""Where one DiT forward spends its time: torch.profiler over dittune's native model (with the
given engine flags) and, optionally, diffusers' class on the same weights and inputs; prints the
top kernels / ops by device time and groups them (GEMM, attention, norm/modulation, elementwise,
copies), and can save a Chrome trace.

    python bench/profile_step.py --model flux-dev --flags="--attention-backend torch_cudnn_sdpa --fused-kernels"
    python bench/profile_step.py --model flux-dev-tiny --device cpu --no-diffusers   # smoke test

With --ncu, no torch.profiler: one forward of dittune's model runs between cudaProfilerStart and
cudaProfilerStop, for Nsight Compute started with --profile-from-start off (bench/ncu_table.py
reads its CSV: each kernel's time, DRAM bytes and achieved bandwidth).

On the GPU each profile also reports the SM clock and board power (NVML, sampled every 2 ms)
during the profiled forward and during --clock-iters timed forwards outside the profiler, and the
GEMM and attention throughput against their FLOPs (counted on the meta device): on Hopper as a
share of the dense bf16 peak at the window's median NVML clock (SMs x 4096 FLOP a clock). NVML
samples every few ms and the window includes launch gaps, which run at a higher clock than the
GEMMs: the share is a lower bound; Nsight Compute (--ncu) gives each kernel's own clock.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from bench_dit import (  # noqa: E402
    DIFFUSERS_BACKEND, Clocks, build_reference, case, flop_split, free, native_from, prepare_native, timeit,
)

from dittune.engine import flags as F  # noqa: E402
from dittune.engine.models import get_family  # noqa: E402

GROUPS = (
    ("attention", ("attention", "flash", "fmha", "cudnn", "sdpa", "softmax")),
    ("gemm", ("gemm", "matmul", "addmm", "mm", "cutlass", "sm90", "nvjet", "linear")),
    ("norm/modulation/rope", ("norm", "modulat", "rope", "dittune")),
    ("copy/layout", ("copy", "cat", "transpose", "contiguous", "clone", "memcpy")),
)


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "other elementwise"


def profile_forward(fn, device, warmup: int, trace: Path | None, clock_iters: int = 0):
    """(kernel rows sorted by device time, wall ms of one forward timed outside the profiler,
    clocks: NVML's SM clock and power during the profiled forward ("profiled_*") and during
    `clock_iters` timed forwards ("timed_*", with their median ms))."""
    for _ in range(warmup):
        fn()
    use_cuda = device.type == "cuda"
    wall, clocks = None, {}
    if use_cuda:
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        wall = start.elapsed_time(end)
        if clock_iters:
            with Clocks(device) as c:
                ms = timeit(fn, device, 0, clock_iters) * 1e3
            clocks = {"timed_forward_ms": ms, **{f"timed_{k}": v for k, v in c.summary().items()}}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_cuda else [])
    with Clocks(device) as c, profile(activities=acts) as prof:
        fn()
        if use_cuda:
            torch.cuda.synchronize(device)
    clocks.update({f"profiled_{k}": v for k, v in c.summary().items()})
    if trace:
        prof.export_chrome_trace(str(trace))
    rows = []
    for e in prof.key_averages():
        if use_cuda:
            # Kernels only: CPU-side ops (aten::, dittune::, compiled-region markers, Triton
            # launchers) carry their kernels' time again and would count it twice.
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            t = e.device_time_total / 1e3
        else:
            t = e.self_cpu_time_total / 1e3
        if t > 0:
            rows.append((e.key, e.count, t))
    return sorted(rows, key=lambda r: -r[2]), wall, clocks


def ncu_forward(fn, device, warmup: int) -> None:
    """Warm up, then one forward inside the profiler-start/stop range Nsight Compute captures."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    torch.cuda.cudart().cudaProfilerStart()
    fn()
    torch.cuda.synchronize(device)
    torch.cuda.cudart().cudaProfilerStop()


def peak_tflops(device, mhz: float | None) -> float | None:
    """Dense bf16 tensor-core peak at `mhz` on Hopper (SMs x 4096 FLOP a clock: 989 TFLOP/s for
    132 SMs at 1830 MHz); None elsewhere."""
    if device.type != "cuda" or not mhz or torch.cuda.get_device_capability(device)[0] != 9:
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count * 4096 * mhz * 1e6 / 1e12


def report(title: str, rows, top: int, wall: float | None, out: dict, clocks: dict | None = None,
           flops: dict | None = None, device=None) -> None:
    total = sum(r[2] for r in rows)
    print(f"\n== {title}: kernels {total:.2f} ms" + (f", forward wall {wall:.2f} ms (gaps {wall - total:.2f} ms)" if wall else ""))
    groups: dict[str, float] = defaultdict(float)
    for name, _, t in rows:
        groups[group_of(name)] += t
    for g, t in sorted(groups.items(), key=lambda x: -x[1]):
        print(f"   {g:24} {t:9.2f} ms  {t / total:6.1%}")
    clocks = clocks or {}
    if clocks.get("profiled_sm_mhz_median"):
        print(f"   SM clock: profiled forward {clocks['profiled_sm_mhz_median']:.0f} MHz "
              f"({clocks['profiled_power_w_median']:.0f} W)" + (
                  f"; {clocks['timed_forward_ms']:.2f} ms a forward over timed forwards at "
                  f"{clocks['timed_sm_mhz_median']:.0f} MHz ({clocks['timed_power_w_median']:.0f} W)"
                  if clocks.get("timed_sm_mhz_median") else ""))
    eff = {}
    if flops:
        peak = peak_tflops(device, clocks.get("profiled_sm_mhz_median")) if device is not None else None
        for kind in ("gemm", "attention"):
            ms = groups.get(kind)
            if ms and flops.get(kind):
                tf = flops[kind] / (ms / 1e3) / 1e12
                eff[kind] = {"tflop": flops[kind] / 1e12, "ms": ms, "tflops": tf,
                             "of_clock_peak": tf / peak if peak else None}
                print(f"   {kind}: {flops[kind] / 1e12:.2f} TFLOP in {ms:.2f} ms = {tf:.0f} TFLOP/s"
                      + (f", {tf / peak:.0%} of the dense bf16 peak at the profiled window's median NVML clock ({peak:.0f};"
                         " the window includes gaps that run faster, so the kernels' own clock is lower: ncu gives it)"
                         if peak else ""))
    print(f"   top {top}:")
    for name, count, t in rows[:top]:
        print(f"   {t:9.2f} ms  x{count:<5} {group_of(name)[:10]:10} {name[:100]}")
    out[title] = {"kernels_ms": total, "wall_ms": wall, "groups": dict(groups), "clocks": clocks, "efficiency": eff,
                  "kernels": [{"name": n, "count": c, "ms": t} for n, c, t in rows]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="flux-dev")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--flags", default="", help="engine flags for the native model")
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--json", default=None, help="write every kernel row here")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--trace-dir", default=None, help="write Chrome traces here")
    ap.add_argument("--clock-iters", type=int, default=10,
                    help="timed forwards under NVML clock sampling after the warm-up (GPU; 0: none)")
    ap.add_argument("--ncu", action="store_true", help="one dittune forward in a cudaProfilerStart/Stop range "
                    "for `ncu --profile-from-start off` (implies --no-diffusers)")
    a = ap.parse_args(argv)
    if a.ncu:
        if a.device != "cuda":
            raise SystemExit("--ncu needs --device cuda")
        a.no_diffusers = True
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    family = get_family(a.model)
    size = 64 if family.spec.tiny else a.size
    tokens = 16 if family.spec.tiny else (512 if family.spec.family == "flux" else 128)
    cfg = F.config_from_argv(shlex.split(a.flags))
    ref_cls, ref_cfg, ref_fwd, our_fwd = case(a.model, size, size, tokens, device, dtype)
    trace_dir = Path(a.trace_dir) if a.trace_dir else None
    if trace_dir:
        trace_dir.mkdir(parents=True, exist_ok=True)

    clock_iters = a.clock_iters if device.type == "cuda" else 0
    flops = flop_split(a.model, size, size, tokens)  # diffusers' forward does the same products
    out: dict = {}
    ref = build_reference(ref_cls, ref_cfg, device, dtype)
    with torch.inference_mode():
        if not a.no_diffusers:
            if DIFFUSERS_BACKEND.get(cfg.attention_backend):
                ref.set_attention_backend(DIFFUSERS_BACKEND[cfg.attention_backend])
            rows, wall, clocks = profile_forward(lambda: ref_fwd(ref), device, a.warmup,
                                                 trace_dir and trace_dir / "diffusers.json", clock_iters)
            report(f"diffusers {ref_cls.__name__}", rows, a.top, wall, out, clocks, flops, device)
    sd = {k: v.to("cpu") for k, v in ref.state_dict().items()}
    del ref
    free(device)
    ours = native_from(family, sd, device, dtype)
    del sd
    prepare_native(ours, cfg, device)
    with torch.inference_mode():
        if a.ncu:
            ncu_forward(lambda: our_fwd(ours), device, a.warmup)
            return 0
        rows, wall, clocks = profile_forward(lambda: our_fwd(ours), device, a.warmup,
                                             trace_dir and trace_dir / "dittune.json", clock_iters)
    report(f"dittune {a.model} {shlex.join(F.config_to_argv(cfg)) or '(defaults)'}", rows, a.top, wall, out, clocks,
           flops, device)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
