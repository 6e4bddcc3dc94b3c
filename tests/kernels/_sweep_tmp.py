# temporary: launch-config sweep and torch.compile comparison on the GPU (deleted after use)
import importlib, sys, torch
from triton.testing import do_bench
M = importlib.import_module("dittune.kernels.modulation")
R = importlib.import_module("dittune.kernels.residual")
Q = importlib.import_module("dittune.kernels.qk_norm_rope")
N = importlib.import_module("dittune.kernels.rmsnorm")
dev, dt = "cuda", torch.bfloat16
def t(fn): return do_bench(fn, return_mode="median") * 1e3
b, l, c = 1, 4608, 3072
x, y = torch.randn(2, b, l, c, device=dev, dtype=dt).unbind(0)
g, sh, sc = torch.randn(3, b, c, device=dev, dtype=dt).unbind(0)
w = torch.randn(c, device=dev, dtype=dt)
nb = x.numel() * 2
print("row kernels, flux [1, 4608, 3072] bf16: us (GB/s)")
for bm, nw in [(1, 4), (1, 8), (1, 16), (2, 8), (2, 16), (4, 16)]:
    cfg = lambda _c, bm=bm, nw=nw: (bm, 4096, nw)
    M.row_config = R.row_config = cfg
    a = t(lambda: M.launch(x, None, sh, sc, 1e-6, False)); r = t(lambda: R.launch(x, g, y))
    rm = t(lambda: R.launch(x, g, y, shift=sh, scale=sc))
    print(f"BLOCK_M={bm} warps={nw}: modulate {a:.1f} ({2*nb/a/1e3:.0f})  residual {r:.1f} ({3*nb/r/1e3:.0f})  res+mod {rm:.1f} ({4*nb/rm/1e3:.0f})", flush=True)
H, D = 24, 128
qkv = torch.randn(b, l, 3, H, D, device=dev, dtype=dt)
q, k = qkv[:, :, 0], qkv[:, :, 1]
wq, wk = torch.randn(2, D, device=dev, dtype=dt).unbind(0)
ang = torch.rand(l, D // 2, device=dev) * 100
cos, sin = ang.cos(), ang.sin()
qb = 4 * q.numel() * 2
print("qk_norm_rope flux [1, 4608, 24, 128] bf16")
for bm in (8, 16, 32, 64):
    for nw in (2, 4, 8):
        Q._config = lambda d, bm=bm, nw=nw: (bm, 128, nw)
        a = t(lambda: Q.launch(q, k, wq, wk, cos, sin))
        print(f"BLOCK_M={bm} warps={nw}: {a:.1f} us ({qb/a/1e3:.0f} GB/s)", flush=True)
if "--compile" in sys.argv:
    torch._dynamo.config.cache_size_limit = 64
    cases = {
        "modulate": (M.modulate_reference, (x, sh, sc), 2 * nb),
        "gated_residual": (R.gated_residual_reference, (x, g, y), 3 * nb),
        "gated_residual_modulate": (R.gated_residual_modulate_reference, (x, g, y, sh, sc), 4 * nb),
        "rms_norm_modulate": (M.rms_norm_modulate_reference, (x, w, sc), 2 * nb),
        "qk_norm_rope": (Q.qk_norm_rope_reference, (q, k, wq, wk, cos, sin), qb),
    }
    print("torch.compile(reference) vs eager reference, flux shapes")
    for name, (fn, args, nbytes) in cases.items():
        cf = torch.compile(fn)
        cf(*args)
        e, cc = t(lambda: fn(*args)), t(lambda: cf(*args))
        print(f"{name}: eager {e:.1f} us, compiled {cc:.1f} us ({nbytes/cc/1e3:.0f} GB/s)", flush=True)
