"""Finalists in turns (tuner/turns.py) and the verdict on their ratios within rounds
(tuner/confirm.py): one process measures at a time, A B C A B C; drift between rounds cancels."""

import math
import sys
from pathlib import Path

import pytest

from dittune.tuner.confirm import paired, verdict
from dittune.tuner.turns import in_turns

WORKER = (sys.executable, str(Path(__file__).with_name("turns_worker.py")))


def _jobs(*extra):
    return [({"name": n, **x}, {}) for n, x in zip("abc", extra)]


def test_turns_alternate_and_never_overlap():
    outs = in_turns(_jobs({"load_s": 0.3}, {}, {}), slots=4, timeout_s=60, worker_cmd=WORKER, slot_s=0.1)
    assert [o.status for o in outs] == ["complete"] * 3
    slots = []  # (start, end, name) of every slot
    for o in outs:
        d = o.dump
        bounds = d["slots"] + [len(d["spans"])]
        assert len(d["slots"]) == 4 and d["slots"][0] == 0
        for b, e in zip(bounds, bounds[1:]):
            assert e > b  # every slot ran requests
            slots.append((d["spans"][b][0], d["spans"][e - 1][1], d["name"]))
            assert d["spans"][e - 1][0] - d["spans"][b][0] < 0.1  # none started after its slot's time
    slots.sort()
    assert "".join(n for _, _, n in slots) == "abc" * 4
    assert all(a[1] <= b[0] for a, b in zip(slots, slots[1:]))  # one at a time


def test_a_worker_that_fails_drops_out_and_the_others_go_on():
    outs = in_turns(_jobs({"crash": "before"}, {"crash": "during"}, {}), slots=3, timeout_s=60, worker_cmd=WORKER,
                    slot_s=0.05)
    assert [o.status for o in outs] == ["failed", "failed", "complete"]
    assert "exit code 1" in outs[0].reason and len(outs[2].dump["slots"]) == 3


def test_a_hung_worker_times_out():
    hang = (sys.executable, "-c", "import time; time.sleep(60)")
    (out,) = in_turns([({}, {})], slots=2, timeout_s=1.0, worker_cmd=hang)
    assert out.status == "timeout"


def test_ratios_within_rounds_cancel_the_hosts_drift():
    """The tiny FLUX's three compile variants in turns on this project's CPU (2026-12-01, one round:
    22.2, 27.7 and 27.4 ms) in four rounds whose host ran 1.0, 1.4, 0.8 and 1.2 times as slow (pair
    K's rounds moved so, docs/PERFORMANCE.md). Judged on their latencies the three are undecided;
    on their ratios within rounds full-scope max-autotune is separated."""
    base = {"full": 0.0222, "plain": 0.0277, "autotune": 0.0274}
    wobble = {"full": [1.0, 1.01, 0.99, 1.0], "plain": [1.01, 0.99, 1.0, 1.0], "autotune": [1.0, 1.0, 1.01, 0.99]}
    drift = [1.0, 1.4, 0.8, 1.2]
    runs = {a: [base[a] * w * d for w, d in zip(wobble[a], drift)] for a in base}
    assert verdict(runs)[0] is None
    ratios, levels = paired(runs)
    assert verdict(ratios) == ("separated", set())
    assert [round(v / levels[0], 6) for v in levels] == pytest.approx(drift, rel=0.02)
    # the product of a round's ratios is one: the level is the round's geometric mean
    assert all(math.isclose(math.prod(ratios[a][r] for a in runs), 1.0) for r in range(4))


def test_paired_leaves_one_finalist_alone():
    ratios, levels = paired({"a": [1.0, 1.1]})
    assert ratios == {"a": [1.0, 1.1]} and levels == [1.0, 1.0]
