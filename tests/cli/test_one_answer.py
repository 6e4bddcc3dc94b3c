"""Done-when of issue 14: on the same database, `tune`'s answer, `recommend`, `studies` and
`export` name the same configuration, for latency-only and frontier studies, with and without a
budget, including ties within noise (a single run's band, and confirmation repeats of a jittery
engine). The studies are stored by the tuner's own code path against the fake engine."""

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dittune import db as D
from dittune.cli import app
from dittune.tuner import TuneOptions, emit, tune

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tuner"))

from test_study import FAKE, pretend_h100  # noqa: E402

SCENARIOS = {
    # name: (objective, budget, confirm, engine noise, single-run step spread)
    "latency-nobudget": ("latency", None, 2, 0.0, 0.0),
    # a fake NVML: every process holds 0.75 GiB outside the allocator (the H200's FLUX figure)
    "frontier-24GiB": ("frontier", "24GiB", 2, 0.0, 0.0),
    # a 30% single-run band: the fast path's leaner variants (text encoders offloaded) tie with it
    "frontier-tie-single-run": ("frontier", None, 0, 0.0, 0.3),
    # run-to-run jitter of 3%: the confirmation rounds decide between separated and tied
    "latency-24GiB-jitter": ("latency", "24GiB", 3, 0.03, 0.0),
}


def cli(*args):
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, r.output
    return r.stdout


@pytest.fixture(scope="module", params=list(SCENARIOS))
def tuned(request, tmp_path_factory):
    objective, budget, confirm, noise, spread = SCENARIOS[request.param]
    url = f"sqlite:///{tmp_path_factory.mktemp(request.param) / 'dittune.db'}"
    with pytest.MonkeyPatch.context() as mp:
        pretend_h100(mp)
        mp.setenv("FAKE_ENGINE_NOISE", str(noise))
        mp.setenv("FAKE_ENGINE_SPREAD", str(spread))
        if request.param == "frontier-24GiB":
            mp.setenv("FAKE_ENGINE_OUTSIDE_GIB", "0.75")
        # 6 trials: the preset's seeds, the lean one (text encoders offloaded) last; 4 elsewhere
        trials = 6 if request.param == "frontier-tie-single-run" else 4
        res = tune(TuneOptions("flux-dev", vram_budget=budget, trials=trials, db_url=url, worker_cmd=FAKE, confirm=confirm,
                               patience=100, seed=0, objective=objective), log=lambda m: None)
    return request.param, url, budget, res


def test_tune_recommend_studies_export_agree(tuned):
    name, url, budget, res = tuned
    w = res.winner
    fits = ["--vram-budget", budget] if budget else []
    (rec,) = json.loads(cli("recommend", "flux-dev", "--db", url, "--format", "json", *fits))
    assert rec["trial_id"] == w.trial_id and rec["command"] == emit.generate_command(w)  # tune's last line
    assert rec["rule"] == w.rule and rec["latency_s"] == w.latency_s
    (summary,) = D.studies(D.open_db(url))
    assert summary.best.trial_id == w.trial_id
    listed = cli("studies", "--db", url)
    assert f"{w.latency_s:.3f}" in listed and f" {w.trial_id} " in listed and rec["noise_band_source"] in listed
    exported = json.loads(cli("export", "--db", url, "--format", "json", *fits))
    assert [x["trial_id"] for x in exported if x["best"]] == [w.trial_id]
    assert f"trial {w.trial_id}, {w.latency_s:.3f} s measured" in cli("export", "--db", url, "--format", "sh", *fits)
    text = cli("recommend", "flux-dev", "--db", url, *fits)
    assert emit.generate_command(w) in text.splitlines()[1] and f"trial {w.trial_id}" in text
    if budget:
        assert w.peak_vram_bytes <= 24 * 2**30
    if name == "frontier-24GiB":  # the budget bound NVML's whole footprint; torch's reserved peak is kept beside it
        assert rec["peak_kind"] == "nvml_process" and "NVML process peak" in text
        assert f"torch reserved {rec['torch_reserved_peak_bytes'] / 2**30:.2f} GiB" in text  # text carries JSON's fields
        assert rec["torch_reserved_peak_bytes"] == rec["peak_vram_bytes"] - 3 * 2**30 // 4
        done = [t for t in D.trials(D.open_db(url)) if t.status in ("complete", "confirmed")]
        assert done and all(t.manifest["evidence"]["peak_kind"] == "nvml_process" for t in done)
        assert all(t.peak_vram_bytes == t.manifest["evidence"]["nvml_peak_bytes"] <= 24 * 2**30 for t in done)
    else:
        assert rec["peak_kind"] in ("torch_reserved", None)
    assert rec["warmup_requests"] == 1
    assert rec["measured_requests"] == 3 and "median of 3 measured requests" in text  # the tuner's measure_s
    # the evidence says where the band comes from, in text and JSON alike
    assert rec["noise_band_source"] in text
    if name == "frontier-tie-single-run":
        assert rec["noise_band_source"] == "single run (spread of its steps)"
        assert w.rule.startswith("within the noise band ±30.0% (single run (spread of its steps)) of the fastest")
        fastest = min(D.measured(D.open_db(url)), key=lambda r: r.latency_s)
        assert w.trial_id != fastest.trial_id and w.peak_vram_bytes < fastest.peak_vram_bytes
    elif res.winner.status == "confirmed":
        assert rec["noise_band_source"].startswith("confirmation repeats (n=")
        assert len(rec["repeats_s"]) >= 2 and rec["verdict"] in ("separated", "tied within noise")
        # where a fresh run should land: the runs' own spread (Student's t), in text and JSON; not
        # ordered against the tie band, whose spread is pooled over the finalists (tuner/confirm.py)
        assert rec["fresh_run_band"] is not None and rec["fresh_run_band"] >= 0
        assert f"a fresh run: ±{rec['fresh_run_band']:.1%}" in text
    else:
        assert rec["fresh_run_band"] is None and "a fresh run" not in text
