"""Warm workers (tuner/runner.py Spares): a trial's process is started ahead and has imported what
the trial needs; the trial still runs in a process of its own, on the GPUs its environment names."""

import os
import sys

from dittune import db as D
from dittune.engine import flags as F
from dittune.tuner import TuneOptions, tune
from dittune.tuner.runner import WORKER_CMD, Spares, run_trial

from test_pool import H100S, pretend_h100s
from test_study import FAKE

FLAGS = F.config_to_dict(F.EngineConfig())
JOB = {"model": "flux-dev", "width": 1024, "height": 1024, "steps": 2, "guidance": 3.5, "device": "cuda", "flags": FLAGS}


def test_a_trial_runs_in_a_warm_worker_of_its_environment_and_each_in_its_own_process():
    spares = Spares(FAKE, "flux-dev", limit=3)
    gpu0, gpu1 = {"CUDA_VISIBLE_DEVICES": "GPU-0"}, {"CUDA_VISIBLE_DEVICES": "GPU-1"}
    try:
        first = run_trial(JOB, 30, FAKE, gpu0, spares=spares)  # none waits yet: a cold start
        assert first.status == "complete" and not first.warm and not first.dump["manifest"]["warm_worker"]
        runs = [run_trial(JOB, 30, FAKE, gpu0, spares=spares) for _ in range(2)]
        other = run_trial(JOB, 30, FAKE, gpu1, spares=spares)  # GPU 1's first: cold, its successor waits
        again = run_trial(JOB, 30, FAKE, gpu1, spares=spares)
    finally:
        spares.close()
    for out, gpu in [*((r, "GPU-0") for r in runs), (again, "GPU-1")]:
        assert out.status == "complete" and out.warm and out.dump["manifest"]["warm_worker"]
        assert out.dump["manifest"]["cuda_visible_devices"] == gpu
    assert not other.warm and other.dump["manifest"]["cuda_visible_devices"] == "GPU-1"
    pids = [r.dump["manifest"]["pid"] for r in (first, *runs, other, again)]
    assert len(set(pids)) == len(pids)  # one process per trial
    assert spares._waiting == []


def test_primed_workers_make_the_first_trial_on_each_gpu_warm():
    spares = Spares(FAKE, "flux-dev", limit=4)
    gpus = [{"CUDA_VISIBLE_DEVICES": f"GPU-{i}"} for i in range(2)]
    try:
        for env in gpus:
            spares.prime(env)
            spares.prime(env)  # once per environment
        assert len(spares._waiting) == 2
        firsts = [run_trial(JOB, 30, FAKE, env, spares=spares) for env in gpus]
    finally:
        spares.close()
    assert all(o.status == "complete" and o.warm for o in firsts)
    assert [o.dump["manifest"]["cuda_visible_devices"] for o in firsts] == ["GPU-0", "GPU-1"]


def test_waiting_workers_are_capped_closed_and_a_dead_one_is_replaced_by_a_cold_start():
    spares = Spares(FAKE, "flux-dev", limit=2)
    try:
        for i in range(4):  # four environments: the oldest waiting workers are ended
            assert spares.take({"CUDA_VISIBLE_DEVICES": f"GPU-{i}"}) is None
        waiting = list(spares._waiting)
        assert [dict(w.env_key)["CUDA_VISIBLE_DEVICES"] for w in waiting] == ["GPU-2", "GPU-3"]
        os.kill(waiting[0].proc.pid, 9)
        waiting[0].proc.wait()
        out = run_trial(JOB, 30, FAKE, {"CUDA_VISIBLE_DEVICES": "GPU-2"}, spares=spares)
        assert out.status == "complete" and not out.warm
    finally:
        spares.close()
    assert all(w.proc.poll() is not None for w in waiting) and spares._waiting == []
    assert spares.take({"CUDA_VISIBLE_DEVICES": "GPU-9"}) is None and spares._waiting == []  # closed: none started


def test_the_real_worker_waits_imported_then_runs_its_job(tmp_path):
    """The engine's own worker (`--wait MODEL`): imports, reads the job from stdin, measures."""
    spares = Spares(WORKER_CMD, "flux-dev-tiny", limit=1)
    job = dict(JOB, model="flux-dev-tiny", width=64, height=64, steps=1, device="cpu", warmup=0)
    try:
        assert spares.take({}) is None  # none waited: one starts now
        out = run_trial(job, 300, WORKER_CMD, {}, spares=spares)
    finally:
        spares.close()
    assert out.status == "complete", out.reason + out.stderr_tail
    assert out.warm and out.dump["model"] == "flux-dev-tiny" and out.dump["steps_s"]


def test_a_gpu_study_runs_its_trials_warm_and_leaves_no_worker_behind(tmp_path, monkeypatch):
    pretend_h100s(monkeypatch, H100S[:2])
    url = f"sqlite:///{tmp_path / 't.db'}"
    res = tune(TuneOptions("flux-dev", trials=6, db_url=url, worker_cmd=FAKE, confirm=0, patience=100,
                           max_gpus_per_trial=1, warm_workers=True), log=lambda m: None)
    rows = [t for t in D.trials(D.open_db(url), study_name=res.study) if t.status == "complete"]
    warm = [t.manifest["trial"]["warm_worker"] for t in rows]
    assert all(t.manifest["trial"]["wall_s"] > 0 for t in rows)
    assert warm.count(True) >= len(rows) - 2, warm  # each GPU's first trial starts cold
    assert all(t.manifest["warm_worker"] == w for t, w in zip(rows, warm))
    alive = [p for p in _children() if "--wait" in p]
    assert not alive, alive


def _children() -> list[str]:
    """Command lines of this test process's living descendants."""
    out = []
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            cmd = open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
        except OSError:
            continue
        if stat[1] == me and stat[0] != "Z":  # spares run in their own sessions; the parent is still us
            out.append(cmd)
    return out


if sys.platform != "linux":  # /proc
    del test_a_gpu_study_runs_its_trials_warm_and_leaves_no_worker_behind


def test_a_timed_out_trial_records_where_each_of_its_processes_was(tmp_path):
    """On a timeout every process of the trial's group writes its stacks (faulthandler on SIGUSR1,
    as the worker and the engine's ranks register it) before the group is killed."""
    hang = tmp_path / "hang.py"
    hang.write_text("import faulthandler, signal, subprocess, sys, time\n"
                    "faulthandler.register(signal.SIGUSR1, all_threads=True)\n"
                    "if len(sys.argv) == 2:  # the 'worker': starts a 'rank' in its group, as the launcher does\n"
                    "    subprocess.Popen([sys.executable, __file__, 'rank', 'x'])\n"
                    "def wait_for_the_collective():\n"
                    "    time.sleep(100)\n"
                    "wait_for_the_collective()\n")
    out = run_trial(JOB, 1.5, (sys.executable, str(hang)), {})
    assert out.status == "timeout" and "timed out after 2 s" in out.reason
    assert out.stderr_tail.count("wait_for_the_collective") >= 2, out.stderr_tail  # the worker's and the rank's
