"""Confirmation's noise band and verdict (tuner/confirm.py): pure functions of the repeats."""

import pytest

from dittune.tuner.confirm import TARGET_BAND, band, verdict


def test_band_is_two_standard_errors_of_the_median_and_narrows_with_repeats():
    assert band([1.0]) is None
    assert band([1.0, 1.02]) == pytest.approx(0.02 / 1.01)  # two runs: their difference over the median
    four = band([1.0, 1.02, 1.0, 1.02])
    assert four == pytest.approx(2 * 1.2533 * 1.4826 * 0.01 / 2 / 1.01)
    assert four < band([1.0, 1.02])  # the same spread, twice the repeats: a narrower band of the median
    # one disturbed run (seen on a busy two-core machine: 2.579 s among 0.06-0.43 s) does not swamp it
    assert band([1.0, 1.01, 0.99, 1.0, 5.0]) < 0.02


def test_band_of_three_or_four_runs_is_not_below_their_standard_deviation():
    """Three runs, two of them equal: the median absolute deviation is zero; the band is not."""
    import statistics

    runs = [0.034, 0.053, 0.053]  # README's main job, pair H run 2 (docs/PERFORMANCE.md): read ±0.1% before
    assert band(runs) == pytest.approx(2 * 1.2533 * statistics.stdev(runs) / 3**0.5 / 0.053)
    assert band(runs) > 0.25
    # a finalist whose three runs span 0.033-0.053 s is not "separated" from one at 0.043 s
    assert verdict({"a": [0.034, 0.033, 0.053], "b": [0.044, 0.043, 0.035]})[0] is None


def test_verdicts():
    assert verdict({"a": [1.0, 1.001], "b": [1.2, 1.201]}) == ("separated", set())
    assert verdict({"a": [1.0, 1.001], "b": [1.0005, 1.0008]}) == ("tied within noise", {"a", "b"})
    # b lies within a's 10% band, which is wider than the 2% target: undecided, repeat
    assert verdict({"a": [1.0, 1.1], "b": [1.05, 1.06]})[0] is None
    # the slower one's wide band does not make a tie: pick() judges by the fastest one's band...
    assert verdict({"a": [1.0, 1.001, 1.0], "b": [1.05, 1.3, 1.2]})[0] == "separated"
    # ...but two runs that disagree by more than the target say too little: measure on. (The CPU
    # main job: 0.030/0.032 against 0.042/0.052 s was called separated; 5 runs each then tied.)
    assert verdict({"a": [1.0, 1.001], "b": [1.05, 1.3]})[0] is None
    assert verdict({"a": [0.030, 0.032], "b": [0.042, 0.052]})[0] is None
    assert verdict({"a": [1.0, 1.001]}) == ("", set())  # one finalist: its band is within the target
    assert verdict({"a": [1.0, 1.0 + 3 * TARGET_BAND]})[0] is None
    assert verdict({"a": [1.0], "b": [1.2, 1.2]})[0] is None  # one run: no band yet


def test_fresh_run_band_is_the_runs_spread_not_the_medians():
    """Five fresh processes of one command: the band a sixth lands in (95% prediction interval) is
    Student's t(4) standard deviations of theirs, widened by the median's uncertainty; the median's
    own band is narrower."""
    import dataclasses
    import math
    import statistics

    from dittune.db.queries import Result

    runs = (0.040, 0.052, 0.066, 0.055, 0.059)  # flux-dev-tiny on this project's 2-core CPU, 5 processes
    fields = {f.name: None for f in dataclasses.fields(Result) if f.default is dataclasses.MISSING}
    r = Result(**{**fields, "status": "confirmed", "flags": {}}, repeats=runs)
    med, sd = statistics.median(runs), statistics.stdev(runs)
    assert math.isclose(r.fresh_band, 2.776 * sd * math.sqrt(1 + 1.57 / 5) / med)
    assert r.fresh_band > band(list(runs))  # confirm.band: the median's standard error, for ties
    assert all(abs(x / med - 1) <= r.fresh_band for x in runs)
    assert dataclasses.replace(r, repeats=(0.05,)).fresh_band is None
    two = dataclasses.replace(r, repeats=(0.04, 0.05)).fresh_band
    assert math.isclose(two, 12.706 * (0.01 / math.sqrt(2)) * math.sqrt(1 + 1.57 / 2) / 0.045)


def test_fresh_run_band_holds_the_main_jobs_reruns():
    """README's main job run twice on this project's CPU, three pairs with the same answer (stored
    confirmation runs and latencies, bench/results/mainjob_pair*.json): each run's latency lies in
    the other's fresh-run band, which two standard deviations (the large-n value) held in only four
    of the six directions."""
    import dataclasses

    from dittune.db.queries import Result

    pairs = {  # (latency s, confirmation runs s) of run 1 and run 2
        "B": ((0.04896, (0.0303, 0.0506, 0.0490)), (0.04728, (0.0444, 0.0502))),
        "C": ((0.03862, (0.0317, 0.0386, 0.0398)), (0.04812, (0.0481, 0.0529, 0.0467))),
        "D": ((0.04050, (0.0396, 0.0311, 0.0448, 0.0414)), (0.04801, (0.0464, 0.0480, 0.0509))),
    }
    fields = {f.name: None for f in dataclasses.fields(Result) if f.default is dataclasses.MISSING}
    for name, runs in pairs.items():
        for (lat, repeats), (other, _) in (runs, runs[::-1]):
            r = Result(**{**fields, "status": "confirmed", "flags": {}}, repeats=repeats)
            assert abs(other / lat - 1) <= r.fresh_band, (name, lat, other, r.fresh_band)


def test_t_quantile():
    from dittune.db.queries import t_975

    assert t_975(1) == 12.706 and t_975(4) == 2.776 and t_975(30) == 2.042
    for df, exact in ((40, 2.0211), (60, 2.0003), (120, 1.9799)):
        assert abs(t_975(df) - exact) < 1e-3
    assert t_975(31) < t_975(30) and t_975(10**6) > 1.959
    with pytest.raises(ValueError):
        t_975(0)
