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


def single_gpu_peers(db: D.Database, q: Question, rows: list[D.Result],
                     current: dict[str, Any] | None = None) -> dict[int, D.Result]:
    """For each answer on several GPUs, the best one-GPU answer of the same workload, GPU kind and
    budget (by trial id of the wide answer): what N replicas of it would serve instead."""
    wide = [r for r in rows if r.num_gpus > 1]
    if not wide:
        return {}
    ones = D.best(db, q.model, q.gpu, q.check(), _current() if current is None else current, num_gpus=1)
    by_group = {r.group[:-1]: r for r in ones}
    return {r.trial_id: by_group[r.group[:-1]] for r in wide if r.group[:-1] in by_group}


def _replicas(r: D.Result, single: D.Result) -> dict[str, Any]:
    n = r.num_gpus
    return {"single_gpu_trial_id": single.trial_id, "single_gpu_latency_s": single.latency_s,
            "replicas": n, "replicas_images_per_s": n / single.latency_s, "layout_images_per_s": 1 / r.latency_s,
            "more_images_per_s": "replicas" if n / single.latency_s > 1 / r.latency_s else "layout",
            "layout_speedup": single.latency_s / r.latency_s}


def answer_dict(r: D.Result, single: D.Result | None = None) -> dict[str, Any]:
    """emit.to_dict plus what the answer needs to be trusted: GPU count, the rule that picked it,
    where its noise band comes from, and which versions differ when it is stale; on several GPUs,
    against replicas of the best one-GPU answer (`single`, single_gpu_peers) where there is one."""
    from dittune.tuner import emit

    out = {**emit.to_dict(r), "num_gpus": r.num_gpus, "rule": r.rule or None}
    if single is not None and r.num_gpus > 1:
        out["vs_single_gpu_replicas"] = _replicas(r, single)
    return out


def answer_text(r: D.Result, single: D.Result | None = None) -> str:
    from dittune.tuner import emit

    text = f"{emit.render_text(r)}\n  GPUs: {r.num_gpus}; picked: {r.rule}"
    if single is not None and r.num_gpus > 1:
        x = _replicas(r, single)
        more = (f"{x['replicas']} replicas serve more images" if x["more_images_per_s"] == "replicas"
                else "this layout serves more images")
        text += (f"\n  throughput: {x['layout_images_per_s']:.3g} images/s on {r.num_gpus} GPUs; {x['replicas']} "
                 f"replicas of the one-GPU best (trial {single.trial_id}, {single.latency_s:.3f} s) would serve "
                 f"{x['replicas_images_per_s']:.3g}: {more}, this layout answers each request "
                 f"{x['layout_speedup']:.2f}x as fast")
    return text


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
