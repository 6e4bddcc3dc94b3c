"""The search space: registry flags ∩ what this machine supports ∩ the study preset ∩ the user's
--fix / --allow-lossy. Conditional flags are suggested only when their parent is on, and a
combination that violates a registry constraint never reaches the GPU."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Mapping

from dittune.engine import flags as F
from dittune.engine.errors import FlagError

from .errors import TunerError

DEFAULT_NUMERIC = {"dit-offload-prefetch-size": (1.0, 2.0, 4.0)}
# Parallel degrees searched on several GPUs: powers of two up to the GPUs a trial may use. The GPU
# count itself is not searched: it is the layout's product (flags.layout_product).
DEGREES = ("ulysses-degree", "ring-degree", "tp-size")
DERIVED = "num-gpus"


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
    max_gpus: int = 1  # the most GPUs one configuration's layout may use
    # the rules that read the model and workload (flags.validate_for_model): raise FlagError
    check: Callable[[Any], Any] | None = None
    gpus_fixed: int | None = None  # --fix num-gpus=N: layouts of exactly N GPUs

    def _finish(self, cfg: Any) -> Any:
        """The GPU count from the layout, then the layout's limits and the model's rules."""
        if self.max_gpus > 1 or F.layout_product(cfg) > 1:
            cfg = replace(cfg, num_gpus=F.layout_product(cfg))
        F.validate(cfg)
        return self._limits(cfg)

    def _limits(self, cfg: Any) -> Any:
        if self.gpus_fixed is not None and cfg.num_gpus != self.gpus_fixed:
            raise FlagError(f"the layout uses {cfg.num_gpus} GPUs; --fix num-gpus={self.gpus_fixed}")
        if cfg.num_gpus > self.max_gpus:
            raise FlagError(f"the layout needs {cfg.num_gpus} GPUs; a trial may use {self.max_gpus}")
        if self.check is not None:
            self.check(cfg)
        return cfg

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
        return self._finish(F.EngineConfig(**{F.FLAG_BY_NAME[k].attr: x for k, x in values.items()}))

    def params(self, cfg: Any) -> dict[str, Any]:
        """Optuna params that reproduce `cfg` (for enqueueing seeds)."""
        return {d.flag.name: getattr(cfg, d.flag.attr) for d in self.searched if F.is_active(d.flag, cfg)}

    def contains(self, cfg: Any) -> bool:
        if not all(getattr(cfg, d.flag.attr) in d.values for d in self.dims
                   if F.is_active(d.flag, cfg) and not (d.flag.name == DERIVED and self.max_gpus > 1)):
            return False
        try:
            return self._finish(cfg) == cfg
        except FlagError:
            return False

    def configs(self, dims: tuple[Dim, ...] | None = None) -> Iterator[Any]:
        """Every valid configuration of the space (for sizing and exhaustive small spaces)."""
        dims = dims or self.dims
        layout = [d for d in dims if d.flag.multi_gpu]
        rest = [d for d in dims if not d.flag.multi_gpu]
        seen = set()
        for lcombo in itertools.product(*(d.values for d in layout)):
            lvalues = {d.flag.name: v for d, v in zip(layout, lcombo)}
            try:  # a layout wrong with the default flags is wrong with any (its rules read the layout only)
                self._finish(F.EngineConfig(**{F.FLAG_BY_NAME[k].attr: v for k, v in lvalues.items()}))
            except FlagError:
                continue
            yield from self._configs(lvalues, rest, seen)

    def _configs(self, lvalues: dict[str, Any], rest: list[Dim], seen: set) -> Iterator[Any]:
        """Define-by-run, as Optuna samples: a dimension whose parent flag is off takes its default
        and is not branched on, so each configuration is built once (a product over every
        dimension built each one many times over)."""
        partial = {f.attr: f.default for f in F.FLAGS}
        partial.update({F.FLAG_BY_NAME[k].attr: v for k, v in lvalues.items()})
        layout = F.EngineConfig(**partial)
        if self.max_gpus > 1 or F.layout_product(layout) > 1:  # as _finish does
            partial["num_gpus"] = F.layout_product(layout)
        view = SimpleNamespace(**partial)

        def walk(i: int) -> Iterator[Any]:
            if i == len(rest):  # values from the checked dimensions, inactive ones at their defaults:
                try:            # what is left of _finish is the constraints and the limits
                    yield self._limits(F.check_constraints(F.EngineConfig(**vars(view))))
                except FlagError:
                    pass
                return
            d = rest[i]
            if not F.is_active(d.flag, view):
                yield from walk(i + 1)
                return
            for v in d.values:
                setattr(view, d.flag.attr, v)
                yield from walk(i + 1)
            setattr(view, d.flag.attr, d.flag.default)

        for cfg in walk(0):
            key = tuple(F.config_to_argv(cfg))
            if key not in seen:  # (the layout's _finish may fold two into one)
                seen.add(key)
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
    check: Callable[[Any], Any] | None = None,
) -> Space:
    """`gpu_count`: the most GPUs one trial may use (min of the study's GPUs and
    --max-gpus-per-trial); with two or more the parallel layouts enter the space."""
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
        if f.multi_gpu and (gpu_count < 2 or f.name == DERIVED):
            dims.append(Dim(f, (f.default,)))
            continue
        if f.name in DEGREES and f.name not in preset_space:
            dims.append(Dim(f, tuple(2**k for k in range(gpu_count.bit_length()) if 2**k <= gpu_count)))
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
    space = Space(tuple(dims), max(1, gpu_count), check, fix.get(DERIVED))
    if space.size() == 0:
        raise TunerError("the search space is empty: the --fix values violate a flag constraint")
    return space
