"""What the service shows: a study as JSON, and the HTML pages (studies list, one study with its
plots, the API index). `dittune report` writes the study page as one self-contained file."""

from __future__ import annotations

import datetime as dt
from html import escape
from typing import Any
from urllib.parse import quote

from dittune import __version__, answers
from dittune import db as D
from dittune.errors import DittuneError

from . import svg

GiB = 2**30

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#222;padding:0 1em}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f0f0f0}pre{background:#f6f6f6;padding:8px;white-space:pre-wrap;word-break:break-all}
.stale{color:#b00}.note{color:#555;font-size:13px}.err{color:#b00;font-weight:bold}
form{margin:.5em 0;padding:.5em;background:#f6f6f6;display:inline-block}input{width:7em}
"""


def _gib(b: int | None) -> str:
    return "-" if b is None else f"{b / GiB:.2f} GiB"


def _s(v: float | None, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n{body}\n"
            f'<p class="note">dittune {escape(__version__)}, rendered {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC'
            f"</p></body></html>\n")


def summary_dict(s: D.StudySummary) -> dict[str, Any]:
    return {
        "name": s.name, "model": s.model, "workload": {"width": s.width, "height": s.height, "steps": s.steps,
                                                       "guidance": s.guidance},
        "gpu": {"name": s.gpu, "memory_bytes": s.gpu_memory_bytes}, "budget_bytes": s.budget_bytes or None,
        "objective": s.objective, "allow_lossy": s.allow_lossy, "trials": s.trials, "measured": s.measured,
        "best_latency_s": s.best_latency_s, "best_trial_id": s.best.trial_id if s.best else None,
        "created_at": s.created_at.isoformat(), "versions": s.versions,
        "registry_hash": s.registry_hash, "stale": s.stale, "stale_reasons": list(s.stale_reasons),
    }


def _trial_dict(t: D.Trial) -> dict[str, Any]:
    return {
        "id": t.id, "number": t.optuna_number, "status": t.status, "reason": t.reason or None,
        "num_gpus": int(t.flags.get("num-gpus", 1)), "argv": t.argv, "latency_s": t.latency_s,
        "step_median_s": t.step_median_s, "step_spread": t.step_spread, "peak_vram_bytes": t.peak_vram_bytes,
        "predicted_vram_bytes": t.predicted_vram_bytes, "cold_start_s": t.cold_start_s,
        "created_at": t.created_at.isoformat(),
    }


def _study_budget(s: D.StudySummary):
    return (lambda total: s.budget_bytes) if s.budget_bytes else None


def study_dict(db: D.Database, name: str, current: dict[str, Any]) -> dict[str, Any]:
    s = D.study(db, name, current)
    rows = D.measured(db, study=name)
    return {
        **summary_dict(s),
        "best": [answers.answer_dict(r) for r in D.best(db, None, budget=_study_budget(s), study=name)],
        "frontier": [answers.answer_dict(r) for r in _front(rows)],
        "trial_rows": [_trial_dict(t) for t in D.trials(db, study_name=name)],
    }


def _front(rows: list[D.Result]) -> list[D.Result]:
    groups: dict[tuple, list[D.Result]] = {}
    for r in rows:
        groups.setdefault(r.group, []).append(r)
    return [r for k in sorted(groups) for r in D.pareto(groups[k])]


def studies_page(rows: list[D.StudySummary]) -> str:
    body = ["<h1>dittune studies</h1>", f'<p class="note">Best by the rule: {escape(D.BEST_RULE)}. '
            'JSON API: <a href="/docs">/docs</a>.</p>']
    if not rows:
        body.append("<p>No studies yet: run <code>dittune tune MODEL</code>.</p>")
    else:
        body.append("<table><tr><th>study</th><th>model</th><th>workload</th><th>GPU</th><th>budget</th>"
                    "<th>objective</th><th>trials</th><th>measured</th><th>best (s)</th><th>created</th></tr>")
        for s in rows:
            stale = f' <span class="stale" title="{escape(", ".join(s.stale_reasons))}">stale</span>' if s.stale else ""
            body.append(
                f'<tr><td><a href="/studies/{quote(s.name, safe="")}">{escape(s.name)}</a>{stale}</td><td>{escape(s.model)}</td>'
                f"<td>{s.width}x{s.height}, {s.steps} steps</td><td>{escape(s.gpu)}</td>"
                f"<td>{_gib(s.budget_bytes) if s.budget_bytes else '-'}</td><td>{s.objective}</td><td>{s.trials}</td>"
                f"<td>{s.measured}</td><td>{_s(s.best_latency_s)}</td><td>{s.created_at:%Y-%m-%d %H:%M}</td></tr>")
        body.append("</table>")
    return _page("dittune studies", "\n".join(body))


def _answer_html(r: D.Result) -> str:
    from dittune.tuner import emit

    stale = f'<p class="stale">{escape(emit.stale_text(r))}</p>' if r.stale else ""
    return (
        f'<div class="answer"><pre class="command">{escape(emit.generate_command(r))}</pre>'
        f"<p>{r.latency_s:.3f} s per request (step median {_s(r.step_median_s and r.step_median_s * 1e3, '.1f')} ms), "
        f"noise band {escape(emit.band_text(r))}, {escape(emit.peak_text(r))}, {r.num_gpus} GPU(s), cold start "
        f"{_s(r.cold_start_s, '.1f')} s; trial {r.trial_id} ({r.status}), measured {r.measured_at:%Y-%m-%d %H:%M}, "
        f"{escape(emit.versions_text(r))}.</p>"
        f'<p class="note">Picked: {escape(r.rule)}</p>{stale}'
        f'<p class="note">Re-measure: <code>{escape(emit.remeasure_command(r))}</code></p></div>')


def _ask(db: D.Database, s: D.StudySummary, current, vram_budget: str | None, num_gpus: str | None) -> str:
    """The form's answer, from this study's trials, by the one rule (db.best)."""
    try:
        n = None
        if num_gpus is not None:
            if not num_gpus.strip().isdigit() or int(num_gpus) < 1:
                raise DittuneError(f"GPU count {num_gpus!r}: give a whole number >= 1")
            n = int(num_gpus)
        budget = answers.Question(None, None, n, vram_budget).check()
        rows = D.best(db, None, budget=budget, num_gpus=n, study=s.name)
    except DittuneError as e:
        return f'<p class="err">{escape(str(e))}</p>'
    if not rows:
        return '<p class="err">No measured configuration of this study fits that budget and GPU count.</p>'
    return "".join(_answer_html(r) for r in rows)


def study_page(db: D.Database, name: str, current: dict[str, Any], vram_budget: str | None = None,
               num_gpus: str | None = None, interactive: bool = True) -> str:
    s = D.study(db, name, current)
    rows = D.measured(db, study=name)
    front = _front(rows)
    picks = D.best(db, None, budget=_study_budget(s), study=name)
    trials = D.trials(db, study_name=name)
    v = ", ".join(f"{k} {val}" for k, val in sorted(s.versions.items()) if val)
    body = [
        f"<h1>{escape(s.name)}</h1>",
        f"<p><b>{escape(s.model)}</b> {s.width}x{s.height}, {s.steps} steps, guidance {s.guidance:g} on "
        f"<b>{escape(s.gpu)}</b> ({_gib(s.gpu_memory_bytes) if s.gpu_memory_bytes else 'CPU'}); budget "
        f"{_gib(s.budget_bytes) if s.budget_bytes else 'the whole card'}; objective {s.objective}; "
        f"{s.measured} measured of {s.trials} trials.</p>",
        f'<p class="note">Versions: {escape(v)}; registry {escape(s.registry_hash)}</p>',
    ]
    if s.stale:
        body.append(f'<p class="stale">STALE: measured with other versions ({escape(", ".join(s.stale_reasons))})</p>')
    body.append("<h2>Recommended command</h2>")
    body += [_answer_html(r) for r in picks] or ["<p>Nothing measured within the study's budget yet.</p>"]
    if interactive:
        body.append(
            f'<h2>My budget / my GPU count</h2><form method="get" action="/studies/{quote(s.name, safe="")}">'
            f'VRAM budget <input name="vram_budget" placeholder="24GiB or 0.5" value="{escape(vram_budget or "")}"> '
            f'GPUs <input name="num_gpus" placeholder="1" value="{escape(num_gpus or "")}"> '
            '<button type="submit">answer</button></form>')
        if vram_budget or num_gpus:
            body.append(_ask(db, s, current, vram_budget, num_gpus))
    body.append("<h2>Latency / VRAM frontier</h2>"
                '<p class="note">Every measured configuration is a point; the line is the frontier (fastest for each '
                "budget); the ringed point is the recommendation; marker and colour give the GPU count.</p>")
    body.append(svg.frontier_svg(rows, front, s.budget_bytes, {p.trial_id for p in picks}))
    body.append('<p class="note">The frontier: each row is the fastest configuration for budgets from its peak up to '
                "the next row's" + ("" if interactive else " (ask <code>dittune serve</code> or <code>dittune recommend"
                                                          "</code> for any other budget or GPU count)") + ".</p>")
    body.append("<table><tr><th>latency (s)</th><th>peak VRAM</th><th>GPUs</th><th>trial</th><th>flags</th></tr>")
    for r in front:
        body.append(f"<tr><td>{r.latency_s:.3f}</td><td>{_gib(r.peak_vram_bytes)}</td><td>{r.num_gpus}</td>"
                    f"<td>{r.trial_id}</td><td><code>{escape(r.argv or '(defaults)')}</code></td></tr>")
    body.append("</table>")
    body.append("<h2>Per-flag effect</h2><p class=\"note\">Median latency of this study's measured configurations "
                "with each value of each flag that varied.</p>")
    body.append(svg.effects_svg(svg.flag_effects(rows)))
    body.append("<h2>Trials</h2><table><tr><th>id</th><th>#</th><th>status</th><th>latency (s)</th><th>step (ms)</th>"
                "<th>peak VRAM</th><th>predicted</th><th>cold start (s)</th><th>flags</th><th>reason</th></tr>")
    for t in trials:
        body.append(
            f'<tr class="trial-row"><td>{t.id}</td><td>{"" if t.optuna_number is None else t.optuna_number}</td>'
            f"<td>{t.status}</td><td>{_s(t.latency_s)}</td><td>{_s(t.step_median_s and t.step_median_s * 1e3, '.1f')}</td>"
            f"<td>{_gib(t.peak_vram_bytes)}</td><td>{_gib(t.predicted_vram_bytes)}</td><td>{_s(t.cold_start_s, '.1f')}</td>"
            f"<td><code>{escape(t.argv or '(defaults)')}</code></td><td>{escape((t.reason or '')[:300])}</td></tr>")
    body.append("</table>")
    if interactive:
        body.insert(0, '<p><a href="/">all studies</a></p>')
    return _page(f"dittune: {s.name}", "\n".join(body))


def api_page(openapi: dict[str, Any]) -> str:
    """The OpenAPI description as a plain page (the raw schema: /openapi.json); no CDN script."""
    body = [f"<h1>{escape(openapi['info']['title'])} API {escape(openapi['info']['version'])}</h1>",
            '<p>Schema: <a href="/openapi.json">/openapi.json</a>. Writes need <code>Authorization: Bearer '
            "&lt;token&gt;</code>.</p><table><tr><th>method</th><th>path</th><th>what</th><th>parameters</th></tr>"]
    for path, ops in openapi["paths"].items():
        for method, op in ops.items():
            params = ", ".join(p["name"] + ("" if p.get("required") else "?") for p in op.get("parameters", []))
            if "requestBody" in op:
                params = (params + ", " if params else "") + "JSON body"
            body.append(f"<tr><td>{method.upper()}</td><td><code>{escape(path)}</code></td>"
                        f"<td>{escape(op.get('summary', ''))}</td><td>{escape(params)}</td></tr>")
    body.append("</table>")
    return _page("dittune API", "\n".join(body))


def report(db: D.Database, name: str, current: dict[str, Any]) -> str:
    """`dittune report`: the study page as one self-contained file (inline style and SVG)."""
    return study_page(db, name, current, interactive=False)
