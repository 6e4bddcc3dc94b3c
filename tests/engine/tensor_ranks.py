"""Rank-side checks for tests/engine/test_tensor_parallel.py: run inside the ranks that
dittune.engine.parallel.launch starts (this folder is on their PYTHONPATH)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from dittune.engine import components
from dittune.engine.models import get_family
from dittune.engine.models.base import pack_modulation
from dittune.engine.parallel import Layout, context, sequence_parallel
from parallel_ranks import _cond, graph_breaks

WIDE = {"flux": {"num_attention_heads": 4}, "qwen_image": {"num_attention_heads": 4},
        "zimage": {"dim": 64, "n_heads": 4}}


def wide_family(model: str):
    """The tiny model with 4 attention heads (head dim kept), so that tp 2 x ulysses 2 splits it."""
    family = get_family(model)
    spec = family.spec
    spec = dataclasses.replace(spec, dit_config=dataclasses.replace(spec.dit_config, **WIDE[spec.family]))
    return type(family)(spec)


def _device() -> tuple[torch.device, torch.dtype]:
    """NCCL: this rank's GPU in bf16 (the gpu test); gloo: the CPU in fp32."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", dist.get_rank()), torch.bfloat16
    return torch.device("cpu"), torch.float32


def _inputs(family, n_txt=9) -> tuple:
    spec = family.spec
    device, dtype = _device()
    latents = family.prepare_latents(1, spec.height, spec.width, torch.Generator().manual_seed(3), device, dtype)
    cond = {k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in _cond(family, n_txt, False).items()}
    return latents, torch.tensor([0.7], device=device), cond


def _predict(family, dit, inputs=None):
    spec = family.spec
    latents, sigma, cond = inputs or _inputs(family)
    return family.predict(dit, latents, sigma, cond, spec.guidance, spec.height, spec.width).float()


def _fast(family, dit, device) -> torch.Tensor:
    """The GPU test's engine setup on `dit` (fused kernels, regional compile), then its prediction
    replayed from a CUDA graph (collectives included)."""
    from dittune.engine.cudagraph import capture
    from dittune.engine.ops import use_fused_kernels
    from dittune.engine.pipeline import compile_dit

    use_fused_kernels(dit, device)
    compile_dit(dit, "regional", "default")
    inputs = _inputs(family)
    with torch.inference_mode():
        graph, out = capture(lambda: _predict(family, dit, inputs), device)
        graph.replay()
        torch.cuda.synchronize(device)
    return out.clone()


def check(rank: int, world: int, payload: dict) -> dict:
    """One launch for several checks (each launch costs seconds of imports per rank): "dits" as
    check_dits, "plain" eager_collectives, "explain" a layout for explain_blocks."""
    out = {"dits": check_dits(rank, world, payload["dits"], payload.get("fast", False))}
    if payload.get("plain"):
        out["plain"] = eager_collectives(rank, world)
    if payload.get("explain"):
        out["explain"] = explain_blocks(rank, world, payload["explain"])
    return out


def check_dits(rank: int, world: int, cases: list, fast: bool = False) -> list[tuple]:
    """Each (model, layout, checkpoint dir or None): the tensor-parallel DiT, built or read as this
    rank's share, against the whole DiT on this process. -> every rank's (model, layout, weights,
    max abs error, output scale, split elements held x tp, split elements of the whole, elements
    held, elements of the whole, Attention modules switched to sequence parallel). `fast` (GPU):
    the tensor-parallel DiT with fused kernels, compiled and replayed from a CUDA graph."""
    out = []
    device, dtype = _device()
    for model, lay, path in cases:
        path = Path(path) if path else None
        family = wide_family(model)
        full = components.build_dit(family, device, dtype, path, seed=0)
        ref = _predict(family, full)
        par = context.enter(Layout(**lay), rank, world, device)
        dit = components.build_dit(family, device, dtype, path, seed=0, tensor=par.groups)
        # Synthetic: the modulations packed as the pipeline runs a resident DiT (one GEMV, one
        # all-gather); checkpoint: per block (each gathered Linear gathers its own).
        if path is None and hasattr(dit, "modulation_groups"):
            assert pack_modulation(dit), model
        n_attn = sequence_parallel(dit, par.groups)
        got = _fast(family, dit, device) if fast else _predict(family, dit)
        whole = dict(full.named_parameters())
        shards = dit.tp_shards  # row-parallel biases stay whole (zeros off tp rank 0): not split
        split = [(p.numel(), whole[n].numel()) for n, p in dit.named_parameters()
                 if n in shards and shards[n].shape != shards[n].full_shape]
        out.append((model, lay, "checkpoint" if path else "synthetic", (got - ref).abs().max().item(),
                    ref.abs().max().item(), sum(a for a, _ in split) * lay["tp"], sum(b for _, b in split),
                    sum(p.numel() for p in dit.parameters()), sum(p.numel() for p in full.parameters()), n_attn))
    return context.current().all_ranks(out)


def explain_blocks(rank: int, world: int, layout: dict) -> list[tuple[str, int]]:
    """Graph breaks of the wide tiny FLUX's repeated blocks under the layout (torch._dynamo.explain):
    its double block reduces through RowLinear modules (as every Qwen-Image and Z-Image block does),
    its single block through the `tp` seam around a fused op. One model: explain costs seconds."""
    out = []
    for model in ("flux-dev-tiny",):
        family = wide_family(model)
        par = context.enter(Layout(**layout), rank, world, torch.device("cpu"))
        dit = components.build_dit(family, torch.device("cpu"), torch.float32, None, seed=0, tensor=par.groups)
        sequence_parallel(dit, par.groups)
        out += graph_breaks(dit, model, lambda: _predict(family, dit))
    return out


def eager_collectives(rank: int, world: int) -> dict:
    """Each collective seam run eagerly (as an uncompiled DiT runs it) -> {name: (type of its
    result, its sum)}: a Triton kernel reads its input's data pointer, so an unwaited
    AsyncCollectiveTensor must never come out of a seam."""
    import torch.distributed as dist

    from dittune.engine.parallel import sequence
    from dittune.engine.parallel.tensor import AllReduce

    group = dist.group.WORLD
    tp = AllReduce(group, world, rank)
    outs = {"all_reduce": tp.reduce(torch.full((4, 8), float(rank + 1))),
            "all_gather (dim 0)": sequence.all_gather(torch.full((3, 2), float(rank + 1)), 0, group),
            "modulation gather": tp.gather(torch.full((2, 4), float(rank + 1)), 2)}
    return {k: (type(v).__name__, float(v.sum())) for k, v in outs.items()}
