"""The answers the CLI and the service give: recommend and export, both decided by db.best
(BEST_RULE), rendered with the evidence and the rule that picked each row. `dittune recommend`,
`dittune export` and the HTTP service call these functions, so they cannot disagree."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from dittune import db as D
from dittune.errors import DittuneError


class NoAnswer(DittuneError):
    """The question is well formed but nothing measured answers it."""


@dataclass(frozen=True)
class Question:
    """(model, GPU kind, GPU count, budget): what recommend and export are asked."""

    model: str | None
    gpu: str | None = None
    num_gpus: int | None = None  # None: every GPU count measured, one answer each
    vram_budget: str | None = None

    def check(self) -> Callable[[int], int] | None:
        """Validate the question before the database is read; return the budget function."""
        from dittune.engine.budget import parse_budget
        from dittune.engine.models import get_spec

        if self.model is not None:
            get_spec(self.model)
        if self.num_gpus is not None and self.num_gpus < 1:
            raise DittuneError(f"--num-gpus {self.num_gpus}: need at least one GPU")
        return None if self.vram_budget is None else parse_budget(self.vram_budget).resolve

    def describe(self) -> str:
        where = f" on a GPU matching {self.gpu!r}" if self.gpu else ""
        count = f" with {self.num_gpus} GPU(s)" if self.num_gpus else ""
        fits = f" within {self.vram_budget}" if self.vram_budget else ""
        return f"{self.model or 'any model'}{where}{count}{fits}"


def _current() -> dict[str, Any]:
    from dittune.tuner.versions import staleness_keys

    return staleness_keys()


def recommend(db: D.Database, q: Question, current: dict[str, Any] | None = None) -> list[D.Result]:
    """The best stored configuration per workload, GPU kind and GPU count (db.best)."""
    budget = q.check()
    rows = D.best(db, q.model, q.gpu, budget, _current() if current is None else current, num_gpus=q.num_gpus)
    if not rows:
        raise NoAnswer(f"no measured configuration of {q.describe()}; run `dittune tune {q.model or 'MODEL'}`")
    return rows


def answer_dict(r: D.Result) -> dict[str, Any]:
    """emit.to_dict plus what the answer needs to be trusted: GPU count, the rule that picked it,
    where its noise band comes from, and which versions differ when it is stale."""
    from dittune.tuner import emit

    return {**emit.to_dict(r), "num_gpus": r.num_gpus, "rule": r.rule or None}


def answer_text(r: D.Result) -> str:
    from dittune.tuner import emit

    return f"{emit.render_text(r)}\n  GPUs: {r.num_gpus}; picked: {r.rule}"


def export(db: D.Database, q: Question, fmt: str, current: dict[str, Any] | None = None) -> tuple[str, int]:
    """The frontier as command lines (fastest first per group), each group's best by BEST_RULE
    marked (and included even where a tie within noise put it off the frontier). Returns
    (text, rows)."""
    from dittune.tuner import emit

    if fmt not in emit.FORMATS:
        raise DittuneError(f"--format {fmt!r}: choose one of {', '.join(emit.FORMATS)}")
    budget = q.check()
    cur = _current() if current is None else current
    rows = D.frontier(db, q.model, q.gpu, budget, cur, num_gpus=q.num_gpus)
    picks = D.best(db, q.model, q.gpu, budget, cur, num_gpus=q.num_gpus)
    if not rows:
        raise NoAnswer(f"no measured configurations of {q.describe()}; run `dittune tune MODEL` first")
    on_front = {r.trial_id for r in rows}
    rows += [p for p in picks if p.trial_id not in on_front]
    rows.sort(key=lambda r: (r.group, r.latency_s))
    best = {p.trial_id: p for p in picks}
    text = emit.render(rows, fmt)
    if fmt == "json":
        out = []
        for r, d in zip(rows, json.loads(text)):
            p = best.get(r.trial_id)
            out.append({**d, "num_gpus": r.num_gpus, "best": p is not None, "rule": p.rule if p else None})
        return json.dumps(out, indent=2) + "\n", len(rows)
    lead = "" if fmt == "md" else "# "
    engine = " by dittune's own engine (not SGLang)" if fmt == "sglang" else ""
    notes = [f"{lead}best ({p.model} on {p.gpu}, {p.num_gpus} GPU(s)): trial {p.trial_id}, {p.latency_s:.3f} s measured"
             f"{engine}; {p.rule}" for p in picks]
    if fmt == "md":
        return text + "\n" + "\n".join(f"- {n}" for n in notes) + "\n", len(rows)
    head, _, body = text.partition("\n")  # keep the #!/bin/sh line first
    return head + "\n" + "\n".join(notes) + "\n" + body, len(rows)
