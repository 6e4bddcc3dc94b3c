"""Tune jobs through the API: the real `dittune tune` CLI in a child process (the engine faked,
tests/service/tune_driver.py), progress, a queue per device, SIGTERM through DELETE keeping the
measured trials, a failed job's error, and a restarted service reporting the jobs it had."""

import sys
import time
from pathlib import Path

from dittune import db as D

from conftest import TOKEN, make_client

DRIVER = [sys.executable, str(Path(__file__).with_name("tune_driver.py"))]
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def poll(client, job_id, until, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        view = client.get(f"/v1/jobs/{job_id}").json()
        if until(view):
            return view
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} never reached the condition: {view}")


def test_jobs_run_stop_fail_and_survive_a_restart(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'dittune.db'}"
    D.open_db(url, create=True).dispose()
    jobs = tmp_path / "jobs"
    monkeypatch.setenv("FAKE_ENGINE_SLEEP", "0.5")
    body = {"model": "flux-dev", "trials": 12, "confirm": 0, "study": "svc-job"}
    with make_client(url, jobs_dir=jobs, command=DRIVER) as c:
        job = c.post("/v1/tune", json=body, headers=AUTH)
        assert job.status_code == 202, job.text
        job = job.json()
        assert job["state"] == "running" and job["argv"][:2] == ["tune", "flux-dev"] and "--db" not in job["argv"]
        queued = c.post("/v1/tune", json={**body, "study": "svc-job-2"}, headers=AUTH).json()
        assert queued["state"] == "queued"  # one job at a time on GPU 0
        failing = c.post("/v1/tune", json={"model": "flux-dev", "trials": 2, "gpu": 1}, headers=AUTH).json()
        assert failing["state"] == "running"  # another device: runs beside the first
        stopped = c.delete(f"/v1/jobs/{queued['id']}", headers=AUTH).json()
        assert stopped["state"] == "stopped" and stopped["note"] == "stopped before it started"
        failed = poll(c, failing["id"], lambda v: v["state"] != "running")
        assert failed["state"] == "failed" and "--gpu 1: this machine has GPUs 0..0" in failed["note"]
        assert not failed["resumable"]
        running = poll(c, job["id"], lambda v: v["trials_done"] >= 2)
        assert running["state"] == "running" and running["best_so_far"]["latency_s"] > 0 and running["eta_s"] > 0
        live = c.get("/v1/studies/svc-job")  # reads share the database with the tune writing to it
        assert live.status_code == 200 and len(live.json()["trial_rows"]) >= 2
        assert c.get("/v1/recommend?model=flux-dev").status_code == 200

    # the service restarts while the job runs: the new one adopts it, and stops it
    with make_client(url, jobs_dir=jobs, command=DRIVER) as c:
        ids = [j["id"] for j in c.get("/v1/jobs").json()]
        assert ids == [job["id"], queued["id"], failing["id"]]
        view = c.get(f"/v1/jobs/{job['id']}").json()
        assert view["state"] == "running" and "adopted" in view["note"]
        assert c.delete(f"/v1/jobs/{job['id']}").status_code == 401
        c.delete(f"/v1/jobs/{job['id']}", headers=AUTH)
        ended = poll(c, job["id"], lambda v: v["state"] != "running", timeout=60)
        assert ended["state"] == "stopped" and ended["resumable"] and ended["study"] == "svc-job"
        assert "interrupted" in ended["stopped"] and ended["best"][0]["study"] == "svc-job"
    kept = [t for t in D.trials(D.open_db(url), study_name="svc-job") if t.status == "complete"]
    assert len(kept) >= ended["trials_done"] >= 2  # every measured trial was saved

    # and once more, with nothing running: every job is reported as it ended
    with make_client(url, jobs_dir=jobs, command=DRIVER) as c:
        states = {j["id"]: j["state"] for j in c.get("/v1/jobs").json()}
        assert states == {job["id"]: "stopped", queued["id"]: "stopped", failing["id"]: "failed"}


def test_a_job_whose_process_vanished_is_reported_interrupted(tmp_path):
    """A record left 'running' by a service that died with its job (e.g. the host rebooted)."""
    import json

    url = f"sqlite:///{tmp_path / 'dittune.db'}"
    D.open_db(url, create=True).dispose()
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    rec = {"id": "abc123", "state": "running", "request": {"model": "flux-dev"}, "argv": ["tune", "flux-dev"],
           "lane": "gpu0", "trials_target": 4, "created_at": "2026-11-30T00:00:00+00:00",
           "started_at": "2026-11-30T00:00:01+00:00", "ended_at": None, "pid": 2**22 + 7, "returncode": None,
           "stop_requested": False, "note": ""}
    (jobs / "abc123.json").write_text(json.dumps(rec))
    (jobs / "abc123.log").write_text("trial 0: 5.620 s, peak 38.00 GiB: (defaults)\n")
    with make_client(url, jobs_dir=jobs) as c:
        v = c.get("/v1/jobs/abc123").json()
    assert v["state"] == "interrupted" and v["resumable"] and v["trials_done"] == 1
    assert "while the service was down" in v["note"]
