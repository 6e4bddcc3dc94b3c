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


def _process_bytes(nv, handle) -> int | None:
    """NVML's used memory of this process on one GPU. NVML lists host PIDs: in a container with its
    own PID namespace this pid is not among them, and then the GPU's only compute process (the
    tuner gives each trial its GPUs alone) is taken as this one; several others: unknown (None)."""
    procs = [p for p in nv.nvmlDeviceGetComputeRunningProcesses(handle) if p.usedGpuMemory is not None]
    pid = os.getpid()
    mine = [p for p in procs if p.pid == pid] or (procs if len(procs) == 1 else [])
    return int(mine[0].usedGpuMemory) if mine else None


def process_used_bytes(index: int) -> int | None:
    """VRAM NVML charges to this process on GPU `index` (includes the CUDA context), or None."""
    try:
        nv = _nvml()
    except Exception:
        return None
    try:
        return _process_bytes(nv, nv.nvmlDeviceGetHandleByIndex(index))
    except Exception:
        return None
    finally:
        try:
            nv.nvmlShutdown()
        except Exception:
            pass


class ProcessPeak:
    """The peak of this process's whole footprint on GPU `index` as NVML sees it (CUDA context,
    kernel modules, cuBLAS / cuDNN / NCCL buffers and the torch allocator's segments together),
    polled by a thread every `interval_s` while the block runs, plus a final read at the end
    (50 ms: a stage's peak lasts longer than that; each poll holds the GIL for a fraction of a ms).
    torch's reserved peak misses everything outside its allocator; this is what must fit the card.
    `peak` stays None where NVML cannot see the process (no driver, no NVML, another's GPU)."""

    def __init__(self, index: int | None, interval_s: float = 0.05):
        self.index, self.interval_s = index, interval_s
        self.peak: int | None = None
        self.samples = 0
        self._stop = None
        self._thread = None
        self._nv = self._handle = None

    def read(self) -> int | None:
        if self._handle is None:
            return None
        try:
            used = _process_bytes(self._nv, self._handle)
        except Exception:
            return None
        if used is not None:
            self.samples += 1
            self.peak = used if self.peak is None else max(self.peak, used)
        return used

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.read()

    def __enter__(self) -> "ProcessPeak":
        import threading

        if self.index is None:
            return self
        try:
            self._nv = _nvml()
            self._handle = self._nv.nvmlDeviceGetHandleByIndex(self.index)
        except Exception:
            self._nv = self._handle = None
            return self
        self.read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="dittune-nvml-peak", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self.read()
        if self._nv is not None:
            try:
                self._nv.nvmlShutdown()
            except Exception:
                pass
        self._nv = self._handle = None
