"""The search space: registry flags ∩ what this machine supports ∩ the study preset ∩ the user's
--fix / --allow-lossy. Conditional flags are suggested only when their parent is on, and a
combination that violates a registry constraint never reaches the GPU."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from dittune.engine import flags as F
from dittune.engine.errors import FlagError

from .errors import TunerError

DEFAULT_NUMERIC = {"dit-offload-prefetch-size": (1.0, 2.0, 4.0)}


@dataclass(frozen=True)
class Dim:
    flag: F.Flag
    values: tuple[Any, ...]  # searched values; one value = fixed
    # consecutive integers searched as one integer range (Optuna's suggest_int: the sampler sees the
    # order, and the tuner may enqueue any count, such as the residency climb's)
    ordinal: bool = False


@dataclass(frozen=True)
class Space:
    dims: tuple[Dim, ...]  # registry order: parents before children

    @property
    def searched(self) -> list[Dim]:
        return [d for d in self.dims if len(d.values) > 1]

    def suggest(self, trial) -> Any:
        """Define-by-run sampling on an Optuna trial -> EngineConfig (raises FlagError on a
        constraint violation; the caller records that trial as pruned without running it)."""
        values: dict[str, Any] = {}
        partial = F.EngineConfig()
        for d in self.dims:
            if not F.is_active(d.flag, partial):
                continue
            if len(d.values) == 1:
                v = d.values[0]
            elif d.ordinal:
                v = trial.suggest_int(d.flag.name, d.values[0], d.values[-1])
            else:
                v = trial.suggest_categorical(d.flag.name, list(d.values))
            values[d.flag.name] = v
            partial = F.EngineConfig(**{F.FLAG_BY_NAME[k].attr: x for k, x in values.items()})
        return F.config_from_dict(values)

    def params(self, cfg: Any) -> dict[str, Any]:
        """Optuna params that reproduce `cfg` (for enqueueing seeds)."""
        return {d.flag.name: getattr(cfg, d.flag.attr) for d in self.searched if F.is_active(d.flag, cfg)}

    def contains(self, cfg: Any) -> bool:
        return all(getattr(cfg, d.flag.attr) in d.values for d in self.dims if F.is_active(d.flag, cfg))

    def configs(self, dims: tuple[Dim, ...] | None = None) -> Iterator[Any]:
        """Every valid configuration of the space (for sizing and exhaustive small spaces)."""
        seen = set()
        for combo in itertools.product(*(d.values for d in dims or self.dims)):
            values = {d.flag.name: v for d, v in zip(dims or self.dims, combo)}
            cfg = F.EngineConfig(**{F.FLAG_BY_NAME[k].attr: v for k, v in values.items()})
            # Inactive children take their defaults so that each configuration appears once.
            cfg = F.EngineConfig(**{
                f.attr: getattr(cfg, f.attr) if F.is_active(f, cfg) else f.default for f in F.FLAGS
            })
            key = tuple(F.config_to_argv(cfg))
            if key in seen:
                continue
            seen.add(key)
            try:
                F.validate(cfg)
            except FlagError:
                continue
            yield cfg

    def size(self) -> int:
        """Number of valid configurations. An ordinal dimension is enumerated at one value and
        counted as its length where it is active (the registry's constraints never depend on a
        numeric value), so a 57-count residency range does not multiply the enumeration."""
        ordinal = [d for d in self.dims if d.ordinal]
        if not ordinal:
            return sum(1 for _ in self.configs())
        dims = tuple(Dim(d.flag, d.values[:1]) if d.ordinal else d for d in self.dims)
        total = 0
        for cfg in self.configs(dims):
            n = 1
            for d in ordinal:
                if F.is_active(d.flag, cfg):
                    n *= len(d.values)
            total += n
        return total


def build_space(
    supported: Mapping[str, tuple],
    preset_space: Mapping[str, list],
    fix: Mapping[str, Any],
    allow_lossy: bool,
    num_blocks: int,
    gpu_count: int = 1,
) -> Space:
    fix = dict(fix)
    for name in list(fix):  # fixing a child switches its parents on
        parent = F.FLAG_BY_NAME[name].requires
        while parent is not None:
            if fix.setdefault(parent, True) is not True:
                raise TunerError(f"--fix {name}=... needs --{parent}, but --fix {parent}=false was given")
            parent = F.FLAG_BY_NAME[parent].requires
    dims = []
    for f in F.FLAGS:
        if f.name in fix:
            v = fix[f.name]
            allowed = supported.get(f.name)
            if allowed is not None and v not in allowed:
                raise TunerError(
                    f"--fix {f.name}={v}: cannot run on this machine (possible here: {', '.join(map(str, allowed))})"
                )
            if v in f.lossy_values and not allow_lossy:
                raise TunerError(f"--fix {f.name}={v} is lossy; add --allow-lossy to accept it")
            dims.append(Dim(f, (v,)))
            continue
        if f.multi_gpu and gpu_count < 2:
            dims.append(Dim(f, (f.default,)))
            continue
        if f.name in preset_space:
            values = tuple(preset_space[f.name])
        elif f.type is bool:
            values = (False, True)
        elif f.choices is not None:
            values = tuple(f.choices)
        elif f.name == "dit-resident-layers":  # every count: an integer range (ordinal below)
            values = tuple(range(num_blocks))
        else:
            values = DEFAULT_NUMERIC.get(f.name, (f.default,))
        if f.name in supported:
            values = tuple(v for v in values if v in supported[f.name])
        if not allow_lossy:
            values = tuple(v for v in values if v not in f.lossy_values)
        if f.name == "dit-resident-layers":
            values = tuple(v for v in values if v < num_blocks)
        if not values:
            values = (f.default,)
        ordinal = (len(values) > 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in values)
                   and list(values) == list(range(values[0], values[-1] + 1)))
        dims.append(Dim(f, values, ordinal))
    space = Space(tuple(dims))
    if space.size() == 0:
        raise TunerError("the search space is empty: the --fix values violate a flag constraint")
    return space
