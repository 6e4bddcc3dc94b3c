"""Confirmation's noise band and verdict (tuner/confirm.py): pure functions of the repeats."""

import pytest

from dittune.tuner.confirm import TARGET_BAND, band, pooled_spread, spread, verdict


def test_band_is_two_standard_errors_of_a_difference_of_medians_and_narrows_with_repeats():
    import statistics

    assert band([1.0]) is None and spread([1.0]) is None
    two = [1.0, 1.02]
    assert spread(two) == pytest.approx(statistics.stdev(two) / 1.01)
    assert band(two) == pytest.approx(2 * 2**0.5 * 1.2533 * spread(two) / 2**0.5)
    four = band([1.0, 1.02, 1.0, 1.02])
    assert four == pytest.approx(2 * 2**0.5 * 1.2533 * 1.4826 * 0.01 / 1.01 / 2)  # 1.4826 MAD > stdev here
    assert four < band(two)  # the same spread, twice the repeats: a narrower band of the median
    assert band(two, sigma=0.05) == pytest.approx(2 * 2**0.5 * 1.2533 * 0.05 / 2**0.5)  # a pooled spread wins
    # one disturbed run among five (seen on a busy two-core machine: 2.579 s among 0.06-0.43 s) does not swamp it
    assert spread([1.0, 1.01, 0.99, 1.0, 5.0]) == pytest.approx(1.4826 * 0.01)
    assert band([1.0, 1.01, 0.99, 1.0, 5.0]) < 0.03


def test_spread_of_three_or_four_runs_is_not_below_their_standard_deviation():
    """Three runs, two of them equal: the median absolute deviation is zero; the spread is not."""
    import statistics

    runs = [0.034, 0.053, 0.053]  # README's main job, pair H run 2 (docs/PERFORMANCE.md): read ±0.1% once
    assert spread(runs) == pytest.approx(statistics.stdev(runs) / 0.053)
    assert band(runs) > 0.25
    # a finalist whose three runs span 0.033-0.053 s is not "separated" from one at 0.043 s
    assert verdict({"a": [0.034, 0.033, 0.053], "b": [0.044, 0.043, 0.035]})[0] is None


def test_pooled_spread_is_weighted_by_degrees_of_freedom():
    runs = {"a": [1.0, 1.02], "b": [2.0, 2.1, 2.2], "c": [3.0]}
    want = ((1 * spread(runs["a"]) ** 2 + 2 * spread(runs["b"]) ** 2) / 3) ** 0.5
    assert pooled_spread(runs) == pytest.approx(want)
    assert pooled_spread({"c": [3.0]}) is None


def test_main_job_pair_h_ties_the_compile_variants_both_times():
    """README's main job run twice (pair H, docs/PERFORMANCE.md): the confirmation runs of its three
    finalists. Judged by the fastest one's own spread, run 2 "separated" full-scope max-autotune
    (0.028, 0.031, 0.033 s) from plain compile (0.044, 0.039, 0.039 s) while run 1 tied them: two
    different commands. With the spread pooled over the finalists (the second one's 0.034 against
    0.053 s is the same machine's noise) both runs find plain compile within the fastest one's band,
    and the rule's fewest-flags step picks the same command from both."""
    run1 = {"full": [0.031, 0.042, 0.027, 0.048, 0.033], "autotune": [0.038, 0.050, 0.032, 0.034, 0.049],
            "plain": [0.054, 0.035, 0.057, 0.034, 0.035]}
    run2 = {"full": [0.028, 0.031, 0.033], "autotune": [0.034, 0.053, 0.053], "plain": [0.044, 0.039, 0.039]}
    for runs in (run1, run2):
        outcome, tied = verdict(runs)
        assert outcome is None and {"full", "plain"} <= tied  # undecided: bands above 2%, measure on
    assert band(run2["full"]) < 0.2 < band(run2["full"], pooled_spread(run2))  # alone it would have separated


def test_verdicts():
    assert verdict({"a": [1.0, 1.001], "b": [1.2, 1.201]}) == ("separated", set())
    assert verdict({"a": [1.0, 1.001], "b": [1.0005, 1.0008]}) == ("tied within noise", {"a", "b"})
    # b lies within a's 10% band, which is wider than the 2% target: undecided, repeat
    assert verdict({"a": [1.0, 1.1], "b": [1.05, 1.06]})[0] is None
    # the slower one's spread widens the pooled band, but 20% still lies outside it...
    assert verdict({"a": [1.0, 1.001, 1.0], "b": [1.05, 1.3, 1.2]})[0] == "separated"
    # ...and a noisy finalist keeps a tight-looking fastest one from "separating" a close one
    assert verdict({"a": [1.0, 1.001, 1.0], "b": [1.03, 1.04, 1.03], "c": [1.5, 2.0, 1.2]})[0] is None
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
    """README's main job run twice on this project's CPU, pairs with the same answer (stored
    confirmation runs and latencies, bench/results/mainjob_pair*.json): each run's latency lies in
    the other's fresh-run band. In B-D two standard deviations (the large-n value) held only four of
    the six directions; Q-T store each round's fastest request."""
    import dataclasses

    from dittune.db.queries import Result

    pairs = {  # (latency s, confirmation runs s) of run 1 and run 2
        "B": ((0.04896, (0.0303, 0.0506, 0.0490)), (0.04728, (0.0444, 0.0502))),
        "C": ((0.03862, (0.0317, 0.0386, 0.0398)), (0.04812, (0.0481, 0.0529, 0.0467))),
        "D": ((0.04050, (0.0396, 0.0311, 0.0448, 0.0414)), (0.04801, (0.0464, 0.0480, 0.0509))),
        # 8d66fc6: each round's fastest request, three rounds or more in turns (docs/PERFORMANCE.md, ninth session)
        "Q": ((0.02914, (0.0287, 0.0291, 0.0296)), (0.02777, (0.0273, 0.0289, 0.0283))),
        "R": ((0.03008, (0.0313, 0.0285, 0.0334, 0.0292)), (0.02716, (0.0289, 0.0272, 0.0269))),
        "S": ((0.02808, (0.0259, 0.0281, 0.0286)), (0.02774, (0.0277, 0.0273, 0.0280))),
        "T": ((0.02914, (0.0305, 0.0291, 0.0281)), (0.02669, (0.026, 0.0275, 0.0298))),  # beside bench/busy_host.py on both cores
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
