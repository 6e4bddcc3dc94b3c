"""Plots rendered server-side as inline SVG (no script, no network): the latency/VRAM frontier of
a study and the per-flag effect bars."""

from __future__ import annotations

import statistics
from html import escape
from typing import Any

from dittune import db as D

GiB = 2**30
# one colour and marker per GPU count, so layouts on 1, 2, 4, 8 GPUs stay distinguishable
_STYLE = {1: ("#1f77b4", "circle"), 2: ("#d62728", "square"), 4: ("#2ca02c", "diamond"), 8: ("#9467bd", "triangle")}


def _style(n: int) -> tuple[str, str]:
    return _STYLE.get(n, ("#8c564b", "circle"))


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    step = (hi - lo) / n
    return [lo + i * step for i in range(n + 1)]


def _marker(shape: str, x: float, y: float, colour: str, attrs: str, title: str = "") -> str:
    inner = f"<title>{escape(title)}</title>" if title else ""
    if shape == "square":
        return (f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="{colour}" {attrs}>'
                f"{inner}</rect>")
    if shape in ("diamond", "triangle"):
        pts = (f"{x:.1f},{y - 5:.1f} {x + 5:.1f},{y:.1f} {x:.1f},{y + 5:.1f} {x - 5:.1f},{y:.1f}" if shape == "diamond"
               else f"{x:.1f},{y - 5:.1f} {x + 5:.1f},{y + 4:.1f} {x - 5:.1f},{y + 4:.1f}")
        return f'<polygon points="{pts}" fill="{colour}" {attrs}>{inner}</polygon>'
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4.5" fill="{colour}" {attrs}>{inner}</circle>'


def frontier_svg(rows: list[D.Result], front: list[D.Result], budget_bytes: int = 0,
                 picked: set[int] = frozenset(), w: int = 720, h: int = 380) -> str:
    """Every measured configuration as a point (x: peak VRAM, y: latency), the frontier per GPU
    count as a step line, the study's budget as a dashed line, the best pick ringed."""
    if not rows:
        return '<svg class="frontier" xmlns="http://www.w3.org/2000/svg" width="720" height="60"><text x="10" y="30">no measured trials</text></svg>'
    left, right, top, bottom = 70, 20, 20, 50
    gib = [(r.peak_vram_bytes or 0) / GiB for r in rows]
    lat = [r.latency_s for r in rows]
    x_hi = max(gib + [budget_bytes / GiB]) * 1.08 or 1.0
    y_lo, y_hi = min(lat) * 0.92, max(lat) * 1.05
    if y_hi - y_lo < 1e-9:
        y_lo, y_hi = y_lo * 0.5, y_hi * 1.5 + 1e-3

    def X(v: float) -> float:
        return left + (w - left - right) * v / x_hi

    def Y(v: float) -> float:
        return top + (h - top - bottom) * (1 - (v - y_lo) / (y_hi - y_lo))

    out = [f'<svg class="frontier" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect x="{left}" y="{top}" width="{w - left - right}" height="{h - top - bottom}" fill="#fafafa" stroke="#999"/>']
    for t in _ticks(0, x_hi):
        out.append(f'<text x="{X(t):.1f}" y="{h - bottom + 15}" text-anchor="middle">{t:.1f}</text>')
    for t in _ticks(y_lo, y_hi):
        out.append(f'<text x="{left - 6}" y="{Y(t) + 4:.1f}" text-anchor="end">{t:.3g}</text>')
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" stroke="#e4e4e4"/>')
    xlabel = "peak VRAM (GiB)" if any(r.peak_vram_bytes for r in rows) else "peak VRAM (none measured: a CPU study)"
    out.append(f'<text x="{(left + w - right) / 2}" y="{h - 12}" text-anchor="middle">{xlabel}</text>')
    out.append(f'<text x="14" y="{(top + h - bottom) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {(top + h - bottom) / 2})">latency per request (s)</text>')
    if budget_bytes:
        bx = X(budget_bytes / GiB)
        out.append(f'<line class="budget" x1="{bx:.1f}" x2="{bx:.1f}" y1="{top}" y2="{h - bottom}" stroke="#e377c2" '
                   f'stroke-dasharray="5,4"/><text x="{bx - 4:.1f}" y="{top + 12}" text-anchor="end" fill="#e377c2">'
                   f'budget {budget_bytes / GiB:.1f} GiB</text>')
    counts = sorted({r.num_gpus for r in rows})
    for n in counts:
        colour, _ = _style(n)
        pts = [r for r in front if r.num_gpus == n]
        if len(pts) > 1:
            path = []
            for a, b in zip(pts, pts[1:]):  # fastest first; below a's peak the answer is b, down to b's peak
                path += [f"{X((a.peak_vram_bytes or 0) / GiB):.1f},{Y(a.latency_s):.1f}",
                         f"{X((a.peak_vram_bytes or 0) / GiB):.1f},{Y(b.latency_s):.1f}"]
            path.append(f"{X((pts[-1].peak_vram_bytes or 0) / GiB):.1f},{Y(pts[-1].latency_s):.1f}")
            out.append(f'<polyline class="frontier-line" points="{" ".join(path)}" fill="none" stroke="{colour}" '
                       f'stroke-width="1.5"/>')
    for r in rows:
        colour, shape = _style(r.num_gpus)
        x, y = X((r.peak_vram_bytes or 0) / GiB), Y(r.latency_s)
        tip = (f"trial {r.trial_id} ({r.status}): {r.latency_s:.3f} s, peak {(r.peak_vram_bytes or 0) / GiB:.2f} GiB, "
               f"{r.num_gpus} GPU(s): {r.argv or '(defaults)'}")
        out.append(_marker(shape, x, y, colour, f'class="trial" data-trial="{r.trial_id}" fill-opacity="0.75"', tip))
        if r.trial_id in picked:
            out.append(f'<circle class="best" cx="{x:.1f}" cy="{y:.1f}" r="9" fill="none" stroke="#000" stroke-width="1.5"/>')
    for i, n in enumerate(counts):
        colour, shape = _style(n)
        lx, ly = left + 14, top + 14 + 16 * i
        out.append(_marker(shape, lx, ly, colour, 'class="legend"'))
        out.append(f'<text x="{lx + 10}" y="{ly + 4}">{n} GPU{"s" if n > 1 else ""}</text>')
    out.append("</svg>")
    return "\n".join(out)


