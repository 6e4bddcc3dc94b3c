"""Replays a confirmation on bench/cpu_drift.py's trace (one process of the tiny FLUX measuring for
8 minutes): a finalist's round is SLOTS slots of 0.5 s, one every EVERY s (three finalists in
turns: 1.5 s), rounds SEP s apart (the next round's loads between them); its figure per round is
the median or the fastest of its requests there; the run's latency the median over ROUNDS rounds,
its fresh-run band db.queries.fresh_band's (Student's t over the rounds). Two runs GAP s apart
(README's main job twice: about 300 s): how often each one's latency lies within the other's band,
the bands' median and the runs' ratio, over every offset the trace allows (docs/PERFORMANCE.md,
ninth session). Usage: python bench/cpu_drift_replay.py TRACE.json [OUT.json]"""

import bisect
import json
import statistics
import sys
from pathlib import Path

from dittune.db.queries import fresh_band

STATS = {"median": lambda v: v[(len(v) - 1) // 2], "fastest": lambda v: v[0]}
SCHEMES = [(6, 1.5, 2, 30), (6, 1.5, 3, 30), (8, 1.5, 3, 35), (6, 1.5, 4, 30), (6, 1.5, 2, 70), (6, 1.5, 3, 70)]  # slots, every s, rounds, sep s


def main(trace: str, out: str | None = None) -> None:
    rows = json.loads(Path(trace).read_text())
    ends, lats = [t for t, _ in rows], [lat for _, lat in rows]

    def figure(t0: float, slots: int, every: float, stat) -> float:
        got = []
        for k in range(slots):
            a, b = t0 + every * k, t0 + every * k + 0.5
            got += lats[bisect.bisect_left(ends, a):bisect.bisect_left(ends, b)]
        return stat(sorted(got))

    results = []
    for gap in (300, 150, 60):
        for slots, every, rounds, sep in SCHEMES:
            span = sep * (rounds - 1) + slots * every
            for name, stat in STATS.items():
                both, bands, ratios = 0, [], []
                offsets = range(0, int(ends[-1] - gap - span - 1))
                for t0 in offsets:
                    runs = []
                    for t in (t0, t0 + gap):
                        rep = [figure(t + sep * k, slots, every, stat) for k in range(rounds)]
                        runs.append((statistics.median(rep), fresh_band(rep)))
                    (a, ba), (b, bb) = runs
                    both += abs(a / b - 1) <= bb and abs(b / a - 1) <= ba
                    bands += [ba, bb]
                    ratios.append(b / a)
                bands.sort()
                ratios.sort()
                r = {"gap_s": gap, "slots": slots, "every_s": every, "rounds": rounds, "sep_s": sep, "stat": name,
                     "pairs": len(offsets), "both_ways": both, "band_median": statistics.median(bands),
                     "ratio_p5": ratios[len(ratios) // 20], "ratio_p95": ratios[19 * len(ratios) // 20]}
                results.append(r)
                print(f"gap {gap:3d} s, {slots} slots every {every} s, {rounds} rounds {sep} s apart, {name:7s}: "
                      f"both ways {both}/{len(offsets)} ({both / len(offsets):.0%}), median band ±{r['band_median']:.1%}, "
                      f"run 2 / run 1 p5-p95 {r['ratio_p5']:.3f}-{r['ratio_p95']:.3f}")
    if out:
        Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
