"""Does cuBLAS run a GEMM of the joint sequence (text + image tokens in one M) slower than the same
rows as two GEMMs? FLUX.1-dev's single blocks multiply 4608 = 512 + 4096 rows; the double blocks'
image stream, 4096. Each of the single block's products (qkv, mlp_in with its GELU epilogue, and
proj_out's two accumulating halves on strided weight slices) timed whole and split at the
text/image boundary, interleaved (whole, split, whole, ...) so both see the same clock, each
call after an L2 flush as inside a forward; TFLOP/s and the SM clock while they ran.

    python bench/bench_gemm_rows.py --json out.json          # H200 / H100
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_dit import Clocks  # noqa: E402

D, M_HID, TXT, IMG = 3072, 12288, 512, 4096  # FLUX.1-dev at 1024x1024


def products(dev, dt):
    """(label, K, N, fn(x, acc)) of a FLUX single block on random weights: fn multiplies the rows x;
    acc, the matching rows of a [4608, N] output, is what the accumulating product adds into."""
    g = torch.Generator(dev).manual_seed(0)

    def w(n, k):
        return torch.randn(n, k, device=dev, dtype=dt, generator=g) / k**0.5

    qkv, mlp_in, proj = w(3 * D, D), w(M_HID, D), w(D, D + M_HID)
    b3, bm, bd = (torch.randn(n, device=dev, dtype=dt, generator=g) for n in (3 * D, M_HID, D))
    proj_attn, proj_mlp = proj[:, :D], proj[:, D:]  # strided views, as linear_concat uses them
    proj_attn_c = proj_attn.contiguous()
    return [
        ("qkv", D, 3 * D, lambda x, acc: torch.addmm(b3, x, qkv.t())),
        ("mlp_in + GELU epilogue", D, M_HID, lambda x, acc: torch._addmm_activation(bm, x, mlp_in.t(), use_gelu=True)),
        ("proj_out, attention half (strided weight)", D, D, lambda x, acc: torch.addmm(bd, x, proj_attn.t())),
        ("proj_out, attention half (contiguous weight)", D, D, lambda x, acc: torch.addmm(bd, x, proj_attn_c.t())),
        ("proj_out, MLP half accumulated (strided weight)", M_HID, D, lambda x, acc: acc.addmm_(x, proj_mlp.t())),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    dev, dt = torch.device("cuda"), torch.bfloat16
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)
    rows = []
    for label, k, n, fn in products(dev, dt):
        x = torch.randn(TXT + IMG, k, device=dev, dtype=dt)
        acc = torch.zeros(TXT + IMG, n, device=dev, dtype=dt)
        variants = {"whole 4608": lambda: fn(x, acc),
                    "split 512 + 4096": lambda: (fn(x[:TXT], acc[:TXT]), fn(x[TXT:], acc[TXT:])),
                    "4096 alone": lambda: fn(x[TXT:], acc[TXT:])}
        for v in variants.values():
            for _ in range(3):
                v()
        times = {name: [] for name in variants}
        with Clocks(dev) as c:
            for _ in range(a.iters):
                for name, v in variants.items():
                    flush.zero_()
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    v()
                    e.record()
                    e.synchronize()
                    times[name].append(s.elapsed_time(e))
        clk = c.summary()
        for name, t in times.items():
            ms = statistics.median(t)
            m = IMG if name == "4096 alone" else TXT + IMG
            tf = 2 * m * k * n / (ms / 1e3) / 1e12
            rows.append({"product": label, "K": k, "N": n, "variant": name, "ms": ms, "tflops": tf, **clk})
            print(f"{label:48} {name:18} {ms * 1e3:8.1f} us  {tf:6.0f} TFLOP/s  SM {clk.get('sm_mhz_median', '-')} MHz",
                  flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"device": torch.cuda.get_device_name(dev), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
