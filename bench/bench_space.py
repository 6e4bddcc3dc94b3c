"""How long the tuner takes to enumerate (and size) its search space, on the CPU: the enumeration
runs at every `dittune tune` start (`Space.size`) and in the tests' exhaustive optimum checks.

    python bench/bench_space.py [--old OLD_space.py]   (e.g. `git show REV:tuner/space.py > /tmp/old.py`)

With --old, the same spaces are enumerated by that version of tuner/space.py too, and the two
must give the same configurations."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time

from dittune.engine import flags as F
from dittune.engine.models import get_family
from dittune.tuner import space as current
from dittune.tuner.presets import load_preset

BACKENDS = ("torch_sdpa", "torch_cudnn_sdpa", "torch_flash_sdpa", "torch_efficient_sdpa")
CASES = [("flux-dev", 1), ("flux-dev", 4), ("qwen-image", 2), ("z-image-turbo", 1)]


def _load(path: str):
    spec = importlib.util.spec_from_file_location("dittune.tuner.space_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _time(module, model: str, gpus: int) -> tuple[float, list]:
    kw = {"gpu_count": gpus} if gpus > 1 else {}
    space = module.build_space({"attention-backend": BACKENDS}, load_preset(get_family(model).spec).space, {}, False, 57, **kw)
    t = time.perf_counter()
    argvs = [tuple(F.config_to_argv(c)) for c in space.configs()]
    return time.perf_counter() - t, argvs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", help="an older tuner/space.py to compare with")
    ap.add_argument("--json")
    args = ap.parse_args()
    old = _load(args.old) if args.old else None
    rows = []
    for model, gpus in CASES:
        s, argvs = _time(current, model, gpus)
        row = {"model": model, "gpus": gpus, "configs": len(argvs), "seconds": round(s, 2)}
        if old is not None:
            so, old_argvs = _time(old, model, gpus)
            if set(old_argvs) != set(argvs) or len(set(argvs)) != len(argvs):
                raise SystemExit(f"{model} on {gpus} GPU(s): the two versions enumerate different configurations")
            row["old_seconds"] = round(so, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
