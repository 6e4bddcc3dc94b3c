"""The tuner: search space, memory model, trial worker, Optuna study, emit/export."""

from .errors import TunerError
from .study import TuneOptions, TuneResult, parse_duration, tune

__all__ = ["TunerError", "TuneOptions", "TuneResult", "parse_duration", "tune"]
