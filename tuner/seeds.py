"""Seeds: the study preset's known-good configurations, enqueued first, each repaired to fit the
budget when the memory model says it does not, so that the sampler starts from good feasible
points instead of searching for the wall."""

from __future__ import annotations

from dataclasses import replace

from dittune.engine import flags as F
from dittune.engine.errors import FlagError

from . import memory
from .options import Setup
from .presets import WIDE


def enqueue_seeds(study, s: Setup) -> None:
    """The preset's seeds in order, then, on several GPUs, the `wide` seeds on the widest layouts
    (so that single-GPU seeds fill the GPUs side by side first)."""
    seen = set()
    wide = []
    marked = any(x.get(WIDE, False) for x in s.seeds)  # none marked: every seed goes wide
    for seed in s.seeds:
        try:
            cfg = F.config_from_dict({**{k: v for k, v in seed.items() if k != WIDE}, **s.fix})
        except FlagError:
            continue
        if s.budget_bytes is not None:
            cfg = fit_budget(cfg, s)
        if cfg is None or not s.space.contains(cfg):
            continue
        if seed.get(WIDE, False) or not marked:
            wide += wide_layouts(cfg, s)
        _enqueue(study, s, cfg, seen)
    for c in wide:
        _enqueue(study, s, c, seen)


def _enqueue(study, s: Setup, cfg, seen: set) -> None:
    key = tuple(F.config_to_argv(cfg))
    if key not in seen:
        seen.add(key)
        study.enqueue_trial(s.space.params(cfg), skip_if_exists=True)


def wide_layouts(cfg, s: Setup) -> list:
    """On several GPUs, the seed also on the widest layouts the space allows: CFG parallel with
    sequence parallel inside each half (where the workload has true CFG: two DiT passes a step,
    one per GPU half, measured 1.97x for Qwen-Image on 2 H200s), then sequence parallel alone,
    then tensor parallel alone (FLUX.1-dev on 2 H200s: TP-2 75.3 ms per step, Ulysses-2 76.1 ms,
    at half the per-GPU weights, so under a budget it can be the one layout that fits). The
    sampler then starts knowing what the GPUs buy. Empty on one GPU."""
    out = []
    for split_cfg in (True, False):
        c = widest_layout(cfg, s, split_cfg)
        if c is not None:
            out.append(c)
    c = widest_tp(cfg, s)
    if c is not None:
        out.append(c)
    return out


def widest_tp(cfg, s: Setup):
    """The seed on the widest tensor-parallel layout the space allows (tp = GPUs), or None."""
    n = s.space.max_gpus
    while n >= 2:
        c = replace(cfg, tp_size=n, ulysses_degree=1, ring_degree=1, enable_cfg_parallel=False, num_gpus=n,
                    dit_cpu_offload=False, dit_layerwise_offload=False)
        if _layout_fits(c, s):
            return c
        n //= 2
    return None


def widest_layout(cfg, s: Setup, split_cfg: bool = False):
    """The seed on the widest layout the space allows (Ulysses first, ring for what the heads do
    not divide; with `split_cfg`, inside each CFG half). None when no layout fits the space or the
    budget."""
    n = s.space.max_gpus
    halves = 2 if split_cfg else 1
    while n >= 2:  # with `split_cfg`, n = 2 is CFG parallel alone
        u = n // halves
        while u >= 1:
            c = replace(cfg, ulysses_degree=u, ring_degree=n // halves // u, enable_cfg_parallel=split_cfg,
                        num_gpus=n, dit_cpu_offload=False, dit_layerwise_offload=False)  # layouts run the DiT resident
            if _layout_fits(c, s):
                return c
            u //= 2
        n //= 2
    return None


def _layout_fits(c, s: Setup) -> bool:
    """A wide layout the space holds and the memory model fits in the budget."""
    try:
        return s.space.contains(c) and (s.budget_bytes is None or
                                        memory.predict_peak_bytes(s.spec.name, c, s.width, s.height) <= s.budget_bytes)
    except FlagError:
        return False


def fit_budget(cfg, s: Setup):
    """`cfg`, or the closest variant predicted to fit: offload the text encoders and VAE, then
    stream the DiT keeping as many blocks resident as fit (engine.offload.resident_set: nested, so
    the memory model's peak grows with their number), then whole-DiT offload."""

    def fits(c) -> bool:
        try:
            F.validate(c)
        except FlagError:
            return False
        if not s.space.contains(c):
            return False
        return memory.predict_peak_bytes(s.spec.name, c, s.width, s.height) <= s.budget_bytes

    if fits(cfg):
        return cfg
    for extra in ({"text_encoder_cpu_offload": True}, {"text_encoder_cpu_offload": True, "vae_cpu_offload": True}):
        c = replace(cfg, **extra)
        if fits(c):
            return c
    base = replace(cfg, text_encoder_cpu_offload=True, vae_cpu_offload=True, dit_cpu_offload=False,
                   dit_layerwise_offload=True, enable_cuda_graph=False)  # graphs need a resident DiT
    if base.enable_torch_compile:
        base = replace(base, compile_scope="regional")
    residents = next((d.values for d in s.space.dims if d.flag.name == "dit-resident-layers"), (0,))
    for r in sorted(residents, reverse=True):  # monotone: the most resident layers that fit
        c = replace(base, dit_resident_layers=r)
        if fits(c):
            return c
    c = replace(cfg, text_encoder_cpu_offload=True, vae_cpu_offload=True, dit_cpu_offload=True, enable_cuda_graph=False)
    return c if fits(c) else None
