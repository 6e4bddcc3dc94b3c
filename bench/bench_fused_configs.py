"""Launch configurations of the fused kernels at the models' shapes: each kernel timed per
configuration, with the bandwidth of the bytes it must move, so that the shipped configuration is
a measured choice. Times are CUDA-graph replays (no launch overhead, which at tens of microseconds
a call would otherwise be what is measured): "flushed" is (L2 flush + kernel) minus the flush alone,
the kernel starting from a cold L2 as inside a forward; "warm" the kernel alone, repeated.

    python bench/bench_fused_configs.py --json out.json        # H200 / H100

QK-norm + RoPE: (tokens per program, heads per program, warps); the row kernels (gated residuals,
modulation): (rows per program, warps), the columns always one power-of-two block of the width.
The first configuration of each list is what the kernels launch now.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import importlib  # noqa: E402

from triton.testing import do_bench_cudagraph  # noqa: E402

from dittune.kernels._common import triton  # noqa: E402

# the modules (dittune.kernels exports functions of the same names)
qk_norm_rope, residual, modulation = (importlib.import_module(f"dittune.kernels.{m}")
                                      for m in ("qk_norm_rope", "residual", "modulation"))

QK_CONFIGS = [None, (32, 1, 4), (16, 2, 4), (8, 4, 4), (4, 8, 4), (8, 8, 4), (8, 8, 8), (16, 8, 8), (2, 8, 2)]
ROW_CONFIGS = [None, (1, 8), (1, 4), (1, 16), (2, 8), (2, 16), (4, 16), (1, 2)]
QK_SHAPES = {"z-image-turbo": (4224, 30), "flux-dev": (4608, 24), "qwen-image": (4224, 24)}  # (tokens, heads), D 128
ROW_SHAPES = {"z-image-turbo": (4224, 3840), "flux-dev": (4608, 3072), "qwen-image": (4224, 3072)}


def _qk_cases(dev):
    for model, (l, h) in QK_SHAPES.items():
        d = 128
        qkv = torch.randn(1, l, 3, h, d, device=dev, dtype=torch.bfloat16)
        q, k = qkv[:, :, 0], qkv[:, :, 1]
        wq, wk = torch.randn(2, d, device=dev, dtype=torch.bfloat16).unbind(0)
        ang = torch.rand(l, d // 2, device=dev) * 100
        cos, sin = ang.cos(), ang.sin()
        yield model, "qk_norm_rope", 4 * q.numel() * 2, lambda: qk_norm_rope.launch(q, k, wq, wk, cos, sin)


def _row_cases(dev):
    for model, (l, c) in ROW_SHAPES.items():
        x, y = torch.randn(2, 1, l, c, device=dev, dtype=torch.bfloat16).unbind(0)
        gate, shift, scale = torch.randn(3, 1, c, device=dev, dtype=torch.bfloat16).unbind(0)
        w = torch.randn(c, device=dev, dtype=torch.bfloat16)
        n = x.numel() * 2
        if model == "z-image-turbo":
            yield model, "gated_norm_residual", 3 * n, lambda: residual.launch(x, gate, y, weight=w)
            yield model, "rms_norm_modulate", 2 * n, lambda: modulation.launch(x, w, None, scale, 1e-6, rms=True)
        else:
            yield model, "gated_residual", 3 * n, lambda: residual.launch(x, gate, y)
            yield model, "gated_residual_modulate", 4 * n, lambda: residual.launch(x, gate, y, shift=shift, scale=scale)
            yield model, "modulate", 2 * n, lambda: modulation.launch(x, None, shift, scale, 1e-6, rms=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)
    rows = []
    shipped_qk, shipped_row = qk_norm_rope._config, residual.row_config

    def measure(model, kernel, nbytes, fn, config, shipped):
        out = {"model": model, "kernel": kernel, "config": "shipped" if config is None else list(config),
               "shipped": list(shipped)}
        both, alone = (do_bench_cudagraph(f, return_mode="median") for f in (lambda: (flush.zero_(), fn()), flush.zero_))
        for key, ms in (("flushed", both - alone), ("warm", do_bench_cudagraph(fn, return_mode="median"))):
            out[f"us_{key}"] = ms * 1e3
            out[f"gbps_{key}"] = nbytes / ms / 1e6
        rows.append(out)
        print(json.dumps(out), flush=True)

    try:
        for model, kernel, nbytes, fn in _qk_cases(dev):
            for cfg in QK_CONFIGS:
                if cfg is None:
                    qk_norm_rope._config = shipped_qk
                else:
                    bm, heads, warps = cfg
                    qk_norm_rope._config = lambda d, h, bm=bm, heads=heads, warps=warps: (
                        bm, triton.next_power_of_2(d), heads, warps)
                measure(model, kernel, nbytes, fn, cfg, shipped_qk(128, QK_SHAPES[model][1]))
        for model, kernel, nbytes, fn in _row_cases(dev):
            for cfg in ROW_CONFIGS:
                if cfg is None:
                    residual.row_config = modulation.row_config = shipped_row
                else:
                    bm, warps = cfg
                    residual.row_config = modulation.row_config = lambda w, min_rows=1, bm=bm, warps=warps: (
                        bm, triton.next_power_of_2(w), warps)
                measure(model, kernel, nbytes, fn, cfg, shipped_row(ROW_SHAPES[model][1], 1 if kernel == "gated_residual" else 2))
    finally:
        qk_norm_rope._config, residual.row_config, modulation.row_config = shipped_qk, shipped_row, shipped_row
    if a.json:
        Path(a.json).write_text(json.dumps({"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                                            "rows": rows}, indent=1))
    print(f"\n{'model':14} {'kernel':24} {'config':14} {'us flushed':>10} {'GB/s':>6} {'us warm':>8} {'GB/s':>6}")
    for r in rows:
        print(f"{r['model']:14} {r['kernel']:24} {str(r['config']):14} {r['us_flushed']:10.1f} {r['gbps_flushed']:6.0f} "
              f"{r['us_warm']:8.1f} {r['gbps_warm']:6.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
