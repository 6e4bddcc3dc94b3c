"""StagePeaks: per-stage peaks from torch's resettable counters, without losing the process peak."""

import torch

from dittune.engine import perf


class FakeCounters:
    """torch.cuda's peak counters over a scripted sequence of allocations."""

    def __init__(self):
        self.current = self.peak = 0

    def alloc(self, n):
        self.current += n
        self.peak = max(self.peak, self.current)

    def free(self, n):
        self.current -= n


def test_stage_peaks_and_process_peak(monkeypatch):
    c = FakeCounters()
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: c.peak)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: c.peak)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: setattr(c, "peak", c.current))
    monkeypatch.setattr(perf.gpu_mod, "process_used_bytes", lambda index: None)
    peaks = perf.StagePeaks(torch.device("cuda", 0))
    c.alloc(100)  # load: weights
    c.alloc(50)
    c.free(50)  # a load transient: the process peak (150) sits before any stage
    with peaks.stage("encode"):
        c.alloc(30)
        c.free(30)
    with peaks.stage("denoise"):
        c.alloc(20)
        c.free(20)
    with peaks.stage("decode"):
        c.alloc(40)
        c.free(40)
    m = perf.memory(torch.device("cuda", 0), peaks)
    assert m["stages"] == {"encode": {"reserved_bytes": 130, "allocated_bytes": 130},
                           "denoise": {"reserved_bytes": 120, "allocated_bytes": 120},
                           "decode": {"reserved_bytes": 140, "allocated_bytes": 140}}
    assert m["torch_max_reserved_bytes"] == m["torch_max_allocated_bytes"] == 150
    assert m["nvml_process_peak_bytes"] is None  # NVML did not see the process: nothing made up
    monkeypatch.setattr(perf.gpu_mod, "process_used_bytes", lambda index: 700)
    monkeypatch.setattr(perf.gpu_mod, "nvml_index", lambda device: 0)
    m = perf.memory(torch.device("cuda", 0), peaks, nvml_peak=900)  # the sampled peak, above the final read
    assert (m["nvml_process_bytes"], m["nvml_process_peak_bytes"]) == (700, 900)


def test_cpu_has_no_peaks():
    peaks = perf.StagePeaks(torch.device("cpu"))
    with peaks.stage("encode"):
        pass
    assert peaks.stages == {} and perf.memory(torch.device("cpu"), peaks)["torch_max_reserved_bytes"] is None


def test_load_parts_add_up_to_the_load():
    from dittune.engine.run import GenerateRequest, generate

    d = generate(GenerateRequest(model="flux-dev-tiny", steps=1, width=64, height=64, device="cpu")).dump["cold_start"]
    parts = d["load_parts"]
    assert set(parts) == {"text_encoders_s", "vae_s", "dit_s", "offload_setup_s", "dit_setup_s"}
    assert all(v >= 0 for v in parts.values()) and abs(sum(parts.values()) - d["load_s"]) < 0.05
