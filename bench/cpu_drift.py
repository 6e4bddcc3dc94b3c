"""One process of the tiny FLUX (128x128, 8 steps, full-scope compile with max-autotune) on one core,
one torch thread, measuring requests back to back for SECONDS after warm-up, every request's end time
and latency into OUT.json; then, per window of WINDOW seconds, the median, 25th and 10th percentiles
and the minimum, and how far each statistic moves over the run (docs/PERFORMANCE.md, eighth session).
Usage: python bench/cpu_drift.py SECONDS WINDOW OUT.json [CORE]"""

import json
import os
import statistics
import sys
import time
from pathlib import Path


def tiny_flux(argv: str, core: int = 1):
    """The tiny FLUX (128x128, 8 steps) with `argv`'s flags on one core with one torch thread, warmed
    up by four requests: a callable that runs one request and returns its latency as the tuner
    counts it (engine.run._latency)."""
    os.sched_setaffinity(0, {core})
    import torch

    torch.set_num_threads(1)
    from dittune.engine.checkpoint import resolve
    from dittune.engine.flags import config_from_argv
    from dittune.engine.pipeline import Pipeline
    from dittune.engine.run import _latency

    pipe = Pipeline(resolve("flux-dev-tiny", None, None), config_from_argv(argv.split()), torch.device("cpu"),
                    torch.float32, None, None)

    def request() -> float:
        return _latency(pipe("A photo of a cat", "", 128, 128, 8, 3.5, 0, None)[1], 8)

    for _ in range(4):
        request()
    return request


def main(secs: float, window: float, out: str, core: int = 1) -> None:
    request = tiny_flux("--enable-torch-compile --compile-scope full --compile-mode max-autotune-no-cudagraphs", core)
    t0, rows = time.perf_counter(), []
    while time.perf_counter() - t0 < secs:
        lat = request()
        rows.append((time.perf_counter() - t0, lat))
    Path(out).write_text(json.dumps(rows))
    wins: dict[int, list[float]] = {}
    for t, lat in rows:
        wins.setdefault(int(t // window), []).append(lat)
    stats = {"median": [], "p25": [], "p10": [], "min": []}
    for k in sorted(wins):
        v = sorted(wins[k])
        stats["median"].append(statistics.median(v))
        stats["p25"].append(v[len(v) // 4])
        stats["p10"].append(v[len(v) // 10])
        stats["min"].append(v[0])
    for name, vals in stats.items():
        m = statistics.median(vals)
        print(f"{name:6s} over {len(vals)} windows: median {m * 1e3:.2f} ms, range {min(vals) / m:.3f}-{max(vals) / m:.3f}, "
              f"rel sd {statistics.stdev(vals) / m:.3f}")


if __name__ == "__main__":
    main(float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 1)
