"""Comparing two perf dumps (`dittune compare BEFORE.json AFTER.json`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import EngineError
from .run import PERF_DUMP_SCHEMA


def load_dump(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(Path(path).read_text())
    except OSError as e:
        raise EngineError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise EngineError(f"{path} is not JSON: {e}") from None
    if not isinstance(d, dict) or d.get("schema") != PERF_DUMP_SCHEMA:
        raise EngineError(f"{path} is not a dittune perf dump (schema {PERF_DUMP_SCHEMA})")
    return d


def compare_dumps(a: dict[str, Any], b: dict[str, Any]):
    """-> ([(figure, before, after, unit)], [(flag, before, after)]) in milliseconds / GiB / seconds."""
    if a["model"] != b["model"] or a["workload"]["width"] != b["workload"]["width"] or a["workload"]["height"] != b["workload"]["height"]:
        raise EngineError(
            f"the dumps measure different workloads ({a['model']} {a['workload']['width']}x{a['workload']['height']} "
            f"vs {b['model']} {b['workload']['width']}x{b['workload']['height']})"
        )

    def ms(v):
        return None if v is None else v * 1e3

    def gib(v):
        return None if v is None else v / 2**30

    rows = [(f"stage {k.removesuffix('_s')}", ms(a["stages"].get(k)), ms(b["stages"].get(k)), "ms")
            for k in a["stages"] if k in b["stages"]]
    rows += [
        ("denoise step median", ms(a["step_median_s"]), ms(b["step_median_s"]), "ms"),
        ("denoise step p90", ms(a["step_p90_s"]), ms(b["step_p90_s"]), "ms"),
        ("request latency", ms(a["latency_s"]), ms(b["latency_s"]), "ms"),
        ("peak VRAM, NVML whole process", gib(a["peak_vram"].get("nvml_process_peak_bytes")),
         gib(b["peak_vram"].get("nvml_process_peak_bytes")), "GiB"),
        ("peak VRAM reserved", gib(a["peak_vram"]["torch_max_reserved_bytes"]), gib(b["peak_vram"]["torch_max_reserved_bytes"]), "GiB"),
        ("peak VRAM allocated", gib(a["peak_vram"]["torch_max_allocated_bytes"]), gib(b["peak_vram"]["torch_max_allocated_bytes"]), "GiB"),
        ("cold start", a["cold_start"]["total_s"], b["cold_start"]["total_s"], "s"),
    ]
    fa, fb = a["manifest"]["flags"], b["manifest"]["flags"]
    flags = [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
    return rows, flags
