import sys
import types

from dittune.engine import gpu


def test_no_driver_is_an_answer_not_a_traceback(monkeypatch):
    monkeypatch.setenv("DITTUNE_NO_NVML", "1")
    d = gpu.detect()
    assert not d and d.gpus == () and d.reason.startswith("no NVIDIA GPU")
    assert gpu.process_used_bytes(0) is None


def test_missing_library(monkeypatch):
    fake = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def init():
        raise NVMLError("NVML Shared Library Not Found")

    fake.nvmlInit = init
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("DITTUNE_NO_NVML", raising=False)
    d = gpu.detect()
    assert not d and "NVML Shared Library Not Found" in d.reason


def test_fake_nvml_reports_devices(monkeypatch):
    fake = types.ModuleType("pynvml")
    mem = types.SimpleNamespace(total=80 * 2**30, free=79 * 2**30)
    fake.nvmlInit = lambda: None
    fake.nvmlShutdown = lambda: None
    fake.nvmlSystemGetDriverVersion = lambda: b"580.65"
    fake.nvmlDeviceGetCount = lambda: 2
    fake.nvmlDeviceGetHandleByIndex = lambda i: i
    fake.nvmlDeviceGetName = lambda h: "NVIDIA H100 80GB HBM3"
    fake.nvmlDeviceGetMemoryInfo = lambda h: mem
    fake.nvmlDeviceGetCudaComputeCapability = lambda h: (9, 0)
    fake.nvmlDeviceGetUUID = lambda h: f"GPU-0000000{h}-aaaa-bbbb-cccc-dddddddddddd".encode()
    fake.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(busId=f"00000000:1{h}:00.0".encode())
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("DITTUNE_NO_NVML", raising=False)
    d = gpu.detect()
    assert len(d.gpus) == 2
    g = d.gpus[1]
    assert (g.index, g.name, g.total_bytes, g.driver, g.compute_capability, g.count) == (
        1, "NVIDIA H100 80GB HBM3", 80 * 2**30, "580.65", (9, 0), 2)
    assert (g.uuid, g.pci_bus_id) == ("GPU-00000001-aaaa-bbbb-cccc-dddddddddddd", "00000000:11:00.0")


def fake_processes(monkeypatch, listing):
    """A fake NVML whose compute-process list is `listing()`: [(pid, used bytes), ...]."""
    fake = types.ModuleType("pynvml")
    fake.nvmlInit = lambda: None
    fake.nvmlShutdown = lambda: None
    fake.nvmlDeviceGetHandleByIndex = lambda i: i
    fake.nvmlDeviceGetComputeRunningProcesses = lambda h: [types.SimpleNamespace(pid=p, usedGpuMemory=b)
                                                           for p, b in listing()]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("DITTUNE_NO_NVML", raising=False)


def test_process_peak_catches_a_transient_the_final_read_misses(monkeypatch):
    import os
    import time

    GiB = 2**30
    now = {"used": 1 * GiB}
    fake_processes(monkeypatch, lambda: [(1, 70 * GiB), (os.getpid(), now["used"])])  # another process: not ours
    with gpu.ProcessPeak(0, interval_s=0.002) as p:
        now["used"] = 5 * GiB  # a stage's transient (a VAE decode, say)
        time.sleep(0.1)
        now["used"] = 2 * GiB
        time.sleep(0.05)
    assert p.peak == 5 * GiB and p.samples >= 3
    assert gpu.process_used_bytes(0) == 2 * GiB  # a read at the end alone would have said 2 GiB


def test_process_match_in_a_pid_namespace(monkeypatch):
    """NVML lists host PIDs: where ours is not among them, the GPU's only process is ours (a trial
    holds its GPUs alone); with several, nobody can tell, and the answer is None, not a guess."""
    GiB = 2**30
    fake_processes(monkeypatch, lambda: [(999999, 3 * GiB)])
    assert gpu.process_used_bytes(0) == 3 * GiB
    fake_processes(monkeypatch, lambda: [(999999, 3 * GiB), (999998, 4 * GiB)])
    assert gpu.process_used_bytes(0) is None
    with gpu.ProcessPeak(0) as p:
        pass
    assert p.peak is None


def test_without_nvml_no_peak(monkeypatch):
    monkeypatch.setenv("DITTUNE_NO_NVML", "1")
    with gpu.ProcessPeak(0) as p:
        pass
    with gpu.ProcessPeak(None) as q:
        pass
    assert p.peak is None and q.peak is None


def test_budget_binds_the_whole_footprint():
    """The peak compared with a budget is NVML's process peak; torch's reserved one only where NVML
    did not see the process, and then it says so. The allocator's cap leaves the outside allowance."""
    from dittune.engine import budget, perf

    GiB = 2**30
    both = {"torch_max_reserved_bytes": 23 * GiB, "nvml_process_peak_bytes": 23 * GiB + 3 * GiB // 4}
    assert perf.binding_peak(both) == (23 * GiB + 3 * GiB // 4, "nvml_process")
    assert perf.binding_peak({"torch_max_reserved_bytes": 23 * GiB, "nvml_process_peak_bytes": None}) == (
        23 * GiB, "torch_reserved")
    assert perf.binding_peak({"torch_max_reserved_bytes": None}) == (None, None)
    context = GiB // 2
    outside = budget.outside_allowance(context)
    assert outside == context + budget.OUTSIDE_GROWTH_BYTES
    assert budget.outside_allowance(context, num_gpus=2) == outside + budget.NCCL_BYTES
    assert budget.outside_allowance(None) == budget.DEFAULT_OUTSIDE_BYTES >= 3 * GiB // 4  # the H200's measured margin
    assert budget.allocator_cap(24 * GiB, outside) == 24 * GiB - outside
    assert budget.allocator_cap(GiB // 4, outside) == 1  # nothing left: the first allocation is out of memory