def flag_effects(rows: list[D.Result]) -> list[tuple[str, list[tuple[Any, float, int]]]]:
    """For every flag whose value varies across the study's measured configurations: per value,
    the median latency of the configurations with it and how many there were."""
    names = sorted({k for r in rows for k in r.flags})
    out = []
    for name in names:
        by_value: dict[str, list[float]] = {}
        for r in rows:
            if name in r.flags:
                by_value.setdefault(repr(r.flags[name]), []).append(r.latency_s)
        if len(by_value) > 1:
            vals = [(v, statistics.median(lat), len(lat)) for v, lat in sorted(by_value.items())]
            out.append((name, vals))
    return out


def effects_svg(effects: list[tuple[str, list[tuple[Any, float, int]]]], w: int = 720) -> str:
    if not effects:
        return '<p class="effects-empty">No flag varied across the measured trials.</p>'
    top = max(m for _, vals in effects for _, m, _ in vals)
    line = 18
    n_lines = sum(len(vals) + 1 for _, vals in effects)
    h = n_lines * line + 10
    label_w, bar_w = 300, w - 300 - 170
    out = [f'<svg class="effects" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
           f'font-size="11">']
    y = 14
    for name, vals in effects:
        out.append(f'<text x="0" y="{y}" font-weight="bold">--{escape(name)}</text>')
        y += line
        for v, med, n in vals:
            bw = bar_w * med / top
            out.append(f'<text x="16" y="{y}">{escape(v)}</text>')
            out.append(f'<rect class="effect-bar" x="{label_w}" y="{y - 11}" width="{bw:.1f}" height="12" fill="#1f77b4"/>')
            out.append(f'<text x="{label_w + bw + 6:.1f}" y="{y}">{med:.3f} s (median of {n})</text>')
            y += line
    out.append("</svg>")
    return "\n".join(out)
