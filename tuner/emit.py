"""Render measured results: command lines (dittune and SGLang syntax), JSON, markdown, text."""

from __future__ import annotations

import json
import shlex
from typing import Iterable

from dittune.db import Result
from dittune.engine import flags as F
from dittune.engine.errors import EngineError
from dittune.engine.models import get_spec

from dittune.engine.budget import format_bytes

FORMATS = ("sh", "json", "md", "sglang")


def generate_argv(r: Result) -> list[str]:
    return [
        "dittune", "generate", "--model", r.model, "--width", str(r.width), "--height", str(r.height),
        "--steps", str(r.steps), "--guidance", f"{r.guidance:g}", *shlex.split(r.argv),
    ]


def generate_command(r: Result) -> str:
    return shlex.join(generate_argv(r))


def remeasure_command(r: Result) -> str:
    """The same configuration measured as the tuner measures it (warm-up until two consecutive
    requests agree, then requests over the tuner's window, on the device it ran on), with a perf
    dump whose latency_s (median) or measured.fastest_s (the CPU's) is the stored figure's counterpart."""
    from dittune.engine.run import WARMUP_CAP, measure_window

    device = "cpu" if r.gpu == "cpu" else "cuda"
    return shlex.join([*generate_argv(r), *(["--device", "cpu"] if device == "cpu" else []), "--warmup", "1",
                       "--max-warmup", str(WARMUP_CAP), "--measure-s", str(measure_window(device)),
                       "--perf-dump-path", "remeasure.json"])


def sglang_command(r: Result) -> tuple[str, list[str]]:
    """`sglang generate ...` for the same configuration, and the flags SGLang has no equivalent for."""
    try:
        repo = get_spec(r.model).hf_repo or r.model
    except EngineError:
        repo = r.model
    flag_argv, missing = F.to_sglang_argv(F.config_from_dict(r.flags))
    argv = [
        "sglang", "generate", "--model-path", repo, "--prompt", "A photo of a cat", "--width", str(r.width),
        "--height", str(r.height), "--num-inference-steps", str(r.steps), "--guidance-scale", f"{r.guidance:g}",
        *flag_argv,
    ]
    return shlex.join(argv), missing


PEAK_KINDS = {"nvml_process": "NVML process peak, whole footprint", "torch_reserved": "torch reserved peak, allocator only"}
VERSION_KEYS = ("torch", "triton", "driver", "dittune")


def band_text(r: Result) -> str:
    band = f"±{r.noise_band:.1%}" if r.noise_band is not None else "no noise band"
    tie = f", {r.verdict}" if r.verdict else ""
    fresh = f"; a fresh run: ±{r.fresh_band:.1%}" if r.fresh_band is not None else ""
    return f"{band} ({r.band_source}{tie}){fresh}"


def peak_text(r: Result) -> str:
    if r.peak_vram_bytes is None:
        return "peak VRAM - (CPU run)"
    reserved = (f"; torch reserved {format_bytes(r.torch_reserved_peak_bytes)}"
                if r.peak_kind == "nvml_process" and r.torch_reserved_peak_bytes is not None else "")
    if r.legacy_peak:
        reserved = f"; stored before whole-footprint peaks: a budget counts it as {format_bytes(r.budget_peak_bytes)}"
    return f"peak {format_bytes(r.peak_vram_bytes)} ({PEAK_KINDS.get(r.peak_kind or '', r.peak_kind)}{reserved})"


def versions_text(r: Result) -> str:
    return ", ".join(f"{k} {r.versions[k]}" for k in VERSION_KEYS if r.versions.get(k))


def stale_text(r: Result) -> str:
    return f"STALE: {'; '.join(r.stale_reasons) or 'measured with other software versions'}" if r.stale else ""


def _evidence(r: Result) -> str:
    """One line: the figure and everything needed to trust (or redo) it."""
    step = f", step median {r.step_median_s * 1e3:.1f} ms" if r.step_median_s is not None else ""
    step += f", {r.images_per_s_per_gpu:.3g} images/s per GPU ({r.num_gpus} GPU(s))"
    warm = f", {r.warmup_requests} warm-up request(s)" if r.warmup_requests is not None else ""
    if r.measured_requests and r.measured_requests > 1:
        warm += f", {r.latency_stat} of {r.measured_requests} measured requests"
    stale = f"; {stale_text(r)}" if r.stale else ""
    return (
        f"{r.model} {r.width}x{r.height} {r.steps} steps on {r.gpu}: {r.latency_s:.3f} s/request {band_text(r)}{step}, "
        f"{peak_text(r)}, measured {r.measured_at:%Y-%m-%d} (study {r.study}, trial {r.trial_id}{warm}), "
        f"{versions_text(r)}{stale}"
    )


