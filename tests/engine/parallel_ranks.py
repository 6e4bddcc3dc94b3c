"""Rank-side checks for tests/engine/test_parallel.py: run inside the ranks that
dittune.engine.parallel.launch starts (this folder is on their PYTHONPATH)."""

from __future__ import annotations

import os

import torch

from dittune.engine import components
from dittune.engine.errors import BudgetExceededError, EngineError
from dittune.engine.flags import config_from_dict
from dittune.engine.models import get_family
from dittune.engine.parallel import Layout, context, sequence_parallel


def _cond(family, n_txt: int, masked: bool) -> dict:
    cfg, g = family.spec.dit_config, torch.Generator().manual_seed(7)
    if family.spec.family == "flux":
        return {"prompt_embeds": torch.randn(1, n_txt, cfg.joint_attention_dim, generator=g),
                "pooled_prompt_embeds": torch.randn(1, cfg.pooled_projection_dim, generator=g),
                "txt_ids": torch.zeros(n_txt, 3)}
    if family.spec.family == "qwen_image":
        out = {"prompt_embeds": torch.randn(1, n_txt, cfg.joint_attention_dim, generator=g)}
        if masked:
            out["prompt_mask"] = (torch.arange(n_txt) < n_txt - 2).long()[None]  # last two keys masked
        return out
    return {"cap_feats": torch.randn(1, n_txt, cfg.cap_feat_dim, generator=g)}


def check_dits(rank: int, world: int, cases: list[tuple[str, dict, int, bool]]) -> list[tuple]:
    """Each (model, layout, text tokens, masked): the DiT's prediction under the layout vs on this
    process alone, same weights and inputs. -> every rank's max abs error per case (rank 0)."""
    import torch.distributed as dist

    gpu = dist.get_backend() == "nccl"
    device, dtype = (torch.device("cuda", rank), torch.bfloat16) if gpu else (torch.device("cpu"), torch.float32)
    errs = []
    for model, lay, n_txt, masked in cases:
        family = get_family(model)
        spec = family.spec
        dit = components.build_dit(family, device, dtype, None, seed=0)
        latents = family.prepare_latents(1, spec.height, spec.width, torch.Generator().manual_seed(3), device, dtype)
        sigma = torch.tensor([0.7], device=device)
        cond = {k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in _cond(family, n_txt, masked).items()}
        ref = family.predict(dit, latents, sigma, cond, spec.guidance, spec.height, spec.width).float()
        par = context.enter(Layout(**lay), rank, world, device)
        n_attn = sequence_parallel(dit, par.groups)
        out = family.predict(dit, latents, sigma, cond, spec.guidance, spec.height, spec.width).float()
        errs.append((model, lay, n_txt, masked, n_attn, (out - ref).abs().max().item(), ref.abs().max().item()))
    return context.current().all_ranks(errs)


def check_pipelines(rank: int, world: int, cases: list[tuple[str, dict, float]]) -> list[tuple]:
    """Each (model, flags, guidance): the whole pipeline (encode on rank 0, broadcast, denoise with
    the layout, CFG parallel gather) vs one process: max abs difference of the final latents."""
    from dittune.engine.pipeline import Pipeline

    out = []
    for model, flags, guidance in cases:
        family, cfg = get_family(model), config_from_dict(flags)
        spec = family.spec
        par = context.enter(Layout.from_flags(cfg), rank, world, torch.device("cpu"))
        pipe = Pipeline(family, cfg, torch.device("cpu"), torch.float32, None, par)
        image, _ = pipe("a red fox", "blurry", spec.width, spec.height, spec.steps, guidance, 0)
        lat = pipe.last_latents
        err = None
        if rank == 0:
            single = Pipeline(get_family(model), config_from_dict({}), torch.device("cpu"), torch.float32)
            ref_image, _ = single("a red fox", "blurry", spec.width, spec.height, spec.steps, guidance, 0)
            err = ((lat - single.last_latents).abs().max().item(), single.last_latents.abs().max().item(),
                   (image.int() - ref_image.int()).abs().max().item())
        out.append((model, flags, guidance, err, image is None))
    return context.current().all_ranks(out)


def fail_on(rank: int, world: int, how: dict):
    """Rank `how["rank"]` fails in the named way after the group formed; the others wait in a
    collective (as they would in a DiT pass) until the launcher stops them."""
    import torch.distributed as dist

    if rank == how["rank"]:
        kind = how["kind"]
        if kind == "oom":
            raise BudgetExceededError("out of GPU memory under the VRAM budget 1GiB (test)")
        if kind == "refused":
            raise EngineError("refused by the test")
        if kind == "exit":
            os._exit(7)
        raise ValueError("a bug in the test rank")
    dist.barrier()
    dist.barrier()
    return "unreachable"


def explain_blocks(rank: int, world: int, layout: dict) -> list[tuple[str, int]]:
    """Graph breaks of each tiny DiT's repeated blocks under sequence parallelism (torch._dynamo.explain)."""
    out = []
    for model in ("flux-dev-tiny", "qwen-image-tiny", "z-image-turbo-tiny"):
        family = get_family(model)
        spec = family.spec
        dit = components.build_dit(family, torch.device("cpu"), torch.float32, None, seed=0)
        par = context.enter(Layout(**layout), rank, world, torch.device("cpu"))
        sequence_parallel(dit, par.groups)

        def run():
            latents = family.prepare_latents(1, spec.height, spec.width, torch.Generator().manual_seed(3), "cpu", torch.float32)
            family.predict(dit, latents, torch.tensor([0.7]), _cond(family, 9, False), spec.guidance, spec.height, spec.width)

        out += graph_breaks(dit, model, run)
    return out


def graph_breaks(dit, model: str, run) -> list[tuple[str, int]]:
    """Each repeated block kind's first call during `run()`, explained: (model:block, graph breaks)."""
    import torch._dynamo

    calls: list = []
    for name in dit.repeated_blocks:  # record each block kind's first call, then explain it
        block = getattr(dit, name)[0]
        block.forward = (lambda f, n: (lambda *a, **k: (calls.append((n, f, a, k)), f(*a, **k))[1]))(block.forward, name)
    run()
    out, seen = [], set()
    for name, f, a, k in calls:
        if name in seen:
            continue
        seen.add(name)
        torch._dynamo.reset()
        out.append((f"{model}:{name}", torch._dynamo.explain(f)(*a, **k).graph_break_count))
    return out


def environment(rank: int, world: int, names: list[str]) -> dict:
    """What a rank's environment holds (rank 0's answer)."""
    return {n: os.environ.get(n) for n in names}


def linger(rank: int, world: int, folder: str) -> None:
    """Write this rank's pid into `folder`, then wait far longer than any test (killed from outside)."""
    import time
    from pathlib import Path

    Path(folder, f"rank{rank}.pid").write_text(str(os.getpid()))
    time.sleep(300)
