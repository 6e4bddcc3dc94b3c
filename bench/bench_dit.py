"""One DiT forward: dittune's native model vs diffusers' own class, same synthetic weights, same
inputs, same attention kernel, eager. Prints median ms and the ratio per model and backend.

    python bench/bench_dit.py                      # H100: flux-dev, qwen-image, z-image-turbo at 1024x1024
    python bench/bench_dit.py --tiny --device cpu  # smoke test of the script itself

The diffusers model is built first with its own random init; its state dict is copied to the
CPU, the model freed, and the native model loaded from that state dict (so both hold the same
weights without needing twice the memory: Qwen-Image's 20B DiT alone is 40 GB in bf16).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch

from dittune.engine import attention
from dittune.engine.components import default_dtype
from dittune.engine.models import get_family

DIFFUSERS_BACKEND = {"torch_sdpa": None, "torch_cudnn_sdpa": "_native_cudnn", "torch_flash_sdpa": "_native_flash",
                     "torch_efficient_sdpa": "_native_efficient"}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clocks:
    """NVML's SM clock (MHz) and board power (W) sampled every 2 ms from a thread while the block
    runs (GPU only; a no-op elsewhere or without pynvml): whether the same kernels run slower in
    one forward than another because the GPU runs them at a lower clock (denser work, more power)."""

    def __init__(self, device):
        self.device, self.sm, self.power = device, [], []

    def __enter__(self):
        import threading

        self._stop = threading.Event()
        self._t = None
        if self.device.type != "cuda":
            return self
        try:
            import pynvml

            pynvml.nvmlInit()
            idx = self.device.index if self.device.index is not None else torch.cuda.current_device()
            h = pynvml.nvmlDeviceGetHandleByIndex(idx)
        except Exception:  # noqa: BLE001 (no NVML: no clock figures, the timing stands)
            return self

        def run():
            while not self._stop.is_set():
                self.sm.append(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM))
                self.power.append(pynvml.nvmlDeviceGetPowerUsage(h) / 1e3)
                time.sleep(0.002)

        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._t is not None:
            self._t.join()

    def summary(self) -> dict:
        if not self.sm:
            return {}
        return {"sm_mhz_median": statistics.median(self.sm), "sm_mhz_min": min(self.sm),
                "power_w_median": statistics.median(self.power), "power_w_max": max(self.power)}


def timeit(fn, device, warmup: int, iters: int) -> float:
    """Median seconds of fn() after warm-up (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def flop_split(model: str, height: int, width: int, text_tokens: int) -> dict[str, float]:
    """FLOPs of one native DiT forward by kind, counted on the meta device (no memory, no GPU):
    {"gemm": matrix products, "attention": scaled-dot-product attention, "total": everything}. On the
    meta device SDPA runs as its math decomposition, two batched matmuls a call, and these DiTs have
    no other batched matmul: attention = the bmm FLOPs (Z-Image-Turbo at 1024x1024: 8.74 TFLOP, the
    4·L²·C of 30 blocks at 4224 tokens, two refiner blocks at 4096 and two at 128)."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = torch.device("meta")
    _, _, _, our_fwd = case(model, height, width, text_tokens, meta, torch.bfloat16)
    family = get_family(model)
    with meta, default_dtype(torch.bfloat16):
        dit = family.transformer_cls(family.spec.dit_config)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        our_fwd(dit)
    by_op = fc.get_flop_counts().get("Global", {})
    attn = sum(v for op, v in by_op.items() if "attention" in str(op) or str(op) == "aten.bmm")
    total = float(fc.get_total_flops())
    return {"gemm": total - attn, "attention": float(attn), "total": total}


def _tiny_config(ref_cls, c) -> dict:
    """A diffusers config for a tiny native config (fields named as diffusers names them)."""
    import dataclasses
    import inspect

    params = inspect.signature(ref_cls.__init__).parameters
    out = {k: v for k, v in dataclasses.asdict(c).items() if k in params}
    if "all_patch_size" in params:  # Z-Image names its patch sizes differently
        out["all_patch_size"], out["all_f_patch_size"] = (c.patch_size,), (1,)
    return out


def case(model: str, height: int, width: int, text_tokens: int, device, dtype):
    """(diffusers class, its config, diffusers forward(ref), native forward(ours, step_cache=None)) on
    shared inputs; the step cache is what the passes of one true-CFG step share."""
    import diffusers

    family = get_family(model)
    spec = family.spec
    g = None if device.type == "meta" else torch.Generator(device).manual_seed(0)  # meta: FLOP counting
    lh, lw = height // spec.vae_scale, width // spec.vae_scale
    gh, gw = lh // spec.patch, lw // spec.patch
    if spec.family == "flux":
        from dittune.engine.models import flux

        c = spec.dit_config
        ids = torch.zeros(gh, gw, 3, device=device)
        ids[..., 1] = torch.arange(gh, device=device)[:, None]
        ids[..., 2] = torch.arange(gw, device=device)[None, :]
        x = dict(
            hidden_states=torch.randn(1, gh * gw, c.in_channels, generator=g, device=device, dtype=dtype),
            encoder_hidden_states=torch.randn(1, text_tokens, c.joint_attention_dim, generator=g, device=device, dtype=dtype),
            pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g, device=device, dtype=dtype),
            timestep=torch.tensor([0.7], device=device, dtype=dtype), img_ids=ids.reshape(-1, 3),
            txt_ids=torch.zeros(text_tokens, 3, device=device),
            guidance=torch.full((1,), 3.5, device=device, dtype=torch.float32) if c.guidance_embeds else None,
        )
        ref_cls = diffusers.FluxTransformer2DModel
        ref_cfg = _tiny_config(ref_cls, c) if spec.tiny else flux._load("transformer_dev.json")
        return ref_cls, ref_cfg, (lambda m: m(**x, return_dict=False)[0]), (lambda m, step_cache=None: m(**x))
    if spec.family == "qwen_image":
        from dittune.engine.models import qwen_image as qi

        c = spec.dit_config
        img = torch.randn(1, gh * gw, c.in_channels, generator=g, device=device, dtype=dtype)
        txt = torch.randn(1, text_tokens, c.joint_attention_dim, generator=g, device=device, dtype=dtype)
        t = torch.tensor([0.7], device=device, dtype=dtype)
        ref_cls = diffusers.QwenImageTransformer2DModel
        ref_cfg = _tiny_config(ref_cls, c) if spec.tiny else qi._load_config("transformer")
        return (ref_cls, ref_cfg,
                lambda m: m(hidden_states=img, encoder_hidden_states=txt, timestep=t, img_shapes=[[(1, gh, gw)]], return_dict=False)[0],
                lambda m, step_cache=None: m(img, txt, None, t, gh, gw, step_cache))
    if spec.family == "zimage":
        from dittune.engine.models import zimage as zi

        c = spec.dit_config
        lat = torch.randn(1, c.in_channels, lh, lw, generator=g, device=device, dtype=dtype)
        cap = torch.randn(1, text_tokens, c.cap_feat_dim, generator=g, device=device, dtype=dtype)
        t = torch.tensor([0.3], device=device, dtype=dtype)
        packed = zi.pack_latents(lat)
        ref_cls = diffusers.ZImageTransformer2DModel
        ref_cfg = _tiny_config(ref_cls, c) if spec.tiny else zi._load("transformer")
        return (ref_cls, ref_cfg,
                lambda m: torch.stack(m(list(lat.unsqueeze(2).unbind(0)), t, list(cap.unbind(0)), return_dict=False)[0]).squeeze(2),
                lambda m, step_cache=None: zi.unpack_latents(m(packed, cap, t, gh, gw), gh, gw))
    raise SystemExit(f"no bench case for {model}")


def build_reference(ref_cls, ref_cfg: dict, device, dtype):
    """diffusers' class with its own random init, straight on the device in the bench dtype."""
    with torch.device(device), default_dtype(dtype):
        ref = ref_cls.from_config({k: v for k, v in ref_cfg.items() if not k.startswith("_")})
    return ref.to(device, dtype).eval().requires_grad_(False)


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def native_from(family, sd: dict, device, dtype):
    """The native DiT holding the weights of diffusers' state dict `sd` (kept on the CPU meanwhile,
    so both models never need GPU memory at once)."""
    with torch.device("meta"), default_dtype(dtype):
        ours = family.transformer_cls(family.spec.dit_config)
    ours.load_state_dict({k: v.to(device) for k, v in family.convert_diffusers_state_dict(sd).items()},
                         strict=True, assign=True)
    return ours.eval().requires_grad_(False)


def prepare_native(ours, cfg, device, pack: bool = True, groups=None) -> None:
    """The engine's DiT-level setup for a resident DiT, as Pipeline does it: packed modulation,
    attention backend, fused kernels, sequence parallelism over `groups` (a rank's
    engine.parallel Groups), compile."""
    from dittune.engine.models.base import pack_modulation
    from dittune.engine.ops import use_fused_kernels
    from dittune.engine.pipeline import compile_dit

    if pack:
        pack_modulation(ours)
    attention.set_backend(ours, cfg.attention_backend)
    if cfg.fused_kernels:
        use_fused_kernels(ours, device)
    if groups is not None:
        from dittune.engine.parallel import sequence_parallel

        sequence_parallel(ours, groups)
    if cfg.enable_torch_compile:
        compile_dit(ours, cfg.compile_scope, cfg.compile_mode)


def run(model: str, height: int, width: int, text_tokens: int, backends: list[str], device, dtype, warmup: int, iters: int):
    family = get_family(model)
    ref_cls, ref_cfg, ref_fwd, our_fwd = case(model, height, width, text_tokens, device, dtype)
    rows = []
    ref = build_reference(ref_cls, ref_cfg, device, dtype)
    ref_ms, ref_out = {}, {}
    with torch.inference_mode():
        for b in backends:
            if DIFFUSERS_BACKEND[b] is not None:
                ref.set_attention_backend(DIFFUSERS_BACKEND[b])
            elif hasattr(ref, "reset_attention_backend"):
                ref.reset_attention_backend()
            ref_ms[b] = timeit(lambda: ref_fwd(ref), device, warmup, iters) * 1e3
            ref_out[b] = ref_fwd(ref).float()
    sd = {k: v.to("cpu") for k, v in ref.state_dict().items()}
    del ref
    free(device)
    ours = native_from(family, sd, device, dtype)
    del sd
    from dittune.engine.models.base import pack_modulation

    pack_modulation(ours)  # as the engine runs a resident DiT
    with torch.inference_mode():
        for b in backends:
            attention.set_backend(ours, b)
            ms = timeit(lambda: our_fwd(ours), device, warmup, iters) * 1e3
            out = our_fwd(ours).float()
            rel = ((out - ref_out[b]).norm() / ref_out[b].norm()).item()
            rows.append({"model": model, "backend": b, "diffusers_ms": ref_ms[b], "dittune_ms": ms,
                         "ratio": ms / ref_ms[b], "rel_diff": rel})
    del ours
    free(device)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--tiny", action="store_true", help="tiny variants (CPU smoke test)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--text-tokens", type=int, default=None, help="default: 512 for FLUX, 128 for the others")
    ap.add_argument("--backends", nargs="+", default=["torch_sdpa", "torch_cudnn_sdpa"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = a.models or (["flux-dev-tiny", "qwen-image-tiny", "z-image-turbo-tiny"] if a.tiny else ["flux-dev", "qwen-image", "z-image-turbo"])
    size = a.size if not a.tiny else 64
    rows = []
    for m in models:
        tokens = a.text_tokens or (512 if m.startswith("flux") else 128)
        if a.tiny:
            tokens = 16
        rows += run(m, size, size, tokens, a.backends, device, dtype, a.warmup, a.iters)
        print(json.dumps(rows[-1]), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       "torch": torch.__version__, "size": size, "rows": rows}, f, indent=2)
    print(f"\n{'model':16} {'backend':18} {'diffusers ms':>12} {'dittune ms':>11} {'ratio':>6} {'rel diff':>9}")
    for r in rows:
        print(f"{r['model']:16} {r['backend']:18} {r['diffusers_ms']:12.2f} {r['dittune_ms']:11.2f} {r['ratio']:6.3f} {r['rel_diff']:9.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
