"""Four configurations of the tiny FLUX (128x128, 8 steps) in four processes on core 1, one torch
thread each, loaded and warmed up, then measuring in turns: A B C D, ROUNDS times, each for SLOT_S
seconds. Prints each one's median, its slot medians and its ratio to plain compile per slot.
Usage: python bench/cpu_turns.py SLOT_S ROUNDS OUT.json (docs/PERFORMANCE.md, eighth session).
With bench/busy_host.py running beside it: the same under a stand-in for a busy shared host."""
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cpu_drift import tiny_flux  # noqa: E402

CFGS = ["", "--enable-torch-compile", "--enable-torch-compile --compile-mode max-autotune-no-cudagraphs",
        "--enable-torch-compile --compile-scope full --compile-mode max-autotune-no-cudagraphs"]


def child(argv, q_in, q_out):
    request = tiny_flux(argv, core=1)
    q_out.put("ready")
    while True:
        msg = q_in.get()
        if msg is None:
            return
        t0, lats = time.perf_counter(), []
        while time.perf_counter() - t0 < msg:
            lats.append(request())
        q_out.put(lats)


if __name__ == "__main__":
    mp.set_start_method("spawn")
    slot, rounds = float(sys.argv[1]), int(sys.argv[2])
    kids = []
    for a in CFGS:
        qi, qo = mp.Queue(), mp.Queue()
        p = mp.Process(target=child, args=(a, qi, qo)); p.start(); kids.append((a, qi, qo, p))
    for k in kids:
        assert k[2].get(timeout=900) == "ready"
    res = {a: [] for a in CFGS}
    for r in range(rounds):
        for a, qi, qo, p in kids:
            qi.put(slot); res[a].append(qo.get())
    for k in kids:
        k[1].put(None); k[3].join()
    out = {a: [statistics.median(x) for x in v] for a, v in res.items()}
    base = out[CFGS[1]]
    for a in CFGS:
        allm = statistics.median([y for x in res[a] for y in x])
        rat = [m / b for m, b in zip(out[a], base)]
        print(f"{a or '(defaults)':80s} overall {allm*1e3:.1f} ms  slots {' '.join(f'{m*1e3:.0f}' for m in out[a])}  ratio-to-compile med {statistics.median(rat):.3f} [{min(rat):.2f}-{max(rat):.2f}]")
    json.dump(res, open(sys.argv[3], "w"))
