"""--enable-cuda-graph: the denoise step's DiT passes captured once per workload shape as one CUDA
graph and replayed, so the GPU no longer waits on Python between kernels.

Measured on the H100 before this existed (bench/profile_step.py, FLUX.1-dev, compiled, fused):
the kernels of one forward took 119.0 ms and the forward 129.9 ms; the 10.8 ms difference is the
GPU idle while the CPU launches the next kernels. A replayed graph launches them all at once.
Measured with it (H100, after the cuBLASLt epilogues had landed too): FLUX 126.8 -> 124.8 ms per
step (bench_e2e, DiT only), 124.7 -> 124.5 ms in the pipeline; Qwen-Image 255.5 -> 251.8 ms;
Z-Image 98.5 -> 97.0 ms: less than the 10.8 ms of gaps profiled before (why is not profiled yet).

What is captured: every DiT pass of one step (conditional and, with true CFG, negative), from
the latents and sigma to the velocities, with the step cache shared between them as in the
eager loop. The CFG mix and the Euler update stay eager (two small kernels). The graph reads
its inputs from static buffers: each replay copies the step's latents, sigma and prompt
embeddings in. A new shape (other resolution, other prompt length) captures another graph.

The DiT must stay where it is between replays: whole-DiT and layerwise offload move its weights,
so they exclude this flag (flags.CONSTRAINTS). CUDA only.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping

import torch

Cond = Mapping[str, torch.Tensor]


def _signature(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype, t.device


def capture(fn: Callable[[], object], device: torch.device, warmup: int = 2, pool=None):
    """Run `fn` `warmup` times on a side stream (cuBLAS workspaces, compiles happen off the
    default stream), then capture one call of it -> (CUDA graph, fn's output tensors, static)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


class _Graph:
    def __init__(self, latents: torch.Tensor, sigma: torch.Tensor, conds: list[Cond]):
        self.latents = latents.clone()
        self.sigma = sigma.clone()
        self.conds = [{k: v.clone() for k, v in c.items()} for c in conds]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: list[torch.Tensor] = []

    def load(self, latents: torch.Tensor, sigma: torch.Tensor, conds: list[Cond]) -> None:
        # Everything is copied in at every replay (the embeddings are a few MB, microseconds):
        # telling a new request's tensors from the last one's by identity is not safe.
        self.latents.copy_(latents)
        self.sigma.copy_(sigma)
        for static, src in zip(self.conds, conds):
            for k, v in src.items():
                static[k].copy_(v)


class GraphedPasses:
    """Replays `passes(latents, sigma, conds, static) -> [velocity per cond]` from CUDA graphs, one
    per input signature and value of `static` (hashable Python values the graph bakes in, such as
    the guidance scale). `passes` must be a pure function of its arguments (no host syncs)."""

    def __init__(self, passes: Callable[[torch.Tensor, torch.Tensor, list[Cond], tuple], list[torch.Tensor]],
                 device: torch.device, warmup: int = 2):
        if device.type != "cuda":
            from .errors import EngineError

            raise EngineError(f"--enable-cuda-graph needs a CUDA device (running on {device})")
        self.passes, self.device, self.warmup = passes, device, warmup
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool shared by every captured shape
        self.capture_s = 0.0
        self.replays = 0

    def __call__(self, latents: torch.Tensor, sigma: torch.Tensor, conds: list[Cond], static: tuple = ()) -> list[torch.Tensor]:
        key = (static, _signature(latents), _signature(sigma),
               tuple(tuple(sorted((k, _signature(v)) for k, v in c.items())) for c in conds))
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._capture(latents, sigma, conds, static)
        g.load(latents, sigma, conds)
        g.graph.replay()
        self.replays += 1
        return g.outputs

    def _capture(self, latents: torch.Tensor, sigma: torch.Tensor, conds: list[Cond], static: tuple) -> _Graph:
        t = time.perf_counter()
        g = _Graph(latents, sigma, conds)
        g.graph, g.outputs = capture(lambda: self.passes(g.latents, g.sigma, g.conds, static), self.device,
                                     self.warmup, self.pool)
        torch.cuda.synchronize(self.device)
        self.capture_s += time.perf_counter() - t
        return g

    def manifest(self) -> dict:
        return {"enabled": True, "graphs": len(self.graphs), "replays": self.replays, "capture_s": self.capture_s}
