"""Warm-up until two consecutive requests agree (engine/run.py): at least --warmup requests, more
up to --max-warmup while the last two differ by over WARMUP_AGREE; the perf dump says how many ran.
(Several ranks: tests/engine/test_parallel.py's two-rank CLI run warms up this way.)"""

import pytest

from dittune.engine import run as R
from dittune.engine.errors import EngineError

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