def evidence_text(r: Result) -> str:
    return _evidence(r)


def to_dict(r: Result) -> dict:
    return {
        "model": r.model, "width": r.width, "height": r.height, "steps": r.steps, "guidance": r.guidance,
        "gpu": r.gpu, "gpu_memory_bytes": r.gpu_memory_bytes, "flags": F.config_to_dict(F.config_from_dict(r.flags), True),
        "command": generate_command(r), "remeasure": remeasure_command(r), "latency_s": r.latency_s, "step_median_s": r.step_median_s,
        "step_spread": r.step_spread, "peak_vram_bytes": r.peak_vram_bytes, "cold_start_s": r.cold_start_s,
        "measured_at": r.measured_at.isoformat(), "study": r.study, "trial_id": r.trial_id, "status": r.status,
        "versions": r.versions, "registry_hash": r.registry_hash, "stale": r.stale, "stale_reasons": list(r.stale_reasons),
        "noise_band": r.noise_band, "noise_band_source": r.band_source, "fresh_run_band": r.fresh_band,
        "repeats_s": list(r.repeats),
        "verdict": r.verdict or None, "peak_kind": r.peak_kind, "torch_reserved_peak_bytes": r.torch_reserved_peak_bytes,
        "warmup_requests": r.warmup_requests, "measured_requests": r.measured_requests, "latency_stat": r.latency_stat,
        "budget_peak_bytes": r.budget_peak_bytes,
        "images_per_s_per_gpu": r.images_per_s_per_gpu,
    }


def render(results: Iterable[Result], fmt: str) -> str:
    results = list(results)
    if fmt == "json":
        return json.dumps([to_dict(r) for r in results], indent=2) + "\n"
    if fmt == "sh":
        lines = ["#!/bin/sh", "# dittune export: measured configurations, fastest first per model and GPU", ""]
        for r in results:
            lines += [f"# {_evidence(r)}", f"# re-measure: {remeasure_command(r)}", generate_command(r), ""]
        return "\n".join(lines)
    if fmt == "md":
        lines = [
            "| model | workload | GPU | latency (s) | noise band | step median (ms) | peak VRAM | measured | versions | command |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results:
            step = f"{r.step_median_s * 1e3:.1f}" if r.step_median_s is not None else "-"
            stale = f" ({stale_text(r)})" if r.stale else ""
            lines.append(
                f"| {r.model} | {r.width}x{r.height}, {r.steps} steps | {r.gpu}{stale} | {r.latency_s:.3f} | {band_text(r)} "
                f"| {step} | {peak_text(r).removeprefix('peak ')} | {r.measured_at:%Y-%m-%d}, trial {r.trial_id} "
                f"| {versions_text(r)} | `{generate_command(r)}` |"
            )
        return "\n".join(lines) + "\n"
    if fmt == "sglang":
        lines = ["#!/bin/sh", "# dittune export --format sglang: the same configurations in SGLang Diffusion's syntax.",
                 "# These SGLang commands were NOT measured: the latencies below are dittune's own engine's, with every",
                 "# flag listed, and say nothing of SGLang's speed (flags without an SGLang equivalent are dropped).", ""]
        for r in results:
            cmd, missing = sglang_command(r)
            lines.append(f"# measured by dittune's engine, not SGLang: {r.latency_s:.3f} s/request {band_text(r)}, "
                         f"{peak_text(r)} (study {r.study}, trial {r.trial_id})")
            lines.append(f"# dittune's command: {generate_command(r)}")
            if missing:
                lines.append(f"# measured flags with no SGLang equivalent (dropped here, so this command is not the "
                             f"measured configuration): {shlex.join(missing)}")
            else:
                lines.append("# every measured flag has an SGLang equivalent; SGLang's own speed is still unmeasured")
            lines += [cmd, ""]
        return "\n".join(lines)
    raise ValueError(f"unknown format {fmt!r}")


def render_text(r: Result) -> str:
    field = "measured.fastest_s" if r.latency_stat == "fastest" else "latency_s"
    return f"{_evidence(r)}\n  {generate_command(r)}\n  re-measure (compare its perf dump's {field}): {remeasure_command(r)}"
