"""Timing and memory measurement: device-synchronised stage times, CUDA-event step times (wall
clock on the CPU), peak VRAM from torch and NVML, the software versions and the host's share
(cores, threads) for the manifest."""

from __future__ import annotations

import contextlib
import itertools
import os
import statistics
import time
from importlib import metadata
from typing import Any

import torch

from . import gpu as gpu_mod


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Per-step durations: CUDA events on the GPU (no sync inside the loop), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self._marks: list = []

    def start(self):
        self._mark()

    def stop(self):
        self._mark()

    def _mark(self):
        if self.device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self._marks.append(e)
        else:
            self._marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        marks = self._marks
        if self.device.type == "cuda":
            sync(self.device)
            return [marks[i].elapsed_time(marks[i + 1]) / 1e3 for i in range(0, len(marks), 2)]
        return [marks[i + 1] - marks[i] for i in range(0, len(marks), 2)]


def summarize_steps(steps: list[float]) -> dict[str, float | None]:
    if not steps:
        return {"step_median_s": None, "step_p10_s": None, "step_p90_s": None, "step_spread": None}
    q = sorted(steps)
    p10 = q[int(0.1 * (len(q) - 1))]
    p90 = q[round(0.9 * (len(q) - 1))]
    med = statistics.median(q)
    return {"step_median_s": med, "step_p10_s": p10, "step_p90_s": p90, "step_spread": (p90 - p10) / med if med else None}


class StagePeaks:
    """Peak reserved / allocated bytes per pipeline stage (the memory model predicts per stage).
    Each stage resets torch's peak counters after folding them into the running maximum, so the
    process-wide peak (`memory`) stays what it would be without the resets."""

    def __init__(self, device: torch.device):
        self.device = device
        self.on = device.type == "cuda"
        self.max_reserved = self.max_allocated = 0
        self.stages: dict[str, dict[str, int]] = {}

    def _fold(self) -> tuple[int, int]:
        r, a = torch.cuda.max_memory_reserved(self.device), torch.cuda.max_memory_allocated(self.device)
        self.max_reserved, self.max_allocated = max(self.max_reserved, r), max(self.max_allocated, a)
        return r, a

    @contextlib.contextmanager
    def stage(self, name: str):
        if not self.on:
            yield
            return
        self._fold()
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            r, a = self._fold()
            self.stages[name] = {"reserved_bytes": r, "allocated_bytes": a}


def memory(device: torch.device, peaks: StagePeaks | None = None, nvml_peak: int | None = None) -> dict[str, Any]:
    """Process peaks since the last reset (with `peaks`: over every stage too, plus the last
    request's peak per stage). `nvml_peak`: NVML's sampled peak of this process (gpu.ProcessPeak),
    folded with a final read into nvml_process_peak_bytes, the whole footprint a budget binds."""
    if device.type != "cuda":
        return {"torch_max_reserved_bytes": None, "torch_max_allocated_bytes": None, "nvml_process_bytes": None,
                "nvml_process_peak_bytes": None}
    reserved, allocated = torch.cuda.max_memory_reserved(device), torch.cuda.max_memory_allocated(device)
    out: dict[str, Any] = {}
    if peaks is not None:
        peaks._fold()
        reserved, allocated = peaks.max_reserved, peaks.max_allocated
        out["stages"] = dict(peaks.stages)
    final = _nvml_process_bytes(device)
    seen = [v for v in (nvml_peak, final) if v is not None]
    return {
        "torch_max_reserved_bytes": reserved,
        "torch_max_allocated_bytes": allocated,
        "nvml_process_bytes": final,
        "nvml_process_peak_bytes": max(seen) if seen else None,
        **out,
    }


PEAK_KINDS = {
    "nvml_process": "NVML process peak (whole footprint: CUDA context and allocations outside torch included)",
    "torch_reserved": "torch reserved peak (the allocator only: CUDA context and outside allocations not included)",
}


def binding_peak(peak_vram: dict[str, Any]) -> tuple[int | None, str | None]:
    """(bytes, kind) of the peak a VRAM budget is compared with: NVML's whole-process peak where
    NVML saw the process, else torch's reserved peak (kind "torch_reserved": it leaves out the CUDA
    context and what lives outside the allocator, ~0.75 GiB on the H200). (None, None) on the CPU."""
    nv = peak_vram.get("nvml_process_peak_bytes")
    if nv is not None:
        return int(nv), "nvml_process"
    reserved = peak_vram.get("torch_max_reserved_bytes")
    return (int(reserved), "torch_reserved") if reserved is not None else (None, None)


def latency_stat(device: str) -> str:
    """Which of a run's measured requests its stored latency is: "median" on a GPU, whose requests
    repeat within 1-2%; "fastest" on the CPU. A shared CPU host's load only ever adds time, and it
    moves over minutes: the tiny FLUX in one process for 8 minutes, the median request per 30 s
    24.5-41.3 ms, the fastest 22.7-25.9 ms (docs/PERFORMANCE.md, ninth session). The fastest of
    requests spread over a confirmation's rounds is the configuration's cost on this host when
    nothing interferes, the figure that a run minutes later reproduces."""
    return "fastest" if device == "cpu" else "median"


def run_latency(dump: dict[str, Any], steps: int, device: str) -> tuple[float, str]:
    """(seconds, which request) of a run's stored latency for a workload of `steps` steps, from its
    perf dump, whose requests ran len(steps_s) steps (the tuner's measure steps): a request's stages,
    loop overhead and `steps` x its step median; of the median request or, on the CPU, of the fastest
    one at `steps` (latency_stat). A dump without per-request step medians (written before them):
    the median, and it says so."""
    st = dump["stages"]
    median = st["encode_s"] + st["prepare_s"] + st["denoise_s"] - sum(dump["steps_s"]) + steps * dump["step_median_s"] \
        + st["decode_s"]
    m = dump.get("measured") or {}
    lats, meds = m.get("latencies_s"), m.get("step_medians_s")
    if latency_stat(device) == "median" or not lats or not meds or len(lats) != len(meds):
        return median, "median"
    k = len(dump["steps_s"])  # the steps each measured request ran
    return min(lat + (steps - k) * med for lat, med in zip(lats, meds)), "fastest"


def _nvml_process_bytes(device: torch.device) -> int | None:
    index = gpu_mod.nvml_index(device)
    return None if index is None else gpu_mod.process_used_bytes(index)


def versions() -> dict[str, str | None]:
    def v(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    driver = None
    det = gpu_mod.detect()
    if det:
        driver = det.gpus[0].driver
    return {
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": v("triton"), "driver": driver,
        "diffusers": v("diffusers"), "transformers": v("transformers"), "dittune": v("dittune"),
    }


def host() -> dict[str, Any]:
    """The cores this process may run on (as taskset writes them: "0-2,5") and torch's threads:
    a CPU measurement is only comparable with one made on the same share (tuner/cores.py)."""
    runs = [[c for _, c in g] for _, g in itertools.groupby(enumerate(sorted(os.sched_getaffinity(0))),
                                                             key=lambda ic: ic[1] - ic[0])]  # consecutive cores
    cpus = ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
    return {"cpus": cpus, "torch_threads": torch.get_num_threads()}
