from dittune.errors import DittuneError


class EngineError(DittuneError):
    """The engine cannot do what was asked (unsupported flag, bad checkpoint, bad workload)."""


class FlagError(EngineError):
    """An engine configuration violates the flag registry (bad value or combination)."""


class BudgetExceededError(EngineError):
    """The run needed more VRAM than the budget the engine was capped at."""
