"""Study presets (studies/<model>.toml): workload defaults, measurement settings, space limits and
the configurations to try first. A model without a preset gets its ModelSpec defaults."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from dittune.engine import flags as F
from dittune.engine.errors import FlagError
from dittune.engine.models import ModelSpec

from .errors import TunerError


@dataclass(frozen=True)
class Preset:
    width: int
    height: int
    steps: int
    guidance: float
    measure_steps: int = 4
    warmup: int = 1
    timeout_s: float = 600.0
    space: dict[str, list[Any]] = field(default_factory=dict)  # flag -> values to search
    # flag dicts; a seed marked `wide = true` in the preset carries WIDE: True (tuner/seeds.py)
    seeds: tuple[dict[str, Any], ...] = ({},)


WIDE = "_wide"  # a seed also tried on the widest layouts when trials may use several GPUs


def load_preset(spec: ModelSpec) -> Preset:
    name = f"{spec.name}.toml"
    files = resources.files("dittune.studies")
    if not files.joinpath(name).is_file():
        return Preset(spec.width, spec.height, spec.steps, spec.guidance, measure_steps=min(4, spec.steps))
    try:
        data = tomllib.loads(files.joinpath(name).read_text())
    except tomllib.TOMLDecodeError as e:
        raise TunerError(f"studies/{name}: {e}") from None
    w, m = data.get("workload", {}), data.get("measure", {})
    space: dict[str, list[Any]] = {}
    for flag_name, values in data.get("space", {}).items():
        if flag_name not in F.FLAG_BY_NAME or not isinstance(values, list) or not values:
            raise TunerError(f"studies/{name}: [space] {flag_name} must be a registry flag with a non-empty list")
        f = F.FLAG_BY_NAME[flag_name]
        try:
            space[flag_name] = [f.parse(v) for v in values]
        except FlagError as e:
            raise TunerError(f"studies/{name}: {e}") from None
    seeds = []
    for s in data.get("seed", [{}]):
        s = dict(s)
        wide = s.pop("wide", False)
        if not isinstance(wide, bool):
            raise TunerError(f"studies/{name}: seed {s}: wide must be true or false")
        try:
            seeds.append({**F.config_to_dict(F.config_from_dict(s), non_default=True), **({WIDE: True} if wide else {})})
        except FlagError as e:
            raise TunerError(f"studies/{name}: seed {s}: {e}") from None
    return Preset(
        width=int(w.get("width", spec.width)), height=int(w.get("height", spec.height)),
        steps=int(w.get("steps", spec.steps)), guidance=float(w.get("guidance", spec.guidance)),
        measure_steps=int(m.get("steps", 4)), warmup=int(m.get("warmup", 1)), timeout_s=float(m.get("timeout_s", 600)),
        space=space, seeds=tuple(seeds),
    )
