"""Warm-up until two consecutive requests agree (engine/run.py): at least --warmup requests, more
up to --max-warmup while the last two differ by over WARMUP_AGREE; the perf dump says how many ran."""

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


def test_ranks_run_the_same_requests(tmp_path):
    """Several ranks warm up together (their requests hold collectives): rank 0's decision binds
    every rank, so a rank whose own timings would stop earlier does not leave the others waiting."""
    import json
    import subprocess
    import sys

    dump = tmp_path / "d.json"
    p = subprocess.run([sys.executable, "-m", "dittune", "generate", "--model", "flux-dev-tiny", "--device", "cpu",
                        "--steps", "2", "--width", "64", "--height", "64", "--num-gpus", "2", "--ring-degree", "2",
                        "--warmup", "1", "--max-warmup", "4", "--output", str(tmp_path / "x.png"),
                        "--perf-dump-path", str(dump)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    d = json.loads(dump.read_text())
    assert 1 <= d["warmup_requests"] <= 4 and len(d["warmup"]["latencies_s"]) == d["warmup_requests"] + 1
