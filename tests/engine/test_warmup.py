"""Warm-up until two consecutive requests agree (engine/run.py): at least --warmup requests, more
up to --max-warmup while the last two differ by over WARMUP_AGREE; the perf dump says how many ran.
(Several ranks: tests/engine/test_parallel.py's two-rank CLI run warms up this way.)"""

import pytest

from dittune.engine import run as R
from dittune.engine.errors import EngineError
from dittune.engine.flags import config_from_argv

TINY = dict(model="flux-dev-tiny", steps=2, width=64, height=64, device="cpu")


@pytest.mark.parametrize("agree, min_, max_, ran", [
    (True, 1, 4, 1),  # the first two agree: one warm-up, as before
    (False, 1, 4, 4),  # never settles: capped
    (False, 0, None, 0),  # no warm-up asked, none run
    (False, 2, None, 2),  # --warmup alone stays a fixed count
])
def test_warmup_runs_until_two_requests_agree(monkeypatch, agree, min_, max_, ran):
    monkeypatch.setattr(R, "_agree", lambda a, b: agree)
    d = R.generate(R.GenerateRequest(**TINY, warmup=min_, max_warmup=max_)).dump
    assert d["warmup_requests"] == ran and len(d["warmup"]["latencies_s"]) == ran + 1
    assert d["warmup"]["settled"] is (agree and ran >= 1)
    assert d["latency_s"] == pytest.approx(d["warmup"]["latencies_s"][-1])  # the last request is the measured one


def test_agreement_is_within_five_percent():
    assert R._agree(1.0, 1.049) and not R._agree(1.0, 1.06) and not R._agree(1.361, 0.123)


def test_max_below_min_is_refused():
    with pytest.raises(EngineError, match="--max-warmup 1 must be >= --warmup 2"):
        R.generate(R.GenerateRequest(**TINY, warmup=2, max_warmup=1))


def test_measured_requests_until_measure_s_and_their_median(monkeypatch):
    """After warm-up, requests are measured until --measure-s seconds of them (at most MEASURE_CAP);
    the dump's latency is their median, and without --measure-s one request is measured."""
    draws = iter([0.5, 0.1, 0.3])  # no warm-up: these are the measured requests' latencies
    monkeypatch.setattr(R, "_latency", lambda times, steps: next(draws))
    monkeypatch.setattr(R, "MEASURE_CAP", 3)
    d = R.generate(R.GenerateRequest(**TINY, measure_s=1e9)).dump
    m = d["measured"]
    assert (m["requests"], m["min_s"], m["latencies_s"], m["fastest_s"]) == (3, 1e9, [0.5, 0.1, 0.3], 0.1)
    assert len(m["step_medians_s"]) == 3 and all(x > 0 for x in m["step_medians_s"])  # each request's own
    assert d["latency_s"] == 0.3 and d["warmup_requests"] == 0
    monkeypatch.undo()
    one = R.generate(R.GenerateRequest(**TINY, warmup=1)).dump
    assert one["measured"]["requests"] == 1 and one["latency_s"] == one["measured"]["latencies_s"][0]


def test_measured_requests_stop_at_measure_s():
    d = R.generate(R.GenerateRequest(**TINY, warmup=1, measure_s=1e-9)).dump  # the first request covers it
    assert d["measured"]["requests"] == 1
    d = R.generate(R.GenerateRequest(**TINY, warmup=1, measure_s=1.0)).dump  # a tiny request: a few ms (0.2 s once saw one, under load)
    assert 2 <= d["measured"]["requests"] <= R.MEASURE_CAP
    assert d["latency_s"] in d["measured"]["latencies_s"]


@pytest.mark.parametrize("bad", [-0.1, float("nan")])
def test_negative_measure_s_is_refused(bad):
    with pytest.raises(EngineError, match="--measure-s .* must be >= 0 seconds"):
        R.generate(R.GenerateRequest(**TINY, measure_s=bad))


def test_the_tuners_measure_window_is_longer_on_the_cpu():
    """The CPU host's contention changes between seconds: the tuner measures there over 3 s, on a GPU 0.5 s."""
    assert R.measure_window("cpu") == R.MEASURE_S_CPU == 3.0
    assert R.measure_window("cuda") == R.MEASURE_S == 0.5
    assert R.MEASURE_S_CPU / 0.03 < R.MEASURE_CAP  # a 30 ms request is not cut off by the cap


def test_a_pace_decides_the_measured_requests_and_the_warm_ups_last_is_not_one(monkeypatch):
    """GenerateRequest.pace (the tuner's turns with other processes, tuner/turns.py): asked before
    every measured request with the count so far; the warm-up loop's last request (other processes
    may have been loading beside it) is not measured."""
    asked = []

    def pace(n):
        asked.append(n)
        return n < 3

    draws = iter([0.9, 0.5, 0.1, 0.3, 0.2])  # one warm-up, its agreeing successor, then 3 measured
    monkeypatch.setattr(R, "_latency", lambda times, steps: next(draws))
    d = R.generate(R.GenerateRequest(**TINY, warmup=1, max_warmup=1, pace=pace)).dump
    assert asked == [0, 1, 2, 3]
    assert d["warmup_requests"] == 2 and d["measured"]["latencies_s"] == [0.1, 0.3, 0.2]
    assert d["latency_s"] == 0.2


def test_a_pace_that_stops_at_once_or_several_ranks_is_refused():
    with pytest.raises(EngineError, match="no request was measured"):
        R.generate(R.GenerateRequest(**TINY, pace=lambda n: False))
    with pytest.raises(EngineError, match="paced measurement .* one process"):
        R.generate(R.GenerateRequest(**TINY, pace=lambda n: True, flags=config_from_argv(["--num-gpus", "2", "--ulysses-degree", "2"])))


def test_stored_latency_is_the_median_request_on_a_gpu_and_the_fastest_on_the_cpu():
    """perf.run_latency: the tuner's figure for the workload's steps, from requests that ran fewer
    (the tuner's measure steps): the median request's on a GPU; on the CPU the request fastest at
    the workload's steps, each with its own step median (not the fastest at the steps it ran)."""
    from dittune.engine.perf import latency_stat, run_latency

    dump = {"stages": {"encode_s": 0.1, "prepare_s": 0.0, "denoise_s": 0.9, "decode_s": 0.1}, "steps_s": [0.2] * 4,
            "step_median_s": 0.2, "measured": {"latencies_s": [1.0, 1.1, 1.2], "step_medians_s": [0.2, 0.1, 0.25]}}
    assert latency_stat("cpu") == "fastest" and latency_stat("cuda") == "median"
    assert run_latency(dump, 8, "cuda") == (pytest.approx(0.1 + 0.1 + 8 * 0.2 + 0.1), "median")  # the median request's
    assert run_latency(dump, 8, "cpu") == (pytest.approx(1.1 + 4 * 0.1), "fastest")  # 1.8, 1.5, 2.2 at eight steps
    assert run_latency(dump, 4, "cpu") == (pytest.approx(1.0), "fastest")  # at the steps they ran
    older = {**dump, "measured": {"requests": 3, "latencies_s": [1.0, 1.1, 1.2]}}  # no per-request step medians
    assert run_latency(older, 8, "cpu") == run_latency(dump, 8, "cuda")  # the median, and it says so

