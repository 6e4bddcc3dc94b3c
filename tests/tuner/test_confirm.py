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


def test_verdicts():
    assert verdict({"a": [1.0, 1.001], "b": [1.2, 1.201]}) == ("separated", set())
    assert verdict({"a": [1.0, 1.001], "b": [1.0005, 1.0008]}) == ("tied within noise", {"a", "b"})
    # b lies within a's 10% band, which is wider than the 2% target: undecided, repeat
    assert verdict({"a": [1.0, 1.1], "b": [1.05, 1.06]})[0] is None
    # the slower one's wide band does not make a tie: pick() judges by the fastest one's band
    assert verdict({"a": [1.0, 1.001], "b": [1.05, 1.3]})[0] == "separated"
    assert verdict({"a": [1.0, 1.001]}) == ("", set())  # one finalist: its band is within the target
    assert verdict({"a": [1.0, 1.0 + 3 * TARGET_BAND]})[0] is None
    assert verdict({"a": [1.0], "b": [1.2, 1.2]})[0] is None  # one run: no band yet
