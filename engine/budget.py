"""VRAM budgets as users write them: 24GiB, 24G, 24000MiB, 0.5 (of the card), 80%."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import EngineError

_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-zA-Z%]*)\s*$")


class BudgetError(EngineError):
    pass


@dataclass(frozen=True)
class Budget:
    """Either an absolute number of bytes or a fraction of the card's memory."""

    bytes: int | None = None
    fraction: float | None = None
    text: str = ""

    def resolve(self, total_bytes: int | None) -> int:
        if self.bytes is not None:
            return self.bytes
        if total_bytes is None:
            raise BudgetError(
                f"VRAM budget {self.text!r} is a fraction of the card, but no GPU memory size is known; "
                "give an absolute size such as 24GiB"
            )
        return int(self.fraction * total_bytes)

    def __str__(self) -> str:
        if self.bytes is not None:
            return format_bytes(self.bytes)
        return f"{self.fraction:.0%} of the card"


def parse_budget(text: str) -> Budget:
    m = _RE.match(text or "")
    if not m:
        raise BudgetError(f"malformed VRAM budget {text!r}; use e.g. 24GiB, 24G, 24000MiB, 0.5 or 80%")
    number, unit = float(m.group(1)), m.group(2).lower()
    if unit == "%":
        if not 0 < number <= 100:
            raise BudgetError(f"VRAM budget {text!r}: a percentage must be in (0, 100]")
        return Budget(fraction=number / 100, text=text)
    if unit == "":
        if not 0 < number <= 1:
            raise BudgetError(
                f"VRAM budget {text!r}: a bare number is a fraction of the card in (0, 1]; "
                "add a unit for sizes (e.g. 24GiB)"
            )
        return Budget(fraction=number, text=text)
    if unit not in _UNITS:
        raise BudgetError(f"VRAM budget {text!r}: unknown unit {m.group(2)!r}; use GiB, GB, MiB, G or M")
    n = int(number * _UNITS[unit])
    if n <= 0:
        raise BudgetError(f"VRAM budget {text!r} must be positive")
    return Budget(bytes=n, text=text)


# A VRAM budget is what the process may use on a real card of that size: the CUDA context and
# everything else outside torch's caching allocator included. What lives outside it, measured:
# H200, FLUX.1-dev under 24 GiB, NVML's process usage 0.75 GiB above the torch reserved peak
# (issue 14); of that the CUDA context is ~0.5 GiB, read at start where NVML sees the process.
# After that start read, lazily loaded kernel modules (cuBLAS, cuDNN, Triton / inductor kernels)
# and their handles grow it, and under several GPUs NCCL's communicators and buffers: the headroom
# below covers that growth. Where NVML cannot see the process at start, the whole allowance is
# DEFAULT_OUTSIDE_BYTES. The measured margin of every trial (NVML peak - reserved peak) is stored
# with it, so a wrong constant shows as stored peaks over the budget, never as a silent overrun.
OUTSIDE_GROWTH_BYTES = 512 * 2**20
NCCL_BYTES = 512 * 2**20  # per rank when a layout spans several GPUs
DEFAULT_OUTSIDE_BYTES = 5 * 2**30 // 4  # 1.25 GiB: the H200's 0.75 GiB, with room


def outside_allowance(context_bytes: int | None, num_gpus: int = 1) -> int:
    """Bytes kept free of the torch allocator for what lives outside it (see above).
    `context_bytes`: NVML's usage of this process minus torch's reserved bytes, read once CUDA is
    initialised (None where NVML cannot see the process)."""
    base = DEFAULT_OUTSIDE_BYTES if context_bytes is None else context_bytes + OUTSIDE_GROWTH_BYTES
    return base + (NCCL_BYTES if num_gpus > 1 else 0)


def allocator_cap(budget_bytes: int, outside_bytes: int) -> int:
    """The torch allocator's cap under a whole-process budget (at least 1 byte: a budget smaller than
    the outside allowance leaves nothing for tensors and the first allocation fails as out of memory)."""
    return max(budget_bytes - outside_bytes, 1)


def format_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
