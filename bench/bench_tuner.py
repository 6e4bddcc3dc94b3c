"""What a study costs on the GPUs, measured with the real engine:

    python bench/bench_tuner.py pool --model z-image-turbo --trials 8 --out DIR
        the same single-GPU study (same seed) on GPU 0 alone, then side by side on GPUs 0 and 1:
        wall times, their ratio, both winners and bands (databases DIR/tune_<model>_{1,2}gpu.db)
    python bench/bench_tuner.py cost --model z-image-turbo --out DIR
        one trial's wall time in a cold worker (process started for the trial) and in a warm one
        (started ahead, imports done), interleaved, for the default and the fast configuration

Each writes DIR/<what>_<model>.json and prints a short table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

FAST = {"attention-backend": "torch_cudnn_sdpa", "enable-torch-compile": True, "fused-kernels": True,
        "enable-cuda-graph": True}


def _tune(model: str, gpus: str, trials: int, confirm: int, db: Path, extra: list[str]) -> dict:
    # its own study name, so its own compile cache (tuner/study.py): neither run starts warm from the other
    cmd = [sys.executable, "-m", "dittune", "tune", model, "--study", db.stem, "--gpus", gpus, "--max-gpus-per-trial", "1",
           "--trials", str(trials), "--confirm", str(confirm), "--seed", "0", "--objective", "latency",
           "--db", f"sqlite:///{db}", *extra]
    print("$", shlex.join(cmd), flush=True)
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    print(p.stdout[-3000:], p.stderr[-2000:], flush=True)
    rec = subprocess.run([sys.executable, "-m", "dittune", "recommend", model, "--db", f"sqlite:///{db}", "--format", "json"],
                         capture_output=True, text=True)
    try:
        answer = json.loads(rec.stdout)
        answer = answer[0] if isinstance(answer, list) and answer else answer
    except json.JSONDecodeError:
        answer = {"error": (rec.stdout + rec.stderr)[-500:]}
    return {"command": shlex.join(cmd), "rc": p.returncode, "wall_s": wall, "trials": _trials(db), "recommend": answer}


def _trials(db: Path) -> list[dict]:
    if not db.exists():
        return []
    con = sqlite3.connect(db)
    rows = con.execute("select optuna_number, status, argv, latency_s, step_spread, manifest from dittune_trial order by id")
    out = []
    for n, status, argv, lat, spread, manifest in rows:
        m = json.loads(manifest) if manifest else {}
        out.append({"number": n, "status": status, "argv": argv, "latency_s": lat, "spread": spread,
                    "trial": m.get("trial"), "cuda_visible_devices": m.get("cuda_visible_devices")})
    return out


def pool(args) -> dict:
    out = Path(args.out)
    res = {}
    for name, gpus in (("1gpu", "0"), ("2gpu", "0,1")):
        db = out / f"tune_{args.model.replace('-', '_')}_{name}.db"
        db.unlink(missing_ok=True)
        res[name] = _tune(args.model, gpus, args.trials, args.confirm, db, args.tune_args)
    res["ratio"] = res["2gpu"]["wall_s"] / res["1gpu"]["wall_s"]
    print(f"\n| GPUs | wall s | winner | latency s |")
    for name in ("1gpu", "2gpu"):
        r = res[name]["recommend"]
        print(f"| {name} | {res[name]['wall_s']:.1f} | {r.get('command', r.get('error', '?'))} | {r.get('latency_s', '?')} |")
    print(f"ratio 2 GPUs / 1 GPU: {res['ratio']:.3f}")
    return res


def cost(args) -> dict:
    from dittune.engine import flags as F
    from dittune.tuner.runner import WORKER_CMD, Spares, run_trial
    from dittune.tuner.presets import load_preset
    from dittune.engine.models import get_spec

    spec = get_spec(args.model)
    pre = load_preset(spec)
    rows = []
    spares = Spares(WORKER_CMD, args.model, limit=1)
    env = {"TORCHINDUCTOR_CACHE_DIR": str(Path(args.out) / "inductor")}
    try:
        for name, flags in (("default", {}), ("fast", FAST)):
            job = {"model": args.model, "width": pre.width, "height": pre.height, "steps": pre.measure_steps,
                   "guidance": pre.guidance, "warmup": pre.warmup, "device": "cuda", "seed": 0, "vram_budget": None,
                   "flags": F.config_to_dict(F.config_from_dict(flags))}
            run_trial(job, 600, WORKER_CMD, env)  # compile caches filled, as in a study after its first trial
            for rep in range(args.repeats):
                for warm in (False, True):
                    if warm:
                        spares.take(env)  # started now; the cold run below gives it time to import
                        continue
                    cold = run_trial(job, 600, WORKER_CMD, env)
                    hot = run_trial(job, 600, WORKER_CMD, env, spares=spares)
                    for o in (cold, hot):
                        d = o.dump or {}
                        rows.append({"config": name, "warm": o.warm, "status": o.status, "wall_s": o.wall_s,
                                     "load_s": d.get("cold_start", {}).get("load_s"),
                                     "load_parts": d.get("cold_start", {}).get("load_parts"),
                                     "first_request_s": d.get("cold_start", {}).get("first_request_s"),
                                     "step_median_s": d.get("step_median_s"), "reason": o.reason})
    finally:
        spares.close()
    print("\n| config | worker | trial wall s (median) | load s | first request s | step ms |")
    summary = {}
    for name in ("default", "fast"):
        for warm in (False, True):
            sel = [r for r in rows if r["config"] == name and r["warm"] == warm and r["status"] == "complete"]
            if not sel:
                continue
            med = lambda k: statistics.median(r[k] for r in sel)  # noqa: E731
            summary[f"{name}/{'warm' if warm else 'cold'}"] = {"wall_s": med("wall_s"), "n": len(sel)}
            print(f"| {name} | {'warm' if warm else 'cold'} | {med('wall_s'):.2f} | {med('load_s'):.2f} | "
                  f"{med('first_request_s'):.2f} | {med('step_median_s') * 1e3:.1f} |")
    return {"rows": rows, "summary": summary}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("pool", "cost"))
    ap.add_argument("--model", default="z-image-turbo")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--confirm", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=".")
    args, more = ap.parse_known_args()  # the rest (after --): more `dittune tune` arguments
    args.tune_args = [a for a in more if a != "--"]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    res = (pool if args.what == "pool" else cost)(args)
    res["argv"] = sys.argv
    (Path(args.out) / f"{args.what}_{args.model.replace('-', '_')}.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
