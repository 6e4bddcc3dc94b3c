"""Per-flag ablation of the engine on one model (default FLUX.1-dev, 1024x1024, synthetic weights):
per-step latency and peak VRAM for each configuration, in one process, plus diffusers' group
offload (block level, one block per group, streams) and the pinned host-to-device bandwidth
measured in the same run, so layerwise offload can be read against its transfer floor.

    python bench/bench_flags.py [--model flux-dev] [--steps 6] [--only default,cudnn,...] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch

from dittune.engine import flags as F
from dittune.engine.run import GenerateRequest, generate

FAST = ["--attention-backend", "torch_cudnn_sdpa", "--fused-kernels", "--enable-torch-compile"]
STREAM = ["--text-encoder-cpu-offload", "--vae-cpu-offload", "--dit-layerwise-offload"]

CONFIGS: dict[str, list[str]] = {
    "default": [],
    "cudnn": ["--attention-backend", "torch_cudnn_sdpa"],
    "flash": ["--attention-backend", "torch_flash_sdpa"],
    "efficient": ["--attention-backend", "torch_efficient_sdpa"],
    "sage": ["--attention-backend", "sage_attn"],  # lossy
    "fa": ["--attention-backend", "fa"],  # only where flash-attn is installed (dittune[fa4])
    "flashinfer": ["--attention-backend", "flashinfer"],  # only where flashinfer is installed (dittune[flashinfer])
    "compile-regional": ["--enable-torch-compile"],
    "compile-full": ["--enable-torch-compile", "--compile-scope", "full"],
    "fused": ["--fused-kernels"],
    "te+vae-offload": ["--text-encoder-cpu-offload", "--vae-cpu-offload"],
    "dit-cpu-offload": ["--dit-cpu-offload"],
    "layerwise-p1": ["--dit-layerwise-offload", "--dit-offload-prefetch-size", "1"],
    "layerwise-p2": ["--dit-layerwise-offload", "--dit-offload-prefetch-size", "2"],
    "layerwise-p4": ["--dit-layerwise-offload", "--dit-offload-prefetch-size", "4"],
    "layerwise-r20": ["--dit-layerwise-offload", "--dit-resident-layers", "20"],
    "layerwise-r40": ["--dit-layerwise-offload", "--dit-resident-layers", "40"],
    "cuda-graph": ["--enable-cuda-graph"],
    "best-no-graph": [*FAST],
    "best": [*FAST, "--enable-cuda-graph"],
    # Under a VRAM budget (the engine caps the process at it, so a row that completes fits): the
    # fast path with the encoders offloaded and the DiT streamed, resident blocks picked with the
    # memory model (tuner/memory.py) to fit.
    "b24-r28": [*FAST, *STREAM, "--dit-resident-layers", "28"],
    "b24-r32": [*FAST, *STREAM, "--dit-resident-layers", "32"],
    "b24-r36": [*FAST, *STREAM, "--dit-resident-layers", "36"],
    "b16-r8": [*FAST, *STREAM, "--dit-resident-layers", "8"],
    "b16-r12": [*FAST, *STREAM, "--dit-resident-layers", "12"],
    # with the text encoders streamed during encode (78b10c4) the model predicts far more room
    "b24-r40": [*FAST, *STREAM, "--dit-resident-layers", "40"],
    "b24-r44": [*FAST, *STREAM, "--dit-resident-layers", "44"],
    "b24-r46": [*FAST, *STREAM, "--dit-resident-layers", "46"],
    "b16-r20": [*FAST, *STREAM, "--dit-resident-layers", "20"],
    "b16-r24": [*FAST, *STREAM, "--dit-resident-layers", "24"],
    "b16-r26": [*FAST, *STREAM, "--dit-resident-layers", "26"],
    # --dit-idle-offload: the resident blocks leave the GPU for encode and decode (the VAE decode's
    # activations no longer sit on top of them), so more of them fit; one copy back per request
    "b16-i32": [*FAST, *STREAM, "--dit-idle-offload", "--dit-resident-layers", "32"],
    "b16-i34": [*FAST, *STREAM, "--dit-idle-offload", "--dit-resident-layers", "34"],
    "b16-i36": [*FAST, *STREAM, "--dit-idle-offload", "--dit-resident-layers", "36"],
    "b16-i38": [*FAST, *STREAM, "--dit-idle-offload", "--dit-resident-layers", "38"],
    "b24-i52": [*FAST, *STREAM, "--dit-idle-offload", "--dit-resident-layers", "52"],
    "b24-i54": [*FAST, *STREAM, "--dit-idle-offload", "--dit-resident-layers", "54"],
    # the whole DiT visits for the denoise loop (one copy per request), nothing streams per step
    "b24-dit-offload": [*FAST, "--text-encoder-cpu-offload", "--vae-cpu-offload", "--dit-cpu-offload"],
}
BUDGETS = {name: ("24GiB" if name.startswith("b24") else "16GiB") for name in CONFIGS if name[:3] in ("b24", "b16")}


def pinned_bandwidth(device, nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(6):
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    del src, dst
    return nbytes / statistics.median(times[1:])


def diffusers_group_offload(model: str, device, iters: int = 3) -> dict:
    """diffusers' own class with block-level group offload (1 block per group, streams)."""
    import diffusers

    from dittune.engine.components import default_dtype, randomize_
    from dittune.engine.models import flux

    if not model.startswith("flux"):
        return {}
    cfg = flux._load("transformer_dev.json")
    with torch.device("meta"), default_dtype(torch.bfloat16):
        ref = diffusers.FluxTransformer2DModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    ref = ref.to_empty(device="cpu")
    randomize_(ref)
    ref.eval().requires_grad_(False)
    ref.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
                             num_blocks_per_group=1, use_stream=True)
    g = torch.Generator(device).manual_seed(0)
    ids = torch.zeros(64, 64, 3, device=device)
    ids[..., 1] = torch.arange(64, device=device)[:, None]
    ids[..., 2] = torch.arange(64, device=device)[None, :]
    x = dict(hidden_states=torch.randn(1, 4096, 64, generator=g, device=device, dtype=torch.bfloat16),
             encoder_hidden_states=torch.randn(1, 512, 4096, generator=g, device=device, dtype=torch.bfloat16),
             pooled_projections=torch.randn(1, 768, generator=g, device=device, dtype=torch.bfloat16),
             timestep=torch.tensor([0.7], device=device, dtype=torch.bfloat16), img_ids=ids.reshape(-1, 3),
             txt_ids=torch.zeros(512, 3, device=device), guidance=torch.full((1,), 3.5, device=device))
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    with torch.inference_mode():
        for i in range(iters + 1):
            torch.cuda.synchronize(device)
            t = time.perf_counter()
            ref(**x, return_dict=False)
            torch.cuda.synchronize(device)
            if i:
                times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_reserved(device)
    del ref, x
    gc.collect()
    torch.cuda.empty_cache()
    return {"name": "diffusers-group-offload", "step_ms": statistics.median(times) * 1e3, "peak_gib": peak / 2**30}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="flux-dev")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--only", default=None, help="comma-separated config names")
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device())
    names = a.only.split(",") if a.only else list(CONFIGS)
    bw = pinned_bandwidth(device)
    print(f"pinned host-to-device: {bw / 1e9:.1f} GB/s", flush=True)
    rows = []
    for name in names:
        argv_ = CONFIGS[name]
        t = time.perf_counter()
        try:
            r = generate(GenerateRequest(model=a.model, width=a.size, height=a.size, steps=a.steps, warmup=1,
                                         flags=F.config_from_argv(argv_), vram_budget=BUDGETS.get(name)))
            d = r.dump
            lw = d["manifest"]["layerwise"]
            row = {"name": name, "argv": " ".join(argv_), "budget": BUDGETS.get(name), "step_ms": d["step_median_s"] * 1e3,
                   "spread": d["step_spread"], "peak_gib": d["peak_vram"]["torch_max_reserved_bytes"] / 2**30,
                   "cold_s": d["cold_start"]["total_s"], "compile_s": d["manifest"]["compile"].get("compile_s"),
                   "latency_s": d["latency_s"], "stages": d["stages"]}
            if lw:
                row["streamed_gb"] = lw["streamed_bytes"] / 1e9
                row["floor_ms"] = lw["streamed_bytes"] / bw * 1e3
                row["hits"], row["misses"] = lw["prefetch_hits"], lw["misses"]
        except Exception as e:  # a flag that cannot run is a row, not the end of the benchmark
            row = {"name": name, "argv": " ".join(argv_), "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        row["wall_s"] = time.perf_counter() - t
        rows.append(row)
        print(json.dumps(row), flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    if not a.no_diffusers:
        try:
            rows.append(diffusers_group_offload(a.model, device))
            print(json.dumps(rows[-1]), flush=True)
        except Exception as e:
            print(f"diffusers group offload failed: {type(e).__name__}: {e}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device), "pinned_gbps": bw / 1e9, "rows": rows}, f, indent=2)
    print(f"\n{'config':24} {'step ms':>8} {'peak GiB':>9} {'floor ms':>9} {'cold s':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:24} {'refused: ' + r['error'][:60]}")
        elif r:
            floor = f"{r['floor_ms']:9.1f}" if "floor_ms" in r else f"{'':9}"
            print(f"{r['name']:24} {r['step_ms']:8.1f} {r['peak_gib']:9.2f} {floor} {r.get('cold_s', 0):7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
