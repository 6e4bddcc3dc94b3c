"""Measurements on the CPU: every measuring process of a CPU study runs on one core, the same one.

A CPU trial of a tiny model is a few milliseconds per step on one thread, dispatch-bound: it runs
at the speed of whichever core its main thread lands on. On this project's 2-vCPU CI machine (AMD
EPYC, shared) fresh processes fell into two speed groups (~2.4 and ~4 ms per step) by vCPU; pinned
with taskset, vCPU 0 gave 0.0368, 0.0392, 0.0349 s per request and vCPU 1 0.0600, 0.0535, 0.0327 s
(docs/PERFORMANCE.md, third session). So two tunes of the README's main job answered 0.0344 s and
0.0283 s for the same command. A study on the CPU therefore binds its trials and confirmation runs
to one core (the steadiest-fast one by a short dispatch benchmark, unless DITTUNE_CPUS names it) with
one torch thread (tuner/worker.py bind_cpus)."""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Iterable

ROUNDS = 5


def dispatch_seconds(ops: int = 300) -> float:
    """Seconds for `ops` tiny torch operations on one thread: the cost a tiny model's step pays."""
    import torch

    x = torch.ones(64)
    t = time.perf_counter()
    for _ in range(ops):
        x = x.add(1.0).mul_(0.5)
    return time.perf_counter() - t


def steadiest_core(cpus: Iterable[int] | None = None, rounds: int = ROUNDS,
                   probe: Callable[[], float] = dispatch_seconds) -> tuple[int, dict[int, float]]:
    """The core whose `probe` is fastest on average over `rounds` interleaved rounds (the mean, not
    the median: a core that is slow now and then is a core to avoid), and each core's mean. This
    process's affinity is restored afterwards."""
    cpus = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
    if len(cpus) == 1:
        return cpus[0], {}
    before = os.sched_getaffinity(0)
    times: dict[int, list[float]] = {c: [] for c in cpus}
    try:
        for _ in range(rounds):
            for c in cpus:
                os.sched_setaffinity(0, {c})
                times[c].append(probe())
    finally:
        os.sched_setaffinity(0, before)
    means = {c: statistics.fmean(v) for c, v in times.items()}
    return min(means, key=means.get), means
