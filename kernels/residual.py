"""Fused gated residual, optionally with the next adaLN modulation or a norm of the branch output.

    gated_residual(x, gate, y)                          = x + gate * y                      FLUX, Qwen-Image
    gated_residual_modulate(x, gate, y, shift, scale)   = (r, LayerNorm(r) * (1 + scale) + shift), r = x + gate * y
    gated_norm_residual(x, gate, y, weight)             = x + gate * RMSNorm(y) * weight    Z-Image (gate or None)

The second is the common "residual + next adaLN" pair of FLUX's and Qwen-Image's dual-stream
blocks (attention residual, then the MLP's modulation): one read of x and y, two writes.
x, y [B, L, C]; gate, shift, scale [B, C], [B, 1, C] or [B, L, C].
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
    fail,
    modulation_strides,
    per_token,
    register,
    row_config,
    shape,
    tl,
    tracing,
    triton,
    use_triton,
    wrap_triton,
)
from .modulation import modulate_reference

# ---------------------------------------------------------------------------------------------
# Torch references (also the fallbacks)


def gated_residual_reference(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y. [B, L, C]"""
    return torch.addcmul(x, per_token(gate), y)


def gated_residual_modulate_reference(
    x: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    shift: Optional[torch.Tensor],
    scale: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    r = gated_residual_reference(x, gate, y)
    return r, modulate_reference(r, shift, scale, eps)


def gated_norm_residual_reference(
    x: torch.Tensor, gate: Optional[torch.Tensor], y: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """x + gate * rms_norm(y) * weight; x + rms_norm(y) * weight when gate is None. [B, L, C]"""
    y = F.rms_norm(y, (y.shape[-1],), weight, eps)
    return x + y if gate is None else x + per_token(gate) * y


# ---------------------------------------------------------------------------------------------
# Triton kernel


@triton.jit
def _residual_kernel(
    X,  # [B, L, C] residual stream, last dim contiguous
    GATE,  # [B, 1|L, C] (read only when HAS_GATE)
    Y,  # [B, L, C] branch output
    WY,  # [C] RMSNorm weight of y (read only when NORM_Y)
    SHIFT,  # [B, 1|L, C] next modulation (read only when MODULATE and HAS_SHIFT)
    SCALE,
    OUT,  # [B, L, C] contiguous: x + gate * y
    MOD_OUT,  # [B, L, C] contiguous: modulated LayerNorm of OUT (written only when MODULATE)
    L,
    C,
    stride_xb,
    stride_xl,
    stride_gb,
    stride_gl,
    stride_yb,
    stride_yl,
    stride_hb,
    stride_hl,
    stride_sb,
    stride_sl,
    eps,
    HAS_GATE: tl.constexpr,
    NORM_Y: tl.constexpr,
    MODULATE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    PER_TOKEN: tl.constexpr,  # gate, shift or scale is [B, L, C]
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_C)[None, :]
    mask = (rows < L) & (cols < C)

    y = tl.load(Y + b * stride_yb + rows * stride_yl + cols, mask=mask, other=0.0).to(tl.float32)
    if NORM_Y:
        y = y * tl.rsqrt(tl.sum(y * y, axis=1) / C + eps)[:, None]
        y = y * tl.load(WY + cols, mask=cols < C, other=0.0).to(tl.float32)
    # Per sample: one [1, BLOCK_C] load of gate, shift, scale shared by the BLOCK_M rows.
    mod_rows, mod_mask = rows, mask
    if not PER_TOKEN:
        mod_rows, mod_mask = 0, cols < C
    if HAS_GATE:
        gate = tl.load(GATE + b * stride_gb + mod_rows * stride_gl + cols, mask=mod_mask, other=0.0)
        y = y * gate.to(tl.float32)
    r = tl.load(X + b * stride_xb + rows * stride_xl + cols, mask=mask, other=0.0).to(tl.float32) + y
    r_out = r.to(OUT.dtype.element_ty)
    tl.store(OUT + (b * L + rows) * C + cols, r_out, mask=mask)

    if MODULATE:
        r = r_out.to(tl.float32)  # normalise the residual as stored, as the unfused ops do
        rc = tl.where(mask, r - (tl.sum(r, axis=1) / C)[:, None], 0.0)
        h = rc * tl.rsqrt(tl.sum(rc * rc, axis=1) / C + eps)[:, None]
        scale = tl.load(SCALE + b * stride_sb + mod_rows * stride_sl + cols, mask=mod_mask, other=0.0)
        h = h * (1.0 + scale.to(tl.float32))
        if HAS_SHIFT:
            shift = tl.load(SHIFT + b * stride_hb + mod_rows * stride_hl + cols, mask=mod_mask, other=0.0)
            h = h + shift.to(tl.float32)
        tl.store(MOD_OUT + (b * L + rows) * C + cols, h.to(MOD_OUT.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launcher


def _check(op: str, x, gate, y, weight=None, shift=None, scale=None) -> None:
    check_3d(op, x)
    check_dtype(op, x, gate=gate, y=y, weight=weight, shift=shift, scale=scale)
    if y.shape != x.shape:
        fail(op, f"y {shape(y)} must have the shape of x {shape(x)}")
    check_weight(op, "weight", weight, x.shape[-1])
    for name, t in (("gate", gate), ("shift", shift), ("scale", scale)):
        check_modulation(op, name, t, x)


def launch(
    x: torch.Tensor,
    gate: Optional[torch.Tensor],
    y: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """x + gate * (rms_norm(y) * weight if weight is given else y); with `scale`, also the
    modulated LayerNorm of that sum. -> (sum, modulated or None), both contiguous [B, L, C]."""
    _check(_op_name(weight, scale), x, gate, y, weight, shift, scale)
    return _launch(x, gate, y, weight, shift, scale, eps)


def _op_name(weight, scale) -> str:
    if scale is not None:
        return "gated_residual_modulate"
    return "gated_residual" if weight is None else "gated_norm_residual"


def _launch(x, gate, y, weight=None, shift=None, scale=None, eps: float = 1e-6):
    check_launchable(_op_name(weight, scale), _residual_kernel, x, gate=gate, y=y, weight=weight, shift=shift,
                     scale=scale)  # fmt: skip
    b, l, c = x.shape
    out = torch.empty((b, l, c), dtype=x.dtype, device=x.device)
    mod_out = torch.empty_like(out) if scale is not None else None
    if out.numel() == 0:
        return out, mod_out
    block_m, block_c, num_warps = row_config(c, min_rows=1 if weight is None and scale is None else 2)
    kernel = wrap_triton(_residual_kernel) if tracing(x) else _residual_kernel
    kernel[(triton.cdiv(l, block_m), b)](
        x,
        x if gate is None else gate,
        y,
        x if weight is None else weight,
        x if shift is None else shift,
        x if scale is None else scale,
        out,
        out if mod_out is None else mod_out,
        l,
        c,
        x.stride(0),
        x.stride(1),
        *modulation_strides(gate, x),
        y.stride(0),
        y.stride(1),
        *modulation_strides(shift, x),
        *modulation_strides(scale, x),
        eps,
        HAS_GATE=gate is not None,
        NORM_Y=weight is not None,
        MODULATE=scale is not None,
        HAS_SHIFT=shift is not None,
        PER_TOKEN=any(modulation_strides(t, x)[1] for t in (gate, shift, scale)),
        BLOCK_M=block_m,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return out, mod_out


# ---------------------------------------------------------------------------------------------
# Public ops


@register("gated_residual")
def _gated_residual_op(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    _check("gated_residual", x, gate, y)
    if use_triton(x, _residual_kernel):
        return _launch(x, gate, y)[0]
    return gated_residual_reference(x, gate, y)


@register("gated_residual_modulate")
def _gated_residual_modulate_op(
    x: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    shift: Optional[torch.Tensor],
    scale: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check("gated_residual_modulate", x, gate, y, shift=shift, scale=scale)
    if use_triton(x, _residual_kernel):
        return _launch(x, gate, y, shift=shift, scale=scale, eps=eps)
    return gated_residual_modulate_reference(x, gate, y, shift, scale, eps)


@register("gated_norm_residual")
def _gated_norm_residual_op(
    x: torch.Tensor, gate: Optional[torch.Tensor], y: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    _check("gated_norm_residual", x, gate, y, weight)
    if use_triton(x, _residual_kernel):
        return _launch(x, gate, y, weight=weight, eps=eps)[0]
    return gated_norm_residual_reference(x, gate, y, weight, eps)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y. x, y [B, L, C]; gate [B, C], [B, 1, C] or [B, L, C]; all one dtype.
    Returns a new contiguous [B, L, C]. Triton on CUDA, the torch reference elsewhere."""
    return _gated_residual_op(x, gate, y)


def gated_residual_modulate(
    x: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    shift: Optional[torch.Tensor],
    scale: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, modulate(r, shift, scale, eps)) with r = x + gate * y: the residual and the next adaLN input."""
    return _gated_residual_modulate_op(x, gate, y, shift, scale, eps)


def gated_norm_residual(
    x: torch.Tensor, gate: Optional[torch.Tensor], y: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """x + gate * (RMSNorm(y) * weight), stats in fp32; without gate when None (Z-Image's context refiner)."""
    return _gated_norm_residual_op(x, gate, y, weight, eps)


# ---------------------------------------------------------------------------------------------
# Benchmark: python -m dittune.kernels.residual


def benchmark() -> None:
    dev, dt = "cuda", torch.bfloat16
    for name, b, l, c in [("flux 1024^2", 1, 4096 + 512, 3072), ("z-image 1024^2", 1, 4096 + 128, 3840)]:
        x, y = torch.randn(2, b, l, c, device=dev, dtype=dt).unbind(0)
        gate, shift, scale = torch.randn(3, b, c, device=dev, dtype=dt).unbind(0)
        w = torch.randn(c, device=dev, dtype=dt)
        nbytes = 3 * x.numel() * x.element_size()
        bench(f"gated_residual {name} [{b}, {l}, {c}]", nbytes, reference=lambda: gated_residual_reference(x, gate, y),
              triton=lambda: launch(x, gate, y), op=lambda: gated_residual(x, gate, y))  # fmt: skip
        bench(f"gated_residual_modulate {name}", 4 * x.numel() * x.element_size(),
              reference=lambda: gated_residual_modulate_reference(x, gate, y, shift, scale),
              triton=lambda: launch(x, gate, y, shift=shift, scale=scale),
              op=lambda: gated_residual_modulate(x, gate, y, shift, scale))  # fmt: skip
        bench(f"gated_norm_residual {name}", nbytes, reference=lambda: gated_norm_residual_reference(x, gate, y, w),
              triton=lambda: launch(x, gate, y, weight=w), op=lambda: gated_norm_residual(x, gate, y, w))  # fmt: skip


if __name__ == "__main__":
    benchmark()
