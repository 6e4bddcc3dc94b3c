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
    measured = allocated_peak(rec) or int(rec.peak_vram_bytes / memory.ALLOCATOR_OVERHEAD)
    residents = next((d.values for d in s.space.dims if d.flag.name == "dit-resident-layers"), ())
    base = memory.predict_peak_bytes(s.spec.name, cfg, s.width, s.height)
    for r in sorted((r for r in residents if r > cfg.dit_resident_layers), reverse=True):
        c = replace(cfg, dit_resident_layers=r)
        if shlex.join(F.config_to_argv(c)) in state.tried or state.known_infeasible(c):
            continue
        extra = (memory.predict_peak_bytes(s.spec.name, c, s.width, s.height) - base) / memory.ALLOCATOR_OVERHEAD
        if measured + extra <= s.budget_bytes * CLIMB_MARGIN:
            return c
    return None


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
