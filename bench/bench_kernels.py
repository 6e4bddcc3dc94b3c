"""Does the same attention kernel run slower in dittune's forward because of how its inputs are laid
out? cuDNN SDPA at each workload's attention shape, q/k/v either contiguous [B, H, L, D] (what
dittune's models hand it) or [B, L, H, D] storage seen through transpose(1, 2) (what diffusers
hands it), each timed alone and after an L2 flush, with the SM clock and power while it ran; plus
the copies each layout needs around it (dittune: V to [B, H, L, D] and the output back to
[B, L, H*D]; diffusers: none).

    python bench/bench_kernels.py --json out.json          # H200 / H100
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
from bench_dit import Clocks  # noqa: E402

# (heads, head dim, tokens) at 1024x1024: image tokens 4096 plus the text tokens each pipeline uses
SHAPES = {"flux-dev": (24, 128, 4096 + 512), "qwen-image": (24, 128, 4096 + 128), "z-image-turbo": (30, 128, 4096 + 128)}


def _time(fn, iters: int, flush: torch.Tensor | None) -> float:
    """Median ms of fn() over `iters` calls, each timed alone (CUDA events); `flush`: zeroed
    before each call, so that the kernel starts from a cold L2 as it does inside a forward."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if flush is not None:
            flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)  # more than the H100/H200's 50/60 MB L2
    rows = []
    for model, (h, d, l) in SHAPES.items():
        g = torch.Generator(device=dev).manual_seed(0)
        bshd = [torch.randn(1, l, h, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3)]
        bhsd = [x.transpose(1, 2).contiguous() for x in bshd]
        views = [x.transpose(1, 2) for x in bshd]  # diffusers' layout: [B, H, L, D] strides over [B, L, H, D]
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]), torch.inference_mode():
            ref = F.scaled_dot_product_attention(*bhsd)
            out_v = F.scaled_dot_product_attention(*views)
            cases = {
                "cudnn, q/k/v contiguous [B,H,L,D] (dittune)": lambda: F.scaled_dot_product_attention(*bhsd),
                "cudnn, q/k/v [B,L,H,D] viewed (diffusers)": lambda: F.scaled_dot_product_attention(*views),
                "dittune's copies: V to [B,H,L,D] + output to [B,L,H*D]": lambda: (
                    bshd[2].transpose(1, 2).contiguous(), ref.transpose(1, 2).reshape(1, l, h * d)),
                "diffusers' output to [B,L,H*D] (a view when cuDNN kept [B,L,H,D])": lambda: (
                    out_v.transpose(1, 2).reshape(1, l, h * d)),
            }
            for name, fn in cases.items():
                for cold in (False, True):
                    with Clocks(dev) as c:
                        ms = _time(fn, a.iters, flush if cold else None)
                    rows.append({"model": model, "shape": [1, h, l, d], "case": name, "l2": "flushed" if cold else "warm",
                                 "ms": ms, **c.summary()})
                    print(json.dumps(rows[-1]), flush=True)
            diff = ((out_v.float() - ref.float()).norm() / ref.float().norm()).item()
            rows.append({"model": model, "case": "output strides", "dittune": list(ref.stride()),
                         "diffusers": list(out_v.stride()), "rel_diff": diff})
            print(json.dumps(rows[-1]), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                                            "rows": rows}, indent=2))
    print(f"\n{'model':14} {'case':66} {'L2':8} {'ms':>7} {'SM MHz':>6}")
    for r in rows:
        if "ms" in r:
            print(f"{r['model']:14} {r['case'][:66]:66} {r['l2']:8} {r['ms']:7.3f} {r.get('sm_mhz_median', '-'):>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
