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
