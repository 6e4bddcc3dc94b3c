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
    """The same configuration with a warm-up request and a perf dump: what the tuner measured."""
    return shlex.join([*generate_argv(r), "--warmup", "1", "--perf-dump-path", "remeasure.json"])


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


def _evidence(r: Result) -> str:
    band = f" ±{r.step_spread:.1%}" if r.step_spread is not None else ""
    stale = " STALE (measured with other software versions)" if r.stale else ""
    return (
        f"{r.model} {r.width}x{r.height} {r.steps} steps on {r.gpu}: {r.latency_s:.3f} s/request{band}, "
        f"peak {format_bytes(r.peak_vram_bytes)}, measured {r.measured_at:%Y-%m-%d} (study {r.study}, trial {r.trial_id}){stale}"
    )


def to_dict(r: Result) -> dict:
    return {
        "model": r.model, "width": r.width, "height": r.height, "steps": r.steps, "guidance": r.guidance,
        "gpu": r.gpu, "gpu_memory_bytes": r.gpu_memory_bytes, "flags": F.config_to_dict(F.config_from_dict(r.flags), True),
        "command": generate_command(r), "remeasure": remeasure_command(r), "latency_s": r.latency_s, "step_median_s": r.step_median_s,
        "step_spread": r.step_spread, "peak_vram_bytes": r.peak_vram_bytes, "cold_start_s": r.cold_start_s,
        "measured_at": r.measured_at.isoformat(), "study": r.study, "trial_id": r.trial_id, "status": r.status,
        "versions": r.versions, "registry_hash": r.registry_hash, "stale": r.stale,
    }


def render(results: Iterable[Result], fmt: str) -> str:
    results = list(results)
    if fmt == "json":
        return json.dumps([to_dict(r) for r in results], indent=2) + "\n"
    if fmt == "sh":
        lines = ["#!/bin/sh", "# dittune export: measured configurations, fastest first per model and GPU", ""]
        for r in results:
            lines += [f"# {_evidence(r)}", generate_command(r), ""]
        return "\n".join(lines)
    if fmt == "md":
        lines = [
            "| model | workload | GPU | latency (s) | step median (ms) | peak VRAM | command |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in results:
            step = f"{r.step_median_s * 1e3:.1f}" if r.step_median_s is not None else "-"
            stale = " (stale)" if r.stale else ""
            lines.append(
                f"| {r.model} | {r.width}x{r.height}, {r.steps} steps | {r.gpu}{stale} | {r.latency_s:.3f} | {step} "
                f"| {format_bytes(r.peak_vram_bytes)} | `{generate_command(r)}` |"
            )
        return "\n".join(lines) + "\n"
    if fmt == "sglang":
        lines = ["#!/bin/sh", "# dittune export --format sglang: the same configurations in SGLang Diffusion's syntax", ""]
        for r in results:
            cmd, missing = sglang_command(r)
            lines.append(f"# {_evidence(r)}")
            if missing:
                lines.append(f"# no SGLang equivalent (dropped): {shlex.join(missing)}")
            lines += [cmd, ""]
        return "\n".join(lines)
    raise ValueError(f"unknown format {fmt!r}")


def render_text(r: Result) -> str:
    return f"{_evidence(r)}\n  {generate_command(r)}\n  re-measure: {remeasure_command(r)}"
