"""A fake engine for tuner tests only: a worker whose latency and peak memory are a known function
of the flags, so the tuner's search can be checked against the true optimum. Never used outside
tests: the real tuner always measures the real engine."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

GiB = 2**30


def cost(flags: dict) -> tuple[float, int]:
    """(seconds per request, peak bytes) for a configuration of flux-dev-like sizes."""
    step = 0.190
    step *= {"torch_sdpa": 1.0, "torch_cudnn_sdpa": 0.96, "torch_flash_sdpa": 1.04, "torch_efficient_sdpa": 1.12}[flags["attention-backend"]]
    if flags["enable-torch-compile"]:
        step *= 0.70 if flags["compile-scope"] == "full" else 0.72
        if flags["compile-mode"] == "max-autotune-no-cudagraphs":
            step *= 0.98
    if flags["fused-kernels"]:
        step *= 0.95
    if flags["enable-cuda-graph"]:  # (the constraints keep it away from DiT offload)
        step *= 0.93
    peak = 38 * GiB
    overhead = 0.0
    if flags["text-encoder-cpu-offload"]:
        peak -= 9 * GiB
        overhead += 0.25
    if flags["vae-cpu-offload"]:
        overhead += 0.01
    if flags["dit-cpu-offload"]:
        overhead += 0.5
    if flags["dit-layerwise-offload"]:
        resident = flags["dit-resident-layers"]
        streamed = (57 - resident) / 57
        peak -= int(22 * GiB * streamed)
        step = max(step, 0.45 * streamed / min(flags["dit-offload-prefetch-size"], 2) ** 0.2)
    if not flags["pin-cpu-memory"]:
        overhead += 0.3
    # a parallel layout: sequence parallel splits the DiT's work (ring less well than Ulysses) and
    # its activations; the collectives cost a little per step; every rank holds the whole DiT
    ulysses, ring = flags.get("ulysses-degree", 1), flags.get("ring-degree", 1)
    if ulysses * ring > 1:
        step = step / (ulysses ** 0.9 * ring ** 0.8) + 0.004
        peak -= int(2 * GiB * (1 - 1 / (ulysses * ring)))
    return 0.3 + 28 * step + overhead, peak


def main() -> int:
    path, warm = sys.argv[1], False
    if path == "--wait":  # a warm worker (tuner/runner.py Spares): the job's path comes on stdin
        path, warm = sys.stdin.readline().strip(), True
        if not path:
            return 0
    job = json.loads(Path(path).read_text())
    start = time.time()
    time.sleep(float(os.environ.get("FAKE_ENGINE_SLEEP", "0")))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = job["flags"].get("num-gpus", 1)
    if visible is not None and len(visible.split(",")) != gpus:  # as the engine's launcher refuses it
        print(f"refused: --num-gpus {gpus}: {len(visible.split(','))} CUDA device(s) visible", file=sys.stderr)
        return 4
    latency, peak = cost(job["flags"])
    # A fake NVML: the process's whole footprint is the allocator's peak plus this much outside it
    # (CUDA context, kernel modules); unset, the dump has no NVML peak (as where NVML cannot see it).
    outside = os.environ.get("FAKE_ENGINE_OUTSIDE_GIB")
    whole = peak + int(float(outside) * GiB) if outside else peak
    budget = job.get("vram_budget")
    if budget is not None and whole > int(budget.rstrip("B")):
        print("oom: out of memory under the budget", file=sys.stderr)
        return 3
    k = job["steps"]
    step = (latency - 0.3) / 28
    noise = float(os.environ.get("FAKE_ENGINE_NOISE", "0"))  # run-to-run jitter, relative (a real machine's)
    if noise:
        import random

        step *= 1 + random.Random(os.urandom(8)).uniform(-noise, noise)
    spread = float(os.environ.get("FAKE_ENGINE_SPREAD", "0")) or 2 * noise  # the steps' spread one run reports
    n = 3 if job.get("measure_s") else 1
    dump = {
        "stages": {"encode_s": latency - 0.1 - 28 * ((latency - 0.3) / 28), "prepare_s": 0.0, "denoise_s": k * step,
                   "decode_s": 0.1},
        "steps_s": [step] * k, "step_median_s": step, "step_spread": spread,
        "peak_vram": {"torch_max_reserved_bytes": peak, **({"nvml_process_peak_bytes": whole} if outside else {})},
        "cold_start": {"total_s": 20.0}, "warmup_requests": 1,
        # the tuner asks for the median of requests over measure_s seconds: say three were measured
        # (the engine's _latency of each at k steps, and their step medians: a fake's requests repeat exactly)
        "measured": {"requests": n, "min_s": job.get("measure_s", 0.0), "latencies_s": [0.3 + k * step] * n,
                     "fastest_s": 0.3 + k * step, "step_medians_s": [step] * n},
        "manifest": {"fake": True, "flags": job["flags"], "device": job["device"],
                     # where the tuner put it, and when: for the GPU-pool tests
                     "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "ran": [start, time.time()],
                     "cpus": os.environ.get("DITTUNE_CPUS"),
                     "warm_worker": warm, "pid": os.getpid()},
    }
    Path(job["perf_dump_path"]).write_text(json.dumps(dump))
    return 0


if __name__ == "__main__":
    sys.exit(main())
