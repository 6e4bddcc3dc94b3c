"""Trial worker: `python -m dittune.tuner.worker JOB.json` runs the real engine once (warm-up
request + measured request) in its own process and writes the perf dump named in the job.

`python -m dittune.tuner.worker --wait MODEL` is a warm worker (tuner/runner.py, Spares): it
imports what MODEL's trials need, then reads its job's path from stdin (end of file: exit 0).

Exit codes tell the orchestrator what happened: 0 measured, 3 out of memory under the budget,
4 the engine refused the configuration, anything else a crash (traceback on stderr)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

EXIT_OOM = 3
EXIT_REFUSED = 4


def preimport(model: str) -> None:
    """Import what a trial of `model` imports, before its job arrives; nothing here touches CUDA
    (the trial's GPUs are named by CUDA_VISIBLE_DEVICES, read when CUDA starts)."""
    import torch._inductor.compile_fx  # noqa: F401  (torch.compile's first call imports it)

    import dittune.engine.pipeline  # noqa: F401
    import dittune.engine.run  # noqa: F401
    from dittune.engine import components
    from dittune.engine.errors import EngineError
    from dittune.engine.models import get_family

    try:
        family = get_family(model)
    except EngineError:  # a checkpoint's family is read from its folder: the trial imports it then
        return
    for te in family.spec.text_encoders:
        components._text_classes(te.arch)
    import diffusers

    getattr(diffusers, family.spec.vae.cls, None)


def bind_cpus(text: str | None) -> None:
    """DITTUNE_CPUS="0,1,2": this process (and the threads and ranks it starts) runs on those
    cores only, with as many torch threads. The pool's share of the host for a trial side by side
    with others (tuner/pool.py)."""
    if not text:
        return
    try:
        cpus = {int(c) for c in text.split(",")}
        os.sched_setaffinity(0, cpus)
    except (ValueError, OSError) as e:  # a core this host lacks: the trial runs unbound, and says so
        print(f"warning: DITTUNE_CPUS={text!r} not applied: {e}", file=sys.stderr)
        return
    if "torch" in sys.modules:  # imported with the package (tuner/__init__): its pool was sized by every core
        sys.modules["torch"].set_num_threads(len(cpus))


def main(argv: list[str]) -> int:
    import faulthandler
    import signal

    bind_cpus(os.environ.get("DITTUNE_CPUS"))

    # On a trial timeout the orchestrator sends SIGUSR1 to the trial's process group first: every
    # process (this one and its ranks) writes its Python stacks to stderr, kept in the trial's record.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if len(argv) == 2 and argv[0] == "--wait":
        preimport(argv[1])
        line = sys.stdin.readline().strip()
        if not line:
            return 0
        argv = [line]
    if len(argv) != 1:
        print("usage: python -m dittune.tuner.worker JOB.json | --wait MODEL", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())

    from dittune.engine.errors import BudgetExceededError, EngineError
    from dittune.engine.flags import config_from_dict
    from dittune.engine.run import GenerateRequest, generate

    pace = None
    if job.get("turns"):  # measured in turns with other finalists (tuner/turns.py)
        from dittune.tuner.turns import Pace

        pace = Pace(job["turns"])
    req = GenerateRequest(
        model=job["model"], prompt=job.get("prompt", GenerateRequest.prompt), width=job["width"], height=job["height"],
        steps=job["steps"], guidance=job["guidance"], seed=job.get("seed", 0), output=None,
        perf_dump_path=None if pace is not None else Path(job["perf_dump_path"]), device=job.get("device"), warmup=job.get("warmup", 1),
        max_warmup=job.get("max_warmup"), measure_s=job.get("measure_s", 0.0),
        vram_budget=job.get("vram_budget"), flags=config_from_dict(job["flags"]), model_path=job.get("model_path"),
        pace=pace,
    )
    try:
        res = generate(req)
        if pace is not None:  # with where each slot's requests begin: the dump's record of the turns
            res.dump["measured"]["slots"] = pace.slots
            Path(job["perf_dump_path"]).write_text(json.dumps(res.dump, indent=2))
    except BudgetExceededError as e:
        print(f"oom: {e}", file=sys.stderr)
        return EXIT_OOM
    except EngineError as e:
        print(f"refused: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except RuntimeError as e:  # cuBLAS / inductor surface OOM as plain RuntimeErrors
        if "out of memory" in str(e).lower():
            print(f"oom: {str(e).splitlines()[0]}", file=sys.stderr)
            return EXIT_OOM
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
