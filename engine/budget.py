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


def format_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
