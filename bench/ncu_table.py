"""Nsight Compute's per-kernel CSV -> time, DRAM bytes and achieved bandwidth per kernel name.

On the device (one forward of the model, from bench/profile_step.py --ncu):

    ncu --profile-from-start off --clock-control none --print-units base --csv --page raw \\
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,\\
sm__cycles_elapsed.avg.per_second,sm__throughput.avg.pct_of_peak_sustained_elapsed,\\
gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed \\
        --log-file ncu.csv python3 bench/profile_step.py --model z-image-turbo --ncu --flags="..."
    python3 bench/ncu_table.py ncu.csv --json table.json [--copy-gbps 4000]

Nsight Compute flushes the caches before each kernel (its default), so the DRAM bytes are what a
kernel moves from a cold L2: the bytes its work needs, the number its bandwidth is judged by.
--copy-gbps: the bandwidth a plain device copy reaches on that GPU (bench_kernels.py measures it),
to state each memory-bound kernel's share of it.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

TIME, READ, WRITE, CLOCK = (
    "gpu__time_duration.sum",
    "dram__bytes_read.sum",
    "dram__bytes_write.sum",
    "sm__cycles_elapsed.avg.per_second",
)
SM_PCT, MEM_PCT = (
    "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed",
)
PREFIX = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "u": 1e-6, "m": 1e-3, "n": 1e-9}  # of "Mbyte", "nsecond"
SHORT_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9, "hz": 1.0, "khz": 1e3, "mhz": 1e6, "ghz": 1e9}


def kind(name: str) -> str:
    low = name.lower()
    if any(k in low for k in ("nvjet", "gemm", "cutlass", "sm90_xmma", "cublas")):
        return "GEMM"
    if any(k in low for k in ("cudnn", "fmha", "flash", "attention", "prefill")):
        return "attention"
    if low.startswith("triton"):
        return "inductor (Triton)"
    if low.startswith("_") and low.endswith("_kernel"):
        return "dittune (Triton)"
    return "other"


def _unit_scale(unit: str) -> float:
    """Factor to base units (second, byte, Hz) of an Nsight Compute unit: "ns", "nsecond", "Mbyte",
    "hz", "cycle/nsecond", "%"."""
    num, _, den = unit.strip().partition("/")

    def one(u: str) -> float:
        if u.lower() in SHORT_UNITS:
            return SHORT_UNITS[u.lower()]
        for word in ("second", "byte", "cycle"):
            if u.endswith(word) and len(u) > len(word):
                return PREFIX.get(u[: -len(word)], 1.0)
        return 1.0

    return one(num) / (one(den) if den else 1.0)


def _number(text: str, unit: str) -> float:
    return float(text.replace(",", "")) * _unit_scale(unit)


def read_rows(path: Path) -> list[dict]:
    """One dict per profiled kernel: name, seconds, bytes read/written, SM clock Hz, SOL %s."""
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.startswith('"')]
    if len(lines) < 2:
        raise SystemExit(f"{path}: no Nsight Compute CSV rows (was the range captured? see its ==PROF== lines)")
    reader = csv.reader(lines)
    header, units = next(reader), next(reader)
    col = {h: i for i, h in enumerate(header)}
    missing = [m for m in (TIME, READ, WRITE, "Kernel Name") if m not in col]
    if missing:
        raise SystemExit(f"{path}: missing columns {missing}")
    rows = []
    for r in reader:
        if len(r) != len(header):
            continue

        def get(metric, default=float("nan")):
            if metric not in col or not r[col[metric]].strip():
                return default
            return _number(r[col[metric]], units[col[metric]])

        t = get(TIME)
        if t != t:  # nan
            continue
        rows.append({"name": r[col["Kernel Name"]], "s": t, "read": get(READ, 0.0), "write": get(WRITE, 0.0),
                     "clock_hz": get(CLOCK), "sm_pct": get(SM_PCT), "mem_pct": get(MEM_PCT)})
    return rows


def table(rows: list[dict], copy_gbps: float | None) -> dict:
    by_name: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_name[r["name"]].append(r)
    kernels = []
    for name, rs in by_name.items():
        s = sum(r["s"] for r in rs)
        nbytes = sum(r["read"] + r["write"] for r in rs)
        clocks = [r["clock_hz"] for r in rs if r["clock_hz"] == r["clock_hz"]]
        row = {"name": name, "kind": kind(name), "count": len(rs), "ms": s * 1e3, "us_per_call": s / len(rs) * 1e6,
               "mb_per_call": nbytes / len(rs) / 1e6, "gbps": nbytes / s / 1e9 if s else 0.0,
               "sm_mhz": sum(clocks) / len(clocks) / 1e6 if clocks else None,
               "sm_pct": _mean(r["sm_pct"] for r in rs), "mem_pct": _mean(r["mem_pct"] for r in rs)}
        if copy_gbps:
            row["pct_of_copy"] = 100 * row["gbps"] / copy_gbps
        kernels.append(row)
    kernels.sort(key=lambda k: -k["ms"])
    kinds: dict[str, dict] = defaultdict(lambda: {"ms": 0.0, "bytes": 0.0, "count": 0})
    for r in rows:
        k = kinds[kind(r["name"])]
        k["ms"] += r["s"] * 1e3
        k["bytes"] += r["read"] + r["write"]
        k["count"] += 1
    total = sum(r["s"] for r in rows) * 1e3
    return {"total_ms": total, "kernels_launched": len(rows), "copy_gbps": copy_gbps,
            "kinds": {k: {**v, "gbps": v["bytes"] / v["ms"] / 1e6 if v["ms"] else 0.0} for k, v in kinds.items()},
            "kernels": kernels}


def _mean(values) -> float | None:
    vals = [v for v in values if v == v]
    return sum(vals) / len(vals) if vals else None


def render(t: dict, top: int) -> str:
    out = [f"kernels: {t['kernels_launched']} launches, {t['total_ms']:.2f} ms (serialised, caches flushed)",
           "| kind | launches | ms | share | GB moved | GB/s |", "|---|---|---|---|---|---|"]
    for k, v in sorted(t["kinds"].items(), key=lambda kv: -kv[1]["ms"]):
        out.append(f"| {k} | {v['count']} | {v['ms']:.2f} | {v['ms'] / t['total_ms']:.1%} | {v['bytes'] / 1e9:.2f} "
                   f"| {v['gbps']:.0f} |")
    copy = t.get("copy_gbps")
    out += ["", "| kernel | kind | calls | ms | us/call | MB/call | GB/s |" + (" % of copy |" if copy else "")
            + " SM MHz | SM % | mem % |", "|---|---|---|---|---|---|---|" + ("---|" if copy else "") + "---|---|---|"]
    for k in t["kernels"][:top]:
        out.append(f"| `{k['name'][:70]}` | {k['kind']} | {k['count']} | {k['ms']:.2f} | {k['us_per_call']:.1f} "
                   f"| {k['mb_per_call']:.1f} | {k['gbps']:.0f} |" + (f" {k['pct_of_copy']:.0f} |" if copy else "")
                   + f" {k['sm_mhz'] or 0:.0f} | {k['sm_pct'] or 0:.0f} "
                   f"| {k['mem_pct'] or 0:.0f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--copy-gbps", type=float, default=None)
    a = ap.parse_args(argv)
    if not a.csv.is_file():
        print(f"error: {a.csv}: no such file", file=sys.stderr)
        return 2
    t = table(read_rows(a.csv), a.copy_gbps)
    print(render(t, a.top))
    if a.json:
        a.json.write_text(json.dumps(t, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
