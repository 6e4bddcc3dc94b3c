"""Per-head RMSNorm of Q and K fused with RoPE, from projection views straight to SDPA layout.

    qk_norm_rope(q, k, q_weight, k_weight, cos, sin)         single stream (FLUX single blocks, Z-Image)
    joint_qk_norm_rope(q_txt, k_txt, q_img, k_img, ...)      two streams with their own norm weights,
                                                             output joined [txt, img] along L (FLUX
                                                             double blocks, Qwen-Image)

Inputs q, k [B, L, H, D]: any strides with a contiguous last dim, e.g. `qkv.unflatten(-1, (3, H, D))
[:, :, 0]` of a packed QKV projection [B, L, 3 * H * D], or `.transpose(1, 2)` of a [B, H, L, D]
view. cos, sin [L, D/2] fp32 (any strides): the angle of position l and pair i.
Output: [B, H, L, D] in q.dtype, the `.transpose(1, 2)` view of a new contiguous [B, L, H, D]: the
layout SDPA, flash-attn and SageAttention take without a copy, and in which they return the
output, whose reshape to [B, L, H * D] is then a view too (engine/attention.py).

Convention (the same in FLUX, Qwen-Image and Z-Image): RMSNorm first (fp32 stats, * weight), then
rotate interleaved pairs (x[2i], x[2i+1]) in fp32:
    out[2i]   = x[2i] * cos - x[2i+1] * sin
    out[2i+1] = x[2i] * sin + x[2i+1] * cos
The reference rotates in real fp32 arithmetic; on the CPU it is bit-identical to each model's own
QK-norm + RoPE (their complex products included): tests/kernels/test_qk_norm_rope.py checks it.
"""

import torch
import torch.nn.functional as F

from ._common import (
    DTYPES,
    bench,
    check_launchable,
    fail,
    register,
    shape,
    tl,
    tracing,
    triton,
    use_triton,
    wrap_triton,
)

# ---------------------------------------------------------------------------------------------
# Torch reference (also the fallback)


def norm_rope_reference(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """One of Q/K: x [B, L, H, D] -> RMSNorm * weight (rounded to x.dtype), RoPE in fp32 -> [B, H, L, D],
    a view of a new contiguous [B, L, H, D]."""
    dtype = x.dtype
    x = F.rms_norm(x, (x.shape[-1],), weight, eps).float().unflatten(-1, (-1, 2))
    re, im = x.unbind(-1)  # [B, L, H, D/2]
    cos, sin = cos[:, None], sin[:, None]  # [L, 1, D/2]
    out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1)
    return out.flatten(-2).to(dtype).transpose(1, 2)


def qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, eps: float = 1e-6):
    return norm_rope_reference(q, q_weight, cos, sin, eps), norm_rope_reference(k, k_weight, cos, sin, eps)


def joint_qk_norm_rope_reference(
    q_txt, k_txt, q_img, k_img, q_weight_txt, k_weight_txt, q_weight_img, k_weight_img, cos, sin, eps: float = 1e-6
):
    lt = q_txt.shape[1]
    q = [norm_rope_reference(q_txt, q_weight_txt, cos[:lt], sin[:lt], eps),
         norm_rope_reference(q_img, q_weight_img, cos[lt:], sin[lt:], eps)]  # fmt: skip
    k = [norm_rope_reference(k_txt, k_weight_txt, cos[:lt], sin[:lt], eps),
         norm_rope_reference(k_img, k_weight_img, cos[lt:], sin[lt:], eps)]  # fmt: skip
    # Joined along L in the [B, L, H, D] storage, returned as [B, H, L, D] views like the streams.
    return tuple(torch.cat([t.transpose(1, 2) for t in pair], dim=1).transpose(1, 2) for pair in (q, k))


# ---------------------------------------------------------------------------------------------
# Triton kernel: program (l block, b * head group, q or k) normalises and rotates BLOCK_M rows of
# HEADS heads. The RoPE angles of those rows are loaded once per program and serve its HEADS heads:
# with one head per program the cos/sin loads were twice the bytes of the q/k rows themselves.


