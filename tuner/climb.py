"""The residency climb: under a budget, once a streamed (layerwise) configuration has fitted,
try the same configuration with more resident blocks, judged from the trial's *measured* peak.
More resident blocks stream fewer bytes, and under a budget that is usually the largest win."""

from __future__ import annotations

import shlex
from dataclasses import replace

from dittune import db as D
from dittune.engine import flags as F

from . import memory
from .options import Setup
from .state import State

CLIMB_MARGIN = 0.995  # the climb's target: allocated bytes within 99.5% of the budget


def allocated_peak(rec: D.TrialRecord) -> int | None:
    """The largest allocated (not reserved) peak over a trial's stages. Under the engine's VRAM
    cap the caching allocator gives reserved memory back before it fails, so a capped trial's
    reserved peak says little about how much more would fit; allocated bytes do."""
    stages = ((rec.manifest or {}).get("peak_vram") or {}).get("stages") or {}
    vals = [v.get("allocated_bytes") for v in stages.values() if isinstance(v, dict)]
    vals = [v for v in vals if isinstance(v, int)]
    return max(vals) if vals else None


def residency_climb(cfg, rec: D.TrialRecord, s: Setup, state: State):
    """After a layerwise trial fits the budget, the same configuration with the most resident
    blocks that should still fit, judged from the *measured* allocated peak plus the memory
    model's allocated difference between the two residencies (so the model's absolute error and
    its allocator-overhead guess cancel out). None when there is nothing to climb."""
    if s.budget_bytes is None or not cfg.dit_layerwise_offload or not rec.peak_vram_bytes:
        return None
    if rec.peak_vram_bytes > s.budget_bytes:
        return None
    measured = allocated_peak(rec)
    if measured is not None:  # the worker's allocator cap leaves the budget's allowance outside it (engine/budget.py)
        measured += ((rec.manifest or {}).get("outside_allocator") or {}).get("allowance_bytes") or 0
    else:
        measured = int(rec.peak_vram_bytes / memory.ALLOCATOR_OVERHEAD)
    residents = next((d.values for d in s.space.dims if d.flag.name == "dit-resident-layers"), ())
    base = memory.predict_peak_bytes(s.spec.name, cfg, s.width, s.height)

    def extra(r: int) -> float:  # the model's allocated bytes for r resident blocks beyond cfg's
        c = replace(cfg, dit_resident_layers=r)
        return (memory.predict_peak_bytes(s.spec.name, c, s.width, s.height) - base) / memory.ALLOCATOR_OVERHEAD

    # An out-of-memory count above this one says the model's per-block cost is too low: it needed
    # more than the room left, so scale the model's difference by at least room / predicted
    # (a secant jump: the next climb lands just below the wall, not one block below the last try).
    # After two misses above, bisect instead, so a model that is wrong in shape costs log2 trials.
    ooms = sorted(r for r in state.oom_counts(cfg) if r > cfg.dit_resident_layers)
    room = s.budget_bytes - measured
    scale = 1.0
    if ooms and extra(ooms[0]) > 0:
        scale = max(1.0, room / extra(ooms[0]))
    ceiling = (cfg.dit_resident_layers + ooms[0]) // 2 if len(ooms) >= 2 else None
    for r in sorted((r for r in residents if r > cfg.dit_resident_layers), reverse=True):
        c = replace(cfg, dit_resident_layers=r)
        if shlex.join(F.config_to_argv(c)) in state.tried or state.known_infeasible(c):
            continue
        if ceiling is not None and r > ceiling:
            continue
        if measured + scale * extra(r) <= s.budget_bytes * CLIMB_MARGIN:
            return c
    return None


_STREAMING = ("dit-layerwise-offload", "dit-cpu-offload")


def _streams(cfg) -> bool:
    """The DiT's weights come from host memory every request (layerwise or whole-DiT offload)."""
    return cfg.dit_layerwise_offload or cfg.dit_cpu_offload


