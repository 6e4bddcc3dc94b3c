"""The study's GPUs: a pool from which each trial takes the GPUs its layout needs and gives them
back, so that trials needing fewer GPUs than are free run side by side. A trial's child process
sees only its GPUs: CUDA_VISIBLE_DEVICES names them by NVML UUID (CUDA accepts UUIDs), so CUDA's
device order, which need not match NVML's, never matters."""

from __future__ import annotations

import os
import threading
from typing import Sequence

from dittune.engine.gpu import GpuInfo

from .errors import TunerError


def parse_gpus(text: str | None) -> tuple[int, ...] | None:
    """`--gpus 0,1` -> (0, 1); None or "all" -> None (every visible GPU)."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    try:
        out = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise TunerError(f"--gpus {text!r}: give NVML indices separated by commas, e.g. 0,1") from None
    if len(set(out)) != len(out) or any(i < 0 for i in out):
        raise TunerError(f"--gpus {text!r}: each index once, none negative")
    return out


def choose(gpus: Sequence[GpuInfo], wanted: tuple[int, ...] | None) -> tuple[GpuInfo, ...]:
    """The study's GPUs among those NVML sees; one kind only (a study is keyed by GPU kind)."""
    if wanted is None:
        chosen = tuple(gpus)
    else:
        by_index = {g.index: g for g in gpus}
        missing = [i for i in wanted if i not in by_index]
        if missing:
            raise TunerError(f"--gpus: no GPU {missing[0]} here (this machine has {', '.join(str(g.index) for g in gpus)})")
        chosen = tuple(by_index[i] for i in wanted)
    kinds = {(g.name, g.total_bytes) for g in chosen}
    if len(kinds) > 1:
        raise TunerError(f"--gpus: the chosen GPUs are of different kinds ({', '.join(sorted(k[0] for k in kinds))}); "
                         "tune each kind as its own study with --gpus")
    return chosen


def visible_devices(take: Sequence[GpuInfo], every: Sequence[GpuInfo]) -> dict[str, str]:
    """The child's environment for running on exactly `take`. By UUID where NVML gave one; else by
    PCI bus order, which CUDA follows under CUDA_DEVICE_ORDER=PCI_BUS_ID."""
    if all(g.uuid for g in take):
        return {"CUDA_VISIBLE_DEVICES": ",".join(g.uuid for g in take)}
    order = sorted(every, key=lambda g: (g.pci_bus_id.lower(), g.index))
    cuda_index = {g.index: i for i, g in enumerate(order)}
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(str(cuda_index[g.index]) for g in take)}


def cpu_shares(n: int, cpus: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """The cores this process may use, split into `n` contiguous shares (one per GPU of a pool);
    fewer cores than shares: one core each, reused round robin."""
    cpus = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
    if len(cpus) < n:
        return [(cpus[i % len(cpus)],) for i in range(n)]
    k, extra = divmod(len(cpus), n)
    out, start = [], 0
    for i in range(n):
        size = k + (i < extra)
        out.append(tuple(cpus[start:start + size]))
        start += size
    return out


class GpuPool:
    """Thread-safe; `take` blocks until enough GPUs are free (or returns None on `stop`).

    With several GPUs each GPU also owns a share of the host's cores, and a trial's worker is bound
    to the shares of the GPUs it holds (DITTUNE_CPUS, read by tuner/worker.py): trials side by side
    then do not fight over cores while they build and load their components. On 2 x H200
    (Z-Image-Turbo) a GPU-bound trial's load took 13.0 s beside a trial building its text encoders
    on the CPU, against 4.1 s alone. Confirmation runs alone, on every core (`env(..., cpus=False)`)."""

    def __init__(self, gpus: Sequence[GpuInfo], every: Sequence[GpuInfo] = ()):
        self.gpus = tuple(gpus)
        self.every = tuple(every) or self.gpus  # the host's GPUs, as CUDA enumerates them
        self._free = list(self.gpus)
        self._cv = threading.Condition()
        self._cpus = dict(zip((g.index for g in self.gpus), cpu_shares(len(self.gpus)))) if len(self.gpus) > 1 else {}

    @property
    def size(self) -> int:
        return len(self.gpus)

    def free(self) -> int:
        with self._cv:
            return len(self._free)

    def take(self, n: int, stop: threading.Event | None = None) -> tuple[GpuInfo, ...] | None:
        if n > self.size:
            raise TunerError(f"a trial needs {n} GPUs; the study has {self.size}")
        with self._cv:
            while len(self._free) < n:
                if stop is not None and stop.is_set():
                    return None
                self._cv.wait(0.5)
            self._free.sort(key=lambda g: g.index)
            got, self._free = tuple(self._free[:n]), self._free[n:]
            return got

    def give(self, gpus: Sequence[GpuInfo]) -> None:
        with self._cv:
            self._free.extend(gpus)
            self._cv.notify_all()

    def env(self, take: Sequence[GpuInfo], cpus: bool = True) -> dict[str, str]:
        """The environment of a worker on `take`: its GPUs, and (`cpus`, side by side) its cores."""
        out = visible_devices(take, self.every)
        if cpus and self._cpus:
            out["DITTUNE_CPUS"] = ",".join(str(c) for c in sorted({c for g in take for c in self._cpus[g.index]}))
        return out


def host_bound(cfg) -> bool:
    """A configuration that streams the DiT's weights from host memory every step (layerwise or
    whole-DiT offload), or builds the text encoders (several GB) in pinned host memory: its speed
    is the host's (pinned copies, PCIe, memory bandwidth), which trials side by side share. On 2 x
    H200 (Z-Image-Turbo) a streamed trial took 62.7 s and 53.4 s beside another against 26.9-28.8 s
    alone, whole-DiT offload 44.6 s; a text-encoder-offload trial's load 38.5 s against 22.2 s;
    GPU-bound trials ran side by side at their solo speed (20.9 vs 20.6 s). The study runs one at a
    time."""
    return any(getattr(cfg, a, False) for a in ("dit_layerwise_offload", "dit_cpu_offload", "text_encoder_cpu_offload"))
