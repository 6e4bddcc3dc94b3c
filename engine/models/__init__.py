"""Model registry: exact names -> ModelSpec, one family file each (flux.py, qwen_image.py, zimage.py).

Family modules are imported on first use so that importing one family (in a test, say) does not
need the others."""

from __future__ import annotations

import importlib

from ..errors import EngineError
from .base import Family, ModelSpec

_FAMILY_MODULES = ("flux", "qwen_image", "zimage")


def _load() -> dict[str, tuple[ModelSpec, type[Family]]]:
    out = {}
    for mod_name in _FAMILY_MODULES:
        mod = importlib.import_module(f"{__name__}.{mod_name}")
        for name, spec in mod.SPECS.items():
            out[name] = (spec, mod.FAMILY)
    return out


_REGISTRY: dict[str, tuple[ModelSpec, type[Family]]] | None = None


def registry() -> dict[str, tuple[ModelSpec, type[Family]]]:
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = _load()
    return _REGISTRY


def model_names(include_tiny: bool = True) -> list[str]:
    return [n for n, (s, _) in registry().items() if include_tiny or not s.tiny]


def get_spec(name: str) -> ModelSpec:
    try:
        return registry()[name][0]
    except KeyError:
        raise EngineError(f"unknown model {name!r}; known models: {', '.join(model_names())}") from None


def get_family(name: str) -> Family:
    spec = get_spec(name)
    return registry()[name][1](spec)


def tensor_plan(spec: ModelSpec):
    """The family's tensor-parallel plan for this spec's DiT (engine/parallel/tensor.py)."""
    return importlib.import_module(f"{__name__}.{spec.family}").tensor_plan(spec.dit_config)
