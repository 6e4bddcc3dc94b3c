"""The study's state as the database holds it: every configuration tried (dedupe: a configuration
measured before is answered from its row, never re-run), the measured count, the best latency and
the patience counter, and the monotone out-of-memory rule. Also how one trial's outcome becomes
a database record and an Optuna tell."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from optuna.trial import TrialState

from dittune import db as D
from dittune.engine import flags as F
from dittune.engine.perf import binding_peak, run_latency

from .options import Setup
from .runner import Outcome

INFEASIBLE_LATENCY = 1e9  # a value Optuna accepts; constrained TPE ranks infeasible trials by violation anyway


@dataclass
class State:
    tried: dict[str, D.TrialRecord]  # argv -> latest record of that configuration in this study
    measured: int = 0
    best: float | None = None
    since_improvement: int = 0
    budget_fail: list[Any] = field(default_factory=list)  # configs that ran out of memory

    @classmethod
    def load(cls, db: D.Database, study_id: int) -> "State":
        st = cls({})
        for t in D.trials(db, study_id=study_id):
            if t.status == "confirmed":
                continue
            st.add(t.argv, D.TrialRecord(status=t.status, flags=t.flags, argv=t.argv, latency_s=t.latency_s,
                                         peak_vram_bytes=t.peak_vram_bytes, reason=t.reason,
                                         step_spread=t.step_spread, cold_start_s=t.cold_start_s,
                                         manifest=dict(t.manifest or {})))  # its stage peaks: for the climb
        return st

    def add(self, argv: str, rec: D.TrialRecord) -> None:
        self.tried[argv] = rec
        if rec.status == "oom":
            self.budget_fail.append(F.config_from_dict(rec.flags))
        if rec.status != "complete":
            return
        self.measured += 1
        if self.best is None or rec.latency_s < self.best * 0.99:
            self.best = rec.latency_s if self.best is None else min(self.best, rec.latency_s)
            self.since_improvement = 0
        else:
            self.best = min(self.best, rec.latency_s)
            self.since_improvement += 1

    def known_infeasible(self, cfg) -> str | None:
        """Monotone rule: if k resident layers ran out of memory, k + 1 will too."""
        if not cfg.dit_layerwise_offload:
            return None
        for bad in self.budget_fail:
            if bad.dit_layerwise_offload and replace(bad, dit_resident_layers=0) == replace(cfg, dit_resident_layers=0) \
                    and cfg.dit_resident_layers >= bad.dit_resident_layers:
                return f"{bad.dit_resident_layers} resident layers already ran out of memory"
        return None

    def oom_counts(self, cfg) -> list[int]:
        """Resident counts of `cfg`'s streamed variants that ran out of memory."""
        return [bad.dit_resident_layers for bad in self.budget_fail if bad.dit_layerwise_offload
                and replace(bad, dit_resident_layers=0) == replace(cfg, dit_resident_layers=0)]

    def best_text(self) -> str:
        return f"{self.best:.3f} s" if self.best is not None else "-"


def record_from(outcome: Outcome, cfg, argv: str, number: int | None, s: Setup, predicted: int | None) -> D.TrialRecord:
    rec = D.TrialRecord(status=outcome.status, flags=F.config_to_dict(cfg), argv=argv, optuna_number=number,
                        reason=outcome.reason, stderr_tail=outcome.stderr_tail if outcome.status != "complete" else "",
                        predicted_vram_bytes=predicted)
    d = outcome.dump
    if d is None:
        return rec
    st = d["stages"]
    rec.manifest = {**d["manifest"], "peak_vram": d["peak_vram"], "cold_start": d["cold_start"],  # + stage peaks, load parts
                    # what the trial cost: its process's wall time, and whether it started warm (imports done)
                    "trial": {"wall_s": round(outcome.wall_s, 3), "warm_worker": outcome.warm}}
    rec.stage_times = st
    rec.step_times = d["steps_s"]
    rec.step_median_s = d["step_median_s"]
    rec.step_spread = d["step_spread"]
    # Full-request latency of the workload's steps: the median request's, on the CPU the fastest one's.
    rec.latency_s, stat = run_latency(d, s.steps, s.device)
    # The budget binds the whole footprint (NVML's process peak); torch's reserved peak stays beside it.
    rec.peak_vram_bytes, kind = binding_peak(d["peak_vram"])
    rec.cold_start_s = d["cold_start"]["total_s"]
    rec.manifest["evidence"] = {
        "peak_kind": kind, "torch_reserved_peak_bytes": d["peak_vram"].get("torch_max_reserved_bytes"),
        "nvml_peak_bytes": d["peak_vram"].get("nvml_process_peak_bytes"),
        "warmup_requests": d.get("warmup_requests"), "warmup": d.get("warmup"), "band_source": "single run",
        "measured_requests": (d.get("measured") or {}).get("requests"), "latency_stat": stat,
    }
    return rec


def told(study, trial, values=None, state=None) -> bool:
    """study.tell, False where the Optuna trial had already been finished by another process: a
    sweeper fails RUNNING trials with no lease once older than the TTL, and on a starved machine
    (CI, two cores shared by two test runs) a trial's ask and its lease were seen that far apart.
    What dittune stored stays; only the sampler's copy of that one trial is the sweeper's."""
    from optuna.exceptions import UpdateFinishedTrialError

    number = trial if isinstance(trial, int) else trial.number
    if all(t.number != number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))):
        return False
    try:
        study.tell(trial, values, state=state)
    except UpdateFinishedTrialError:  # closed between the read above and this write
        return False
    return True


def tell(study, trial, rec: D.TrialRecord, budget: int | None, objective: str) -> bool:
    """Measured trials report (latency, peak GiB). Trials that did not fit the budget (pruned by
    the memory model, or out of memory) report as infeasible with the predicted or the budget's
    peak as the constraint value, so the sampler learns where the wall is; other failures FAIL.
    False where another process had finished the Optuna trial (told)."""
    if rec.status == "complete":
        peak = rec.peak_vram_bytes or 0
        if budget is not None:
            trial.set_constraint("vram", (peak - budget) / 2**30)
        values = [rec.latency_s, peak / 2**30] if objective == "frontier" else [rec.latency_s]
        return told(study, trial, values)
    if budget is not None and rec.status in ("pruned", "oom"):
        peak = max(rec.predicted_vram_bytes or 0, budget + 2**30)
        trial.set_constraint("vram", (peak - budget) / 2**30)
        values = [INFEASIBLE_LATENCY, peak / 2**30] if objective == "frontier" else [INFEASIBLE_LATENCY]
        return told(study, trial, values)
    return told(study, trial, state=TrialState.FAIL)
