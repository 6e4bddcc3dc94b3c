"""One denoise step of each workload: dittune's configuration vs diffusers eager, diffusers with
the same attention kernel, and diffusers + torch.compile, in the same process on the same
synthetic weights and inputs; medians over warmed-up steps, with the fraction of the compute
floor reached (exact FLOPs counted on the meta device, divided by a measured matmul peak).

    python bench/bench_e2e.py                                   # H100: all three workloads
    python bench/bench_e2e.py --models flux-dev --dittune-flags "--attention-backend torch_cudnn_sdpa --fused-kernels --enable-torch-compile"
    python bench/bench_e2e.py --tiny --device cpu --no-compile  # smoke test of the script

A Qwen-Image step is two DiT passes (true CFG). Compile times are printed per row.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_dit import (  # noqa: E402
    DIFFUSERS_BACKEND, Clocks, build_reference, case, flop_split, free, native_from, prepare_native, timeit,
)

from dittune.engine import flags as F  # noqa: E402
from dittune.engine.cudagraph import capture  # noqa: E402
from dittune.engine.models import get_family  # noqa: E402

BEST = "--attention-backend torch_cudnn_sdpa --fused-kernels --enable-torch-compile --enable-cuda-graph"
DEFAULT_ROWS = [BEST, BEST.removesuffix(" --enable-cuda-graph")]  # the second: what graphs add, same run
PASSES = {"qwen_image": 2}  # DiT passes per denoise step


def flops(model: str, height: int, width: int, text_tokens: int) -> float:
    """FLOPs of one native DiT forward, counted on the meta device (no memory, no GPU)."""
    return flop_split(model, height, width, text_tokens)["total"]


def run(model, height, width, tokens, dittune_argvs, device, dtype, warmup, iters, compile_diffusers, also_unpacked=False,
        pass_counts=None):
    """pass_counts: DiT passes per timed dittune step, one row each (default: the step's own count);
    diffusers' rows always run the step's count."""
    family = get_family(model)
    passes = PASSES.get(family.spec.family, 1)
    ref_cls, ref_cfg, ref_fwd, our_fwd = case(model, height, width, tokens, device, dtype)
    rows = []

    def step(fn, m):
        return lambda: [fn(m) for _ in range(passes)]

    def timed_row(fn, **row):  # the step's median ms, and the SM clock and power while it ran
        with Clocks(device) as c:
            ms = timeit(fn, device, warmup, iters) * 1e3
        return {**row, "step_ms": ms, **c.summary()}

    ref = build_reference(ref_cls, ref_cfg, device, dtype)
    cfg = F.config_from_argv(dittune_argvs[0])  # its attention backend for diffusers' rows
    with torch.inference_mode():
        rows.append(timed_row(step(ref_fwd, ref), config="diffusers eager"))
        ref_out = ref_fwd(ref).float()
        if cfg.attention_backend in DIFFUSERS_BACKEND and DIFFUSERS_BACKEND[cfg.attention_backend]:
            ref.set_attention_backend(DIFFUSERS_BACKEND[cfg.attention_backend])
            rows.append(timed_row(step(ref_fwd, ref), config=f"diffusers eager, {cfg.attention_backend}"))
        if compile_diffusers:
            t = time.perf_counter()
            ref.compile_repeated_blocks(fullgraph=True)
            ref_fwd(ref)
            compile_s = time.perf_counter() - t
            rows.append(timed_row(step(ref_fwd, ref), config=f"diffusers + regional compile, {cfg.attention_backend}",
                                  compile_s=compile_s))
    sd = {k: v.to("cpu") for k, v in ref.state_dict().items()}
    del ref
    free(device)
    variants = [(argv, True) for argv in dittune_argvs] + ([(dittune_argvs[0], False)] if also_unpacked else [])
    for dittune_argv, pack in variants:
        cfg = F.config_from_argv(dittune_argv)
        ours = native_from(family, sd, device, dtype)
        with torch.inference_mode():
            t = time.perf_counter()
            prepare_native(ours, cfg, device, pack=pack)
            out = our_fwd(ours).float()
            compile_s = time.perf_counter() - t

            for n in pass_counts or [passes]:

                def our_step(n=n):  # the passes of one step share its cache, as in Pipeline.generate
                    cache: dict = {}
                    for _ in range(n):
                        our_fwd(ours, cache)

                timed = our_step
                if cfg.enable_cuda_graph:  # the whole step as one graph, as the engine captures it
                    graph, _ = capture(our_step, device)
                    timed = graph.replay
                name = "dittune " + (shlex.join(dittune_argv) or "(defaults)") + ("" if pack else " [per-block modulation]")
                if n != passes:
                    name += f" [{n} of {passes} passes]"
                row = timed_row(timed, config=name, compile_s=compile_s if cfg.enable_torch_compile else None,
                                passes=n)
                rows.append({**row, "rel_diff_vs_diffusers": ((out - ref_out).norm() / ref_out.norm()).item()})
                if cfg.enable_cuda_graph:
                    del graph
        del ours, our_step, timed
        free(device)
    del sd
    return rows, passes


def matmul_peak_tflops(device) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    s = timeit(lambda: a @ b, device, 3, 10)
    return 2 * 8192**3 / s / 1e12


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--dittune-flags", action="append", default=None,
                    help=f"engine flags of a dittune row; repeat for more rows (default: {DEFAULT_ROWS})")
    ap.add_argument("--no-compile", action="store_true", help="skip diffusers' compile row")
    ap.add_argument("--also-unpacked", action="store_true",
                    help="add a dittune row with per-block modulation (the engine's path before packing)")
    ap.add_argument("--passes", type=int, nargs="+", default=None,
                    help="DiT passes per timed dittune step, a row each (default: the step's own, 2 for Qwen-Image)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = a.models or (["flux-dev-tiny", "qwen-image-tiny", "z-image-turbo-tiny"] if a.tiny else ["flux-dev", "qwen-image", "z-image-turbo"])
    size = 64 if a.tiny else a.size
    peak = matmul_peak_tflops(device) if device.type == "cuda" else None
    if peak:
        print(f"bf16 8192^3 matmul: {peak:.0f} TFLOP/s", flush=True)
    table = []
    for m in models:
        tokens = 16 if a.tiny else (512 if m.startswith("flux") else 128)
        rows, passes = run(m, size, size, tokens, [shlex.split(f) for f in a.dittune_flags or DEFAULT_ROWS], device, dtype, a.warmup, a.iters,
                           not a.no_compile, a.also_unpacked, a.passes)
        fl_pass = flops(m, size, size, tokens)
        base = rows[0]["step_ms"]
        comp = next((r["step_ms"] for r in rows if "compile" in r["config"] and r["config"].startswith("diffusers")), None)
        for r in rows:
            fl = fl_pass * r.get("passes", passes)
            r.update(model=m, tflop_per_step=fl / 1e12, vs_diffusers_eager=r["step_ms"] / base,
                     vs_diffusers_compile=r["step_ms"] / comp if comp else None,
                     floor_fraction=(fl / (peak * 1e12) * 1e3) / r["step_ms"] if peak else None)
            print(json.dumps(r), flush=True)
        table += rows
    if a.json:
        Path(a.json).write_text(json.dumps({"device": torch.cuda.get_device_name(device) if peak else "cpu",
                                            "matmul_tflops": peak, "rows": table}, indent=2))
    print(f"\n{'model':16} {'config':70} {'step ms':>8} {'/eager':>7} {'/compile':>8} {'floor':>6} {'SM MHz':>6} {'W':>5}")
    for r in table:
        c = f"{r['vs_diffusers_compile']:.3f}" if r["vs_diffusers_compile"] else "-"
        fl = f"{r['floor_fraction']:.0%}" if r["floor_fraction"] else "-"
        mhz, w = r.get("sm_mhz_median"), r.get("power_w_median")
        print(f"{r['model']:16} {r['config'][-70:]:70} {r['step_ms']:8.2f} {r['vs_diffusers_eager']:7.3f} {c:>8} {fl:>6} "
              f"{mhz if mhz else '-':>6} {f'{w:.0f}' if w else '-':>5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
