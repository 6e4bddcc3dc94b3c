"""Load on the service: N concurrent GET /v1/recommend against a real `dittune serve` on loopback
over SQLite (a copy of bench/results/tune_flux_dev.db by default). Every answer must equal the
library's own (dittune.answers.recommend); prints p50 / p99 latency and requests per second.

    python bench/load_service.py [--requests 200] [--rounds 3] [--db sqlite:///copy.db]

Exit status 1 if any answer was wrong or failed."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
QUERIES = ["model=flux-dev", "model=flux-dev&vram_budget=24GiB", "model=flux-dev&num_gpus=1&vram_budget=30GiB",
           "model=flux-dev&gpu=H100&vram_budget=0.5"]


def expected(db_url: str) -> dict[str, list]:
    from urllib.parse import parse_qs

    from dittune import answers
    from dittune import db as D

    db = D.open_db(db_url)
    out = {}
    for q in QUERIES:
        p = {k: v[0] for k, v in parse_qs(q).items()}
        question = answers.Question(p["model"], p.get("gpu"), int(p["num_gpus"]) if "num_gpus" in p else None,
                                    p.get("vram_budget"))
        out[q] = json.loads(json.dumps([answers.answer_dict(r) for r in answers.recommend(db, question)]))
    db.dispose()
    return out


async def one_round(base: str, n: int, want: dict[str, list]) -> tuple[list[float], int, float]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120) as client:
        async def get(i: int) -> tuple[float, bool]:
            q = QUERIES[i % len(QUERIES)]
            t = time.perf_counter()
            r = await client.get(f"/v1/recommend?{q}")
            dt = time.perf_counter() - t
            return dt, r.status_code == 200 and r.json() == want[q]

        t0 = time.perf_counter()
        results = await asyncio.gather(*(get(i) for i in range(n)))
        wall = time.perf_counter() - t0
    return [d for d, _ in results], sum(1 for _, ok in results if not ok), wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200, help="concurrent requests per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--db", help="database URL (default: a copy of bench/results/tune_flux_dev.db)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dittune-load-"))
    url = args.db
    if url is None:
        shutil.copy(ROOT / "bench" / "results" / "tune_flux_dev.db", tmp / "flux.db")
        url = f"sqlite:///{tmp / 'flux.db'}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "DITTUNE_TOKEN"}
    server = subprocess.Popen([sys.executable, "-m", "dittune", "serve", "--port", str(port), "--db", url],
                              env=env, start_new_session=True)
    try:
        want = expected(url)
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                if server.poll() is not None or time.time() > deadline:
                    print("the server did not start", file=sys.stderr)
                    return 1
                time.sleep(0.3)
        wrong = 0
        lat: list[float] = []
        walls = []
        for i in range(args.rounds):
            d, bad, wall = asyncio.run(one_round(base, args.requests, want))
            lat += d
            wrong += bad
            walls.append(wall)
            print(f"round {i}: {args.requests} concurrent requests in {wall:.2f} s ({args.requests / wall:.0f} req/s), "
                  f"{bad} wrong")
        q = statistics.quantiles(lat, n=100)
        print(f"{len(lat)} requests, {wrong} wrong; latency p50 {q[49] * 1e3:.0f} ms, p99 {q[98] * 1e3:.0f} ms; "
              f"{args.requests * args.rounds / sum(walls):.0f} requests/s (over {os.cpu_count()} CPUs)")
        return 1 if wrong else 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
