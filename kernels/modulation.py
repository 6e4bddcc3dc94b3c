"""Fused adaLN modulation: normalise each token over C, then scale and shift it per sample (or per token).

    modulate(x, shift, scale)            = LayerNorm(x) * (1 + scale) + shift    FLUX, Qwen-Image, Z-Image's final layer
    rms_norm_modulate(x, weight, scale)  = RMSNorm(x) * weight * (1 + scale)     Z-Image's blocks

x [B, L, C]; shift, scale [B, C] or [B, 1, C] (per sample) or [B, L, C] (per token). The reference
computes in torch the exact op sequence of the models (LayerNorm rounded to x.dtype, then addcmul),
the kernel reads x once and writes the result once, with all arithmetic in fp32.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from ._common import (
    bench,
    check_3d,
    check_dtype,
    check_launchable,
    check_modulation,
    check_weight,
    modulation_strides,
    per_token,
    register,
    row_config,
    tl,
    tracing,
    triton,
    use_triton,
    wrap_triton,
)

# ---------------------------------------------------------------------------------------------
# Torch reference (also the fallback)


def modulate_reference(
    x: torch.Tensor, shift: Optional[torch.Tensor], scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """LayerNorm(x) without affine, then * (1 + scale) + shift (no shift when None). [B, L, C]"""
    y = F.layer_norm(x, (x.shape[-1],), eps=eps)
    if shift is None:
        return y * (1 + per_token(scale))
    return torch.addcmul(per_token(shift), y, 1 + per_token(scale))


def rms_norm_modulate_reference(
    x: torch.Tensor, weight: Optional[torch.Tensor], scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """RMSNorm(x) * weight, then * (1 + scale). [B, L, C]"""
    return F.rms_norm(x, (x.shape[-1],), weight, eps) * (1 + per_token(scale))


# ---------------------------------------------------------------------------------------------
# Triton kernel


@triton.jit
def _modulate_kernel(
    X,  # [B, L, C], rows strided, last dim contiguous
    W,  # [C] RMSNorm weight (read only when HAS_WEIGHT)
    SHIFT,  # [B, 1|L, C] (read only when HAS_SHIFT)
    SCALE,  # [B, 1|L, C]
    OUT,  # [B, L, C] contiguous
    L,
    C,
    stride_xb,
    stride_xl,
    stride_hb,  # shift strides; token stride 0 for per-sample
    stride_hl,
    stride_sb,  # scale strides
    stride_sl,
    eps,
    RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    PER_TOKEN: tl.constexpr,  # shift or scale is [B, L, C]
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]  # token index
    cols = tl.arange(0, BLOCK_C)[None, :]
    mask = (rows < L) & (cols < C)

    # fp32 everywhere: statistics, and the modulation (bf16 arithmetic would round at every step).
    x = tl.load(X + b * stride_xb + rows * stride_xl + cols, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        y = x * tl.rsqrt(tl.sum(x * x, axis=1) / C + eps)[:, None]
    else:
        xc = tl.where(mask, x - (tl.sum(x, axis=1) / C)[:, None], 0.0)
        y = xc * tl.rsqrt(tl.sum(xc * xc, axis=1) / C + eps)[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=cols < C, other=0.0).to(tl.float32)
    # Per sample: one [1, BLOCK_C] load shared by the BLOCK_M rows.
    mod_rows, mod_mask = rows, mask
    if not PER_TOKEN:
        mod_rows, mod_mask = 0, cols < C
    scale = tl.load(SCALE + b * stride_sb + mod_rows * stride_sl + cols, mask=mod_mask, other=0.0)
    y = y * (1.0 + scale.to(tl.float32))
    if HAS_SHIFT:
        shift = tl.load(SHIFT + b * stride_hb + mod_rows * stride_hl + cols, mask=mod_mask, other=0.0)
        y = y + shift.to(tl.float32)
    tl.store(OUT + (b * L + rows) * C + cols, y.to(OUT.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launcher


def _check(op: str, x, weight, shift, scale) -> None:
    check_3d(op, x)
    check_dtype(op, x, weight=weight, shift=shift, scale=scale)
    check_weight(op, "weight", weight, x.shape[-1])
    check_modulation(op, "shift", shift, x)
    check_modulation(op, "scale", scale, x)


def launch(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    scale: torch.Tensor,
    eps: float,
    rms: bool,
) -> torch.Tensor:
    """Run the Triton kernel (LayerNorm when rms=False, RMSNorm * weight when rms=True). -> [B, L, C] contiguous."""
    _check("rms_norm_modulate" if rms else "modulate", x, weight, shift, scale)
    return _launch(x, weight, shift, scale, eps, rms)


def _launch(x, weight, shift, scale, eps: float, rms: bool) -> torch.Tensor:
    check_launchable("rms_norm_modulate" if rms else "modulate", _modulate_kernel, x, weight=weight, shift=shift,
                     scale=scale)  # fmt: skip
    b, l, c = x.shape
    out = torch.empty((b, l, c), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_m, block_c, num_warps = row_config(c, min_rows=2)
    kernel = wrap_triton(_modulate_kernel) if tracing(x) else _modulate_kernel
    kernel[(triton.cdiv(l, block_m), b)](
        x,
        x if weight is None else weight,
        x if shift is None else shift,
        scale,
        out,
        l,
        c,
        x.stride(0),
        x.stride(1),
        *modulation_strides(shift, x),
        *modulation_strides(scale, x),
        eps,
        RMS=rms,
        HAS_WEIGHT=weight is not None,
        HAS_SHIFT=shift is not None,
        PER_TOKEN=any(modulation_strides(t, x)[1] for t in (shift, scale)),
        BLOCK_M=block_m,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return out


# ---------------------------------------------------------------------------------------------
# Public ops


@register("modulate")
def _modulate_op(x: torch.Tensor, shift: Optional[torch.Tensor], scale: torch.Tensor, eps: float) -> torch.Tensor:
    _check("modulate", x, None, shift, scale)
    if use_triton(x, _modulate_kernel):
        return _launch(x, None, shift, scale, eps, rms=False)
    return modulate_reference(x, shift, scale, eps)


@register("rms_norm_modulate")
def _rms_norm_modulate_op(
    x: torch.Tensor, weight: Optional[torch.Tensor], scale: torch.Tensor, eps: float
) -> torch.Tensor:
    _check("rms_norm_modulate", x, weight, None, scale)
    if use_triton(x, _modulate_kernel):
        return _launch(x, weight, None, scale, eps, rms=True)
    return rms_norm_modulate_reference(x, weight, scale, eps)


def modulate(x: torch.Tensor, shift: Optional[torch.Tensor], scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm(x) (no affine, stats in fp32) * (1 + scale) + shift.

    x [B, L, C]; shift (or None), scale: [B, C], [B, 1, C] or [B, L, C], same dtype as x.
    Returns a new contiguous [B, L, C] in x.dtype. Triton on CUDA, the torch reference elsewhere."""
    return _modulate_op(x, shift, scale, eps)


