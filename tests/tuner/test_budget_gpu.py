"""On the device (`pytest -m gpu`): budgets hold on a real card. A configuration recommended for X
GiB runs, in a separate `dittune generate` process, with NVML's usage of that process under X for
the whole run, sampled from outside by this test (not by dittune's own code).

The full check tunes FLUX.1-dev under 24 GiB with 3 trials and one confirmed finalist (several
minutes on an H200: run it alone, `python -m pytest -m gpu tests/tuner/test_budget_gpu.py -s`, whose
output line is the figure for docs/PERFORMANCE.md); DITTUNE_GPU_BUDGET_MODEL, DITTUNE_GPU_BUDGET and
DITTUNE_GPU_BUDGET_TRIALS change the model, the budget and the trials; DITTUNE_GPU_BUDGET_DB (a SQLite
path) resumes a study begun with the same `dittune tune` command in an earlier call."""

import json
import os
import shlex
import subprocess
import sys
import threading
import time

import pytest

pytestmark = pytest.mark.gpu

GiB = 2**30
MODEL = os.environ.get("DITTUNE_GPU_BUDGET_MODEL", "flux-dev")
BUDGET = os.environ.get("DITTUNE_GPU_BUDGET", "24GiB")
TRIALS = os.environ.get("DITTUNE_GPU_BUDGET_TRIALS", "3")  # the first preset seeds, repaired to fit the budget


class Watch:
    """NVML's usage of one process on GPU `index`, polled every 10 ms from this (another) process.
    Where NVML lists host PIDs the child's pid is not among them (a PID namespace): then the
    device's used memory above what it was before the child started stands in (the GPU is the
    test's alone)."""

    def __init__(self, index: int):
        import pynvml

        self.nv = pynvml
        pynvml.nvmlInit()
        self.h = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.base = pynvml.nvmlDeviceGetMemoryInfo(self.h).used
        self.process = self.device = 0
        self.stop = threading.Event()

    def run(self, pid: int) -> None:
        while not self.stop.is_set():
            procs = self.nv.nvmlDeviceGetComputeRunningProcesses(self.h)
            self.process = max(self.process, sum(p.usedGpuMemory or 0 for p in procs if p.pid == pid))
            self.device = max(self.device, self.nv.nvmlDeviceGetMemoryInfo(self.h).used - self.base)
            time.sleep(0.01)

    def peak(self) -> tuple[int, str]:
        return (self.process, "NVML process usage") if self.process else (self.device, "NVML device usage above idle")


def _run_watched(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, int, str]:
    w = Watch(0)
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t = threading.Thread(target=w.run, args=(p.pid,), daemon=True)
    t.start()
    out, err = p.communicate(timeout=1800)
    w.stop.set()
    t.join()
    peak, kind = w.peak()
    w.nv.nvmlShutdown()
    return subprocess.CompletedProcess(cmd, p.returncode, out, err), peak, kind


def _gpu0_env() -> dict[str, str]:
    from dittune.engine.gpu import detect

    d = detect()
    if not d:
        pytest.skip(d.reason)
    return dict(os.environ, CUDA_VISIBLE_DEVICES=d.gpus[0].uuid)  # NVML's GPU 0 is the watched one


def test_small_budget_caps_the_whole_process(tmp_path):
    """A budget a few GiB above a tiny model: the allocator's cap leaves the CUDA context room, the
    dump's binding peak is NVML's (it saw the process), above torch's reserved peak, within the budget."""
    env = _gpu0_env()
    dump = tmp_path / "d.json"
    p, peak, kind = _run_watched([sys.executable, "-m", "dittune", "generate", "--model", "flux-dev-tiny", "--device", "cuda",
                                  "--vram-budget", "3GiB", "--warmup", "1", "--max-warmup", "4", "--output",
                                  str(tmp_path / "x.png"), "--perf-dump-path", str(dump)], env)
    assert p.returncode == 0, p.stderr[-3000:]
    d = json.loads(dump.read_text())
    pv, outside = d["peak_vram"], d["manifest"]["outside_allocator"]
    print(f"flux-dev-tiny under 3GiB: watched {peak / GiB:.3f} GiB ({kind}); dump NVML peak "
          f"{(pv['nvml_process_peak_bytes'] or 0) / GiB:.3f} GiB, torch reserved {pv['torch_max_reserved_bytes'] / GiB:.3f}"
          f" GiB, context at start {outside['context_bytes_at_start']}, allowance {outside['allowance_bytes'] / GiB:.3f} GiB")
    assert outside["context_bytes_at_start"], "NVML did not see the worker's process at start (PID namespace?)"
    assert pv["nvml_process_peak_bytes"] > pv["torch_max_reserved_bytes"]
    assert peak <= 3 * GiB and pv["nvml_process_peak_bytes"] <= 3 * GiB


def test_recommended_for_x_gib_runs_under_x_gib(tmp_path):
    from dittune.engine.budget import parse_budget

    env = _gpu0_env()
    limit = parse_budget(BUDGET).resolve(None)
    # DITTUNE_GPU_BUDGET_DB: a study an earlier call began (the device's calls are limited in time):
    # the same tune command resumes it (nothing re-measured, its finalist confirmed if it was not yet)
    url = f"sqlite:///{os.environ.get('DITTUNE_GPU_BUDGET_DB') or tmp_path / 'budget.db'}"
    tune = subprocess.run([sys.executable, "-m", "dittune", "tune", MODEL, "--vram-budget", BUDGET, "--trials", TRIALS,
                           "--gpus", "0", "--confirm", "1", "--db", url], env=env, capture_output=True, text=True,
                          timeout=3600)
    assert tune.returncode == 0, tune.stdout[-3000:] + tune.stderr[-3000:]
    rec = subprocess.run([sys.executable, "-m", "dittune", "recommend", MODEL, "--vram-budget", BUDGET, "--format", "json",
                          "--db", url], env=env, capture_output=True, text=True)
    assert rec.returncode == 0, rec.stderr
    (row,) = json.loads(rec.stdout)
    assert row["peak_kind"] == "nvml_process", "the stored peak is not NVML's whole-process peak"
    assert row["peak_vram_bytes"] <= limit
    # The recommended command as the user runs it, plus the re-measure flags (warm-up, perf dump).
    cmd = shlex.split(row["remeasure"].replace("remeasure.json", str(tmp_path / "re.json")))
    cmd = [sys.executable, "-m", "dittune", *cmd[1:], "--output", str(tmp_path / "re.png")]
    p, peak, kind = _run_watched(cmd, env)
    assert p.returncode == 0, p.stderr[-3000:]
    d = json.loads((tmp_path / "re.json").read_text())
    off = d["latency_s"] / row["latency_s"] - 1
    print(f"{MODEL} under {BUDGET}: trial {row['trial_id']} stored {row['latency_s']:.4f} s "
          f"±{row['noise_band'] or 0:.2%} ({row['noise_band_source']}), peak {row['peak_vram_bytes'] / GiB:.2f} GiB "
          f"({row['peak_kind']}); re-measured {d['latency_s']:.4f} s ({off:+.2%}), watched {peak / GiB:.2f} GiB ({kind}), "
          f"torch reserved {d['peak_vram']['torch_max_reserved_bytes'] / GiB:.2f} GiB; {row['command']}")
    assert peak < limit, f"{kind} {peak / GiB:.2f} GiB over the {BUDGET} budget"
    assert abs(off) <= 0.10  # a sanity bound; the figure against the band goes to docs/PERFORMANCE.md
