"""GPU detection through NVML. Without an NVIDIA driver the answer is an empty list and a reason,
never a traceback: the CPU paths run on that answer."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    driver: str
    compute_capability: tuple[int, int]
    count: int  # GPUs of this host
    uuid: str = ""  # "GPU-..." as NVML and CUDA_VISIBLE_DEVICES spell it
    pci_bus_id: str = ""  # "00000000:19:00.0"


@dataclass(frozen=True)
class Detection:
    gpus: tuple[GpuInfo, ...]
    reason: str = ""  # why there are none
    # NVML is there but failed (an error other than "no library" / "no driver"): a GPU may exist
    # that NVML cannot read, so callers must not quietly fall back to the CPU.
    failed: bool = False

    def __bool__(self) -> bool:
        return bool(self.gpus)


# pynvml's errors that mean there is no NVIDIA driver or library on this machine
_ABSENT = {"NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded", "NVMLError_FunctionNotFound", "NVMLError_NotSupported"}


def _nvml():
    if os.environ.get("DITTUNE_NO_NVML"):
        raise RuntimeError("NVML disabled by DITTUNE_NO_NVML")
    import pynvml

    pynvml.nvmlInit()
    return pynvml


def detect() -> Detection:
    try:
        nv = _nvml()
    except Exception as e:  # no library or no driver: "no NVIDIA GPU here"; any other NVML error: a failure
        absent = isinstance(e, (ImportError, RuntimeError)) or type(e).__name__ in _ABSENT
        what = "NVML unavailable" if absent else "NVML failed"
        return Detection((), f"no NVIDIA GPU: {what} ({type(e).__name__}: {e})".rstrip(), failed=not absent)
    try:
        driver = nv.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
        count = nv.nvmlDeviceGetCount()
        gpus = []
        for i in range(count):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            name = nv.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else name
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            cc = nv.nvmlDeviceGetCudaComputeCapability(h)
            uuid, bus = nv.nvmlDeviceGetUUID(h), nv.nvmlDeviceGetPciInfo(h).busId
            uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
            bus = bus.decode() if isinstance(bus, bytes) else bus
            gpus.append(GpuInfo(i, name, int(mem.total), int(mem.free), driver, (int(cc[0]), int(cc[1])), count,
                                uuid, bus))
        if not gpus:
            return Detection((), "no NVIDIA GPU: the driver reports 0 devices")
        return Detection(tuple(gpus))
    except Exception as e:
        return Detection((), f"NVML query failed ({type(e).__name__}: {e})", failed=True)
    finally:
        try:
            nv.nvmlShutdown()
        except Exception:
            pass


def nvml_index(device) -> int | None:
    """NVML's index of a torch CUDA device. The two orders differ under CUDA_VISIBLE_DEVICES (and
    CUDA_DEVICE_ORDER), so match by UUID."""
    try:
        import torch

        uuid = str(torch.cuda.get_device_properties(device).uuid).lower().removeprefix("gpu-")
        nv = _nvml()
    except Exception:
        return None
    try:
        for i in range(nv.nvmlDeviceGetCount()):
            u = nv.nvmlDeviceGetUUID(nv.nvmlDeviceGetHandleByIndex(i))
            u = (u.decode() if isinstance(u, bytes) else u).lower().removeprefix("gpu-")
            if u == uuid:
                return i
        return None
    except Exception:
        return None
    finally:
        try:
            nv.nvmlShutdown()
        except Exception:
            pass


def process_used_bytes(index: int) -> int | None:
    """VRAM NVML charges to this process on GPU `index` (includes the CUDA context), or None."""
    try:
        nv = _nvml()
    except Exception:
        return None
    try:
        h = nv.nvmlDeviceGetHandleByIndex(index)
        pid = os.getpid()
        for p in nv.nvmlDeviceGetComputeRunningProcesses(h):
            if p.pid == pid and p.usedGpuMemory is not None:
                return int(p.usedGpuMemory)
        return None
    except Exception:
        return None
    finally:
        try:
            nv.nvmlShutdown()
        except Exception:
            pass