@triton.jit
def _qk_norm_rope_kernel(
    Q,  # [B, L, H, D] strided, last dim contiguous
    K,  # same shape and dtype as Q, own strides
    WQ,  # [D]
    WK,  # [D]
    COS,  # [L_out, D/2] fp32
    SIN,
    QO,  # [B, L_out, H, D] through stride_o* (last dim contiguous); writes rows l_offset .. l_offset + L
    KO,  # same shape and strides as QO
    L,
    H,
    l_offset,
    stride_ob,
    stride_ol,
    stride_oh,
    stride_qb,
    stride_ql,
    stride_qh,
    stride_kb,
    stride_kl,
    stride_kh,
    stride_cl,
    stride_ci,
    stride_sl,
    stride_si,
    D,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEADS: tl.constexpr,  # heads per program, a power of two (masked past H)
):
    groups = tl.cdiv(H, HEADS)
    b = (tl.program_id(1) // groups).to(tl.int64)
    heads = ((tl.program_id(1) % groups) * HEADS + tl.arange(0, HEADS)).to(tl.int64)[:, None, None]
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[None, :, None]  # token in segment
    cols = tl.arange(0, BLOCK_D)[None, None, :]
    mask = (heads < H) & (rows < L) & (cols < D)  # [HEADS, BLOCK_M, BLOCK_D]
    # Pointers per branch (not strides) so both branches yield the same types whatever triton
    # specialises the integer arguments to.
    if tl.program_id(2) == 0:
        x_ptrs = Q + b * stride_qb + heads * stride_qh + rows * stride_ql + cols
        w_ptrs = WQ + cols
        o_ptrs = QO + b * stride_ob + heads * stride_oh + (l_offset + rows) * stride_ol + cols
    else:
        x_ptrs = K + b * stride_kb + heads * stride_kh + rows * stride_kl + cols
        w_ptrs = WK + cols
        o_ptrs = KO + b * stride_ob + heads * stride_oh + (l_offset + rows) * stride_ol + cols

    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)  # [HEADS, BLOCK_M, BLOCK_D]
    x = x * tl.rsqrt(tl.sum(x * x, axis=2) / D + eps)[:, :, None]
    x = x * tl.load(w_ptrs, mask=cols < D, other=0.0).to(tl.float32)
    re, im = tl.split(tl.reshape(x, [HEADS, BLOCK_M, BLOCK_D // 2, 2]))  # [HEADS, BLOCK_M, BLOCK_D/2] each

    pairs = tl.arange(0, BLOCK_D // 2)[None, None, :]
    pos = l_offset + rows
    cmask = (rows < L) & (pairs < D // 2)  # [1, BLOCK_M, BLOCK_D/2]: one load for the program's heads
    cos = tl.load(COS + pos * stride_cl + pairs * stride_ci, mask=cmask, other=0.0)
    sin = tl.load(SIN + pos * stride_sl + pairs * stride_si, mask=cmask, other=0.0)
    out = tl.reshape(tl.join(re * cos - im * sin, re * sin + im * cos), [HEADS, BLOCK_M, BLOCK_D])
    tl.store(o_ptrs, out.to(QO.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launcher


def _check_pair(op: str, q, k, q_weight, k_weight, what: str = "") -> None:
    if q.dim() != 4:
        fail(op, f"q{what} must be [B, L, H, D], got {shape(q)}")
    if k.shape != q.shape:
        fail(op, f"k{what} {shape(k)} must have the shape of q{what} {shape(q)}")
    if q.dtype not in DTYPES:
        fail(op, f"q{what} has dtype {q.dtype}; supported: float32, bfloat16, float16")
    d = q.shape[-1]
    if d % 2:
        fail(op, f"head dim D={d} must be even (RoPE rotates pairs)")
    for name, t in ((f"k{what}", k), (f"q_weight{what}", q_weight), (f"k_weight{what}", k_weight)):
        if t.dtype != q.dtype or t.device != q.device:
            fail(op, f"{name} is {t.dtype} on {t.device}, q is {q.dtype} on {q.device}: they must match")
    for name, w in ((f"q_weight{what}", q_weight), (f"k_weight{what}", k_weight)):
        if tuple(w.shape) != (d,):
            fail(op, f"{name} must be [{d}] (head dim), got {shape(w)}")


def _check_rope(op: str, q, cos, sin, length: int) -> None:
    d = q.shape[-1]
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (length, d // 2):
            fail(op, f"{name} must be [L, D/2] = [{length}, {d // 2}], got {shape(t)}")
        if t.dtype != torch.float32 or t.device != q.device:
            fail(op, f"{name} must be float32 on {q.device} (RoPE is computed in fp32), got {t.dtype} on {t.device}")


def _config(d: int, h: int) -> tuple[int, int, int, int]:
    """(BLOCK_M tokens, BLOCK_D, HEADS, num_warps) per program: up to 8 heads share one load of the
    tokens' angles, 4096 elements a program."""
    block_d = triton.next_power_of_2(d)
    heads = min(8, triton.next_power_of_2(h))
    return max(1, min(64, 4096 // (block_d * heads))), block_d, heads, 4


def _outputs(q: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """New (q, k) outputs [B, L, H, D], contiguous: the kernel writes them through their strides."""
    b, _, h, d = q.shape
    q_out = torch.empty((b, length, h, d), dtype=q.dtype, device=q.device)
    return q_out, torch.empty_like(q_out)


def _launch_segment(q, k, q_weight, k_weight, cos, sin, eps, q_out, k_out, l_offset: int) -> None:
    """q_out, k_out [B, L_out, H, D] with the strides of each other (rows l_offset .. l_offset + L written)."""
    b, l, h, d = q.shape
    if q.numel() == 0:
        return
    block_m, block_d, heads, num_warps = _config(d, h)
    kernel = wrap_triton(_qk_norm_rope_kernel) if tracing(q) else _qk_norm_rope_kernel
    kernel[(triton.cdiv(l, block_m), b * triton.cdiv(h, heads), 2)](
        q, k, q_weight, k_weight, cos, sin, q_out, k_out,
        l, h, l_offset, q_out.stride(0), q_out.stride(1), q_out.stride(2),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        d, eps, BLOCK_M=block_m, BLOCK_D=block_d, HEADS=heads, num_warps=num_warps,
    )  # fmt: skip


def launch(q, k, q_weight, k_weight, cos, sin, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the Triton kernel on one stream. -> (q, k) [B, H, L, D] views of new contiguous [B, L, H, D]."""
    _check_pair("qk_norm_rope", q, k, q_weight, k_weight)
    _check_rope("qk_norm_rope", q, cos, sin, q.shape[1])
    return _launch(q, k, q_weight, k_weight, cos, sin, eps)


def _launch(q, k, q_weight, k_weight, cos, sin, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    check_launchable("qk_norm_rope", _qk_norm_rope_kernel, q, k=k, q_weight=q_weight, k_weight=k_weight)
    q_out, k_out = _outputs(q, q.shape[1])
    _launch_segment(q, k, q_weight, k_weight, cos, sin, eps, q_out, k_out, 0)
    return q_out.transpose(1, 2), k_out.transpose(1, 2)


def _check_joint(op, q_txt, k_txt, q_img, k_img, q_weight_txt, k_weight_txt, q_weight_img, k_weight_img, cos, sin):
    _check_pair(op, q_txt, k_txt, q_weight_txt, k_weight_txt, "_txt")
    _check_pair(op, q_img, k_img, q_weight_img, k_weight_img, "_img")
    (bt, lt, ht, dt), (bi, li, hi, di) = q_txt.shape, q_img.shape
    if (bt, ht, dt) != (bi, hi, di) or q_txt.dtype != q_img.dtype or q_txt.device != q_img.device:
        fail(op, f"q_txt {shape(q_txt)} {q_txt.dtype} and q_img {shape(q_img)} {q_img.dtype} "
                 "must agree on B, H, D, dtype, device")  # fmt: skip
    _check_rope(op, q_txt, cos, sin, lt + li)


def launch_joint(
    q_txt, k_txt, q_img, k_img, q_weight_txt, k_weight_txt, q_weight_img, k_weight_img, cos, sin, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the Triton kernel on both streams into one output each. -> (q, k) [B, H, Lt + Li, D] views
    of new contiguous [B, Lt + Li, H, D]."""
    args = (q_txt, k_txt, q_img, k_img, q_weight_txt, k_weight_txt, q_weight_img, k_weight_img, cos, sin)
    _check_joint("joint_qk_norm_rope", *args)
    return _launch_joint(*args, eps)


def _launch_joint(q_txt, k_txt, q_img, k_img, q_weight_txt, k_weight_txt, q_weight_img, k_weight_img, cos, sin, eps):
    check_launchable("joint_qk_norm_rope", _qk_norm_rope_kernel, q_txt, k_txt=k_txt, q_img=q_img, k_img=k_img,
                     q_weight_txt=q_weight_txt, k_weight_txt=k_weight_txt,
                     q_weight_img=q_weight_img, k_weight_img=k_weight_img)  # fmt: skip
    lt = q_txt.shape[1]
    q_out, k_out = _outputs(q_txt, lt + q_img.shape[1])
    _launch_segment(q_txt, k_txt, q_weight_txt, k_weight_txt, cos, sin, eps, q_out, k_out, 0)
    _launch_segment(q_img, k_img, q_weight_img, k_weight_img, cos, sin, eps, q_out, k_out, lt)
    return q_out.transpose(1, 2), k_out.transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Public ops


@register("qk_norm_rope")
def _qk_norm_rope_op(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_pair("qk_norm_rope", q, k, q_weight, k_weight)
    _check_rope("qk_norm_rope", q, cos, sin, q.shape[1])
    if use_triton(q, _qk_norm_rope_kernel):
        return _launch(q, k, q_weight, k_weight, cos, sin, eps)
    return qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, eps)


@register("joint_qk_norm_rope")
def _joint_qk_norm_rope_op(
    q_txt: torch.Tensor,
    k_txt: torch.Tensor,
    q_img: torch.Tensor,
    k_img: torch.Tensor,
    q_weight_txt: torch.Tensor,
    k_weight_txt: torch.Tensor,
    q_weight_img: torch.Tensor,
    k_weight_img: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (q_txt, k_txt, q_img, k_img, q_weight_txt, k_weight_txt, q_weight_img, k_weight_img, cos, sin)
    _check_joint("joint_qk_norm_rope", *args)
    if use_triton(q_txt, _qk_norm_rope_kernel):
        return _launch_joint(*args, eps)
    return joint_qk_norm_rope_reference(*args, eps)


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm (weights [D], q.dtype) then RoPE of q and k [B, L, H, D] (last dim contiguous) with
    cos, sin [L, D/2] fp32. -> (q, k) [B, H, L, D], views of new contiguous [B, L, H, D] tensors.
    Triton on CUDA, reference elsewhere."""
    return _qk_norm_rope_op(q, k, q_weight, k_weight, cos, sin, eps)


def joint_qk_norm_rope(
    q_txt: torch.Tensor,
    k_txt: torch.Tensor,
    q_img: torch.Tensor,
    k_img: torch.Tensor,
    q_weight_txt: torch.Tensor,
    k_weight_txt: torch.Tensor,
    q_weight_img: torch.Tensor,
    k_weight_img: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """qk_norm_rope of a text stream [B, Lt, H, D] and an image stream [B, Li, H, D], each with its
    own norm weights, written into one (q, k) pair [B, H, Lt + Li, D] with the text first: no cat
    (views of new contiguous [B, Lt + Li, H, D] tensors, as qk_norm_rope's).
    cos, sin [Lt + Li, D/2] fp32 cover the joint sequence (text positions first)."""
    return _joint_qk_norm_rope_op(
        q_txt, k_txt, q_img, k_img, q_weight_txt, k_weight_txt, q_weight_img, k_weight_img, cos, sin, eps
    )


# ---------------------------------------------------------------------------------------------
# Benchmark: python -m dittune.kernels.qk_norm_rope


def benchmark() -> None:
    dev, dt, d = "cuda", torch.bfloat16, 128
    cases = [("flux 1024^2", 1, 24, 512, 4096), ("qwen-image 1328^2 cfg", 2, 24, 64, 6889),
             ("z-image 1024^2", 1, 30, 128, 4096)]  # fmt: skip
    for name, b, h, lt, li in cases:
        l = lt + li
        qkv = torch.randn(b, l, 3, h, d, device=dev, dtype=dt)  # packed projection output
        q, k = qkv[:, :, 0], qkv[:, :, 1]
        wq, wk = torch.randn(2, d, device=dev, dtype=dt).unbind(0)
        ang = torch.rand(l, d // 2, device=dev) * 100
        cos, sin = ang.cos(), ang.sin()
        nbytes = 4 * q.numel() * q.element_size()
        bench(f"qk_norm_rope {name} [{b}, {l}, {h}, {d}]", nbytes,
              reference=lambda: qk_norm_rope_reference(q, k, wq, wk, cos, sin),
              triton=lambda: launch(q, k, wq, wk, cos, sin),
              op=lambda: qk_norm_rope(q, k, wq, wk, cos, sin))  # fmt: skip
        table = torch.stack((cos, sin), dim=-1)  # [L, D/2, 2]: Z-Image's refiners pass views of it (stride 2)
        ci, si = table.unbind(-1)
        bench(f"qk_norm_rope {name}, cos/sin interleaved", nbytes,
              reference=lambda: qk_norm_rope_reference(q, k, wq, wk, ci, si),
              triton=lambda: launch(q, k, wq, wk, ci, si))  # fmt: skip
        jt, ji = (qkv[:, :lt, 0], qkv[:, :lt, 1]), (qkv[:, lt:, 0], qkv[:, lt:, 1])
        bench(f"joint_qk_norm_rope {name}", nbytes,
              reference=lambda: joint_qk_norm_rope_reference(*jt, *ji, wq, wk, wk, wq, cos, sin),
              triton=lambda: launch_joint(*jt, *ji, wq, wk, wk, wq, cos, sin),
              op=lambda: joint_qk_norm_rope(*jt, *ji, wq, wk, wk, wq, cos, sin))  # fmt: skip


if __name__ == "__main__":
    benchmark()
