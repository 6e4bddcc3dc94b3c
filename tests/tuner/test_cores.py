"""CPU studies measure on one core: the steadiest-fast one by a dispatch benchmark."""

import os

import pytest

from dittune.tuner.cores import dispatch_seconds, steadiest_core


def test_the_core_slow_now_and_then_loses_and_affinity_is_restored():
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two cores")
    a, b = cpus[:2]
    calls = {a: 0, b: 0}

    def probe():  # core a: fast but slow every third round (its mean is worse); core b: steady
        (c,) = os.sched_getaffinity(0)
        calls[c] += 1
        return {a: 1.0 if calls[a] % 3 == 0 else 0.1, b: 0.3}[c]

    core, means = steadiest_core([a, b], rounds=6, probe=probe)
    assert core == b and means[a] > means[b]
    assert calls == {a: 6, b: 6}
    assert sorted(os.sched_getaffinity(0)) == cpus


def test_one_core_needs_no_benchmark():
    c = min(os.sched_getaffinity(0))
    assert steadiest_core([c], probe=lambda: 1 / 0) == (c, {})
    assert 0 < dispatch_seconds(10) < 1
