"""Which measured request a run is stored by (engine.perf.latency_stat): on the CPU the fastest,
on a GPU the median; the record, the answer's evidence and its re-measure hint say which."""

import dataclasses
from types import SimpleNamespace

import pytest

from dittune.db.queries import Result
from dittune.engine import run as R
from dittune.engine.flags import config_from_argv
from dittune.tuner import emit
from dittune.tuner.runner import Outcome
from dittune.tuner.state import record_from


def test_a_cpu_run_stores_its_fastest_request_and_a_gpu_run_its_median(monkeypatch):
    monkeypatch.setattr(R, "MEASURE_CAP", 4)  # four measured requests however slow the machine (a 0.5 s window once held one)
    d = R.generate(R.GenerateRequest(model="flux-dev-tiny", steps=2, width=64, height=64, device="cpu", warmup=1,
                                     measure_s=1e9)).dump
    assert d["measured"]["requests"] == 4
    out = Outcome("complete", d, "", "", 1.0)
    cpu = record_from(out, config_from_argv([]), "", 0, SimpleNamespace(steps=2, device="cpu"), None)
    assert cpu.latency_s == pytest.approx(d["measured"]["fastest_s"]) and cpu.latency_s <= d["latency_s"]
    assert cpu.manifest["evidence"]["latency_stat"] == "fastest"
    gpu = record_from(out, config_from_argv([]), "", 0, SimpleNamespace(steps=2, device="cuda"), None)
    assert gpu.latency_s == pytest.approx(d["latency_s"]) and gpu.manifest["evidence"]["latency_stat"] == "median"


def test_the_answer_names_the_statistic():
    fields = {f.name: None for f in dataclasses.fields(Result) if f.default is dataclasses.MISSING}
    import datetime as dt

    base = {**fields, "trial_id": 7, "study": "s", "model": "flux-dev-tiny", "width": 128, "height": 128, "steps": 8,
            "guidance": 3.5, "gpu": "cpu", "gpu_memory_bytes": 0, "flags": {}, "argv": "", "latency_s": 0.025,
            "status": "confirmed", "measured_at": dt.datetime(2026, 12, 1), "versions": {}, "registry_hash": "x",
            "stale": False}
    cpu = Result(**base, measured_requests=91, latency_stat="fastest")
    assert "fastest of 91 measured requests" in emit.evidence_text(cpu)
    assert emit.to_dict(cpu)["latency_stat"] == "fastest" and "measured.fastest_s" in emit.render_text(cpu)
    gpu = dataclasses.replace(cpu, gpu="NVIDIA H200", latency_stat="median")
    assert "median of 91 measured requests" in emit.evidence_text(gpu)
    assert "compare its perf dump's latency_s" in emit.render_text(gpu)
    assert Result(**base).latency_stat == "median"  # stored before the statistic was recorded