def resident(cfg):
    """`cfg` with the whole DiT resident: the streaming flags, and those that apply only under
    them (resident count, prefetch, idle offload), at their defaults."""
    return replace(cfg, **{f.attr: f.default for f in F.FLAGS if f.name in _STREAMING or f.requires in _STREAMING})


def _family(cfg) -> tuple:
    """Everything but where the DiT lives: configurations that differ only in residency."""
    return tuple(sorted(F.config_to_dict(resident(cfg)).items()))


def dominated(cfg, s: Setup, state: State, objective: str) -> D.TrialRecord | None:
    """Under the latency objective, a streamed configuration is not worth a trial once the same
    configuration with more blocks resident (or the whole DiT resident) has been measured within
    the budget: more resident blocks stream fewer bytes, so it cannot be faster. (The frontier
    objective wants those lower-memory points; latency does not.) The measured record that
    dominates it, or None."""
    if objective != "latency" or not _streams(cfg):
        return None
    fam = _family(cfg)
    best = None
    for rec in state.tried.values():
        if rec.status != "complete" or (s.budget_bytes is not None and (rec.peak_vram_bytes or 0) > s.budget_bytes):
            continue
        other = F.config_from_dict(rec.flags)
        if other.dit_cpu_offload or _family(other) != fam:
            continue
        wider = not other.dit_layerwise_offload or (  # the whole DiT resident dominates every streamed variant
            cfg.dit_layerwise_offload and other.dit_idle_offload == cfg.dit_idle_offload
            and other.dit_resident_layers > cfg.dit_resident_layers)
        if wider and (best is None or rec.latency_s < best.latency_s):
            best = rec
    return best


def next_climb(s: Setup, state: State):
    """Under a budget, once nothing is queued (the seeds and earlier climbs have run): the
    residency climb of the *fastest* streamed configuration measured within the budget, if it has
    one left. Climbing only the fastest spends one trial where climbing every seed variant would
    spend one each (H100, FLUX under 24 GiB: four seeds climbed 43 -> 46 one after another). After
    a climb runs out of memory, the next climb from the same configuration stops below it
    (State.known_infeasible), so the count settles on the largest that fits."""
    if s.budget_bytes is None:
        return None
    best = None
    for rec in state.tried.values():
        if rec.status != "complete" or not rec.peak_vram_bytes or rec.peak_vram_bytes > s.budget_bytes:
            continue
        cfg = F.config_from_dict(rec.flags)
        if cfg.dit_layerwise_offload and (best is None or rec.latency_s < best[0].latency_s):
            best = (rec, cfg)
    if best is None:
        return None
    return residency_climb(best[1], best[0], s, state)


def resident_first(cfg, s: Setup, state: State, objective: str):
    """Under the latency objective, a streamed configuration (layerwise or whole-DiT offload)
    whose fully resident sibling (the same flags, the DiT on the GPU) is predicted to fit the
    budget and has not been measured: that sibling, to measure first. Once it has run, `dominated`
    prunes the streamed one for free; if it ran out of memory, the streamed one runs. Without this,
    trials asked side by side (before any sibling was measured) spent GPU time on streamed
    configurations that the one-GPU study pruned (2 x H200, Z-Image-Turbo: three of eight trials,
    27-63 s each against ~21 s). None when `cfg` should simply run."""
    if objective != "latency" or not _streams(cfg):
        return None
    sib = resident(cfg)
    if not s.space.contains(sib):
        return None  # the DiT's placement is fixed (--fix), or the space has no such point
    argv = shlex.join(F.config_to_argv(sib))
    if argv in state.tried:
        return None  # measured (then `dominated` decides), or it ran out of memory: the streamed one is needed
    if s.budget_bytes is not None and memory.predict_peak_bytes(s.spec.name, sib, s.width, s.height) > s.budget_bytes:
        return None
    return sib
