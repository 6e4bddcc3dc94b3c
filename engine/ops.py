"""The elementwise ops a DiT block calls through `self.ops`: by default the torch references of
its model file; with --fused-kernels, dittune.kernels' fused Triton ops of the same names,
signatures and semantics. A model file lists which of its ops have such a drop-in (FUSABLE)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

from torch import nn

from .errors import EngineError


class Ops(SimpleNamespace):
    """A block's op table; `fused` names the ops served by dittune.kernels."""

    fused: tuple[str, ...] = ()


def reference(fusable: tuple[str, ...], **fns: Callable) -> Ops:
    missing = set(fusable) - set(fns)
    if missing:
        raise ValueError(f"fusable ops without a reference: {sorted(missing)}")
    ops = Ops(**fns)
    ops.fusable = tuple(fusable)
    return ops


def use_fused_kernels(dit: nn.Module, device) -> list[str]:
    """Point every block op table of `dit` at dittune.kernels; returns the op names now fused.
    Refuses where the Triton kernels would not run (the ops would fall back to the reference)."""
    from dittune import kernels

    if not kernels.triton_available(device):
        raise EngineError(f"--fused-kernels: the Triton kernels cannot run on {device} (need CUDA and triton)")
    tables: dict[int, Ops] = {}
    names: set[str] = set()
    for m in dit.modules():
        ops = getattr(m, "ops", None)
        if not isinstance(ops, Ops):
            continue
        if id(ops) not in tables:
            fused = Ops(**{k: v for k, v in vars(ops).items()})
            for name in ops.fusable:
                setattr(fused, name, getattr(kernels, name))
            fused.fused = tuple(ops.fusable)
            tables[id(ops)] = fused
        m.ops = tables[id(ops)]
        names.update(ops.fusable)
    if not names:
        raise EngineError(f"--fused-kernels: {type(dit).__name__} has no fusable ops")
    return sorted(names)
