"""A real `dittune tune` of the tiny FLUX on the CPU, end to end into SQLite, then recommend and
export on what it stored. The real engine runs in worker processes."""

import json
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    url = f"sqlite:///{tmp / 'dittune.db'}"
    p = subprocess.run(
        [sys.executable, "-m", "dittune", "tune", "flux-dev-tiny", "--trials", "3", "--db", url, "--device", "cpu",
         "--fix", "enable-torch-compile=false", "--confirm", "1"],
        capture_output=True, text=True, timeout=600)
    return url, p


def test_tune_prints_frontier_and_command(tuned):
    url, p = tuned
    assert p.returncode == 0, p.stderr[-3000:]
    assert "latency / VRAM frontier" in p.stdout
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("dittune generate --model flux-dev-tiny --width 128 --height 128 --steps 8")
    assert "every configuration of the space (1) was tried" in p.stdout


def test_recommend_and_export_read_the_study(tuned, tmp_path):
    url, _ = tuned
    r = subprocess.run([sys.executable, "-m", "dittune", "recommend", "flux-dev-tiny", "--db", url, "--format", "json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert row["gpu"] == "cpu" and row["latency_s"] > 0 and row["status"] == "confirmed"
    # on the CPU: each round's fastest request, and at least three rounds (in turns)
    assert row["latency_stat"] == "fastest" and len(row["repeats_s"]) >= 3
    assert row["command"].startswith("dittune generate --model flux-dev-tiny")
    out = tmp_path / "best.sh"
    e = subprocess.run([sys.executable, "-m", "dittune", "export", "--db", url, "--format", "sh", "-o", str(out)],
                       capture_output=True, text=True)
    assert e.returncode == 0, e.stderr
    assert "dittune generate --model flux-dev-tiny" in out.read_text()


def test_stored_trial_carries_the_real_manifest(tuned):
    from dittune import db as D

    url, _ = tuned
    rows = D.trials(D.open_db(url))
    complete = [t for t in rows if t.status == "complete"]
    assert complete
    m = complete[0].manifest
    assert m["model"] == "flux-dev-tiny" and m["weights"] == "synthetic" and m["attention"]["calls"]["torch_sdpa"] > 0
    assert complete[0].step_median_s > 0 and len(complete[0].step_times) == 3


def test_every_measurement_runs_on_one_core_with_one_thread(tuned):
    """Trials and confirmation runs of a CPU study share one core (tuner/cores.py): the manifest
    of each says where it ran."""
    from dittune import db as D

    url, p = tuned
    assert "CPU trials run on core" in p.stdout + p.stderr
    rows = [t for t in D.trials(D.open_db(url)) if t.status in ("complete", "confirmed")]
    assert {t.status for t in rows} == {"complete", "confirmed"}
    hosts = {(t.manifest["host"]["cpus"], t.manifest["host"]["torch_threads"]) for t in rows}
    assert len(hosts) == 1 and next(iter(hosts))[1] == 1 and next(iter(hosts))[0].isdigit(), hosts