def rms_norm_modulate(
    x: torch.Tensor, weight: Optional[torch.Tensor], scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """RMSNorm(x) (stats in fp32) * weight (when not None) * (1 + scale). Shapes as `modulate`."""
    return _rms_norm_modulate_op(x, weight, scale, eps)


# ---------------------------------------------------------------------------------------------
# Benchmark: python -m dittune.kernels.modulation


def benchmark() -> None:
    dev, dt = "cuda", torch.bfloat16
    shapes = [("flux 1024^2", 1, 4096 + 512, 3072), ("qwen-image 1328^2 cfg", 2, 6889 + 64, 3072),
              ("z-image 1024^2", 1, 4096 + 128, 3840)]  # fmt: skip
    for name, b, l, c in shapes:
        x = torch.randn(b, l, c, device=dev, dtype=dt)
        shift, scale = torch.randn(2, b, c, device=dev, dtype=dt).unbind(0)
        w = torch.randn(c, device=dev, dtype=dt)
        nbytes = 2 * x.numel() * x.element_size()
        bench(f"modulate {name} [{b}, {l}, {c}]", nbytes,
              reference=lambda: modulate_reference(x, shift, scale),
              triton=lambda: launch(x, None, shift, scale, 1e-6, rms=False),
              op=lambda: modulate(x, shift, scale))  # fmt: skip
        bench(f"rms_norm_modulate {name}", nbytes,
              reference=lambda: rms_norm_modulate_reference(x, w, scale),
              triton=lambda: launch(x, w, None, scale, 1e-6, rms=True),
              op=lambda: rms_norm_modulate(x, w, scale))  # fmt: skip


if __name__ == "__main__":
    benchmark()
