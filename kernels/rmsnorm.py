"""RMSNorm over the last dim with a weight: x * rsqrt(mean(x^2) + eps) * weight, stats in fp32.

x [..., C] with any leading dims; the last dim must be contiguous, the leading dims may be strided
(e.g. the [B, L, H, D] view of one of Q/K/V in a packed projection output) as long as they fold
into at most three (size, stride) pairs. The output is a new contiguous tensor in x.dtype.
"""

import torch
import torch.nn.functional as F

from ._common import (
    bench,
    check_dtype,
    check_launchable,
    check_weight,
    fail,
    register,
    row_config,
    shape,
    tl,
    tracing,
    triton,
    use_triton,
    wrap_triton,
)

# ---------------------------------------------------------------------------------------------
# Torch reference (also the fallback)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """F.rms_norm over the last dim, as the models call it: normalised in fp32, rounded, then * weight."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


# ---------------------------------------------------------------------------------------------
# Triton kernel


@triton.jit
def _rms_norm_kernel(
    X,  # [N0, N1, N2, C] through strides; last dim contiguous
    W,  # [C]
    OUT,  # [N0 * N1 * N2, C] contiguous
    n_rows,
    N1,
    N2,
    stride_0,
    stride_1,
    stride_2,
    C,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs = (rows // (N1 * N2)) * stride_0 + ((rows // N2) % N1) * stride_1 + (rows % N2) * stride_2
    rows, offs = rows[:, None], offs[:, None]
    cols = tl.arange(0, BLOCK_C)[None, :]
    mask = (rows < n_rows) & (cols < C)

    x = tl.load(X + offs + cols, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, axis=1) / C + eps)[:, None]
    y = y * tl.load(W + cols, mask=cols < C, other=0.0).to(tl.float32)
    tl.store(OUT + rows * C + cols, y.to(OUT.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launcher


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() < 1:
        fail("rms_norm", "x must have at least one dim")
    check_dtype("rms_norm", x, weight=weight)
    check_weight("rms_norm", "weight", weight, x.shape[-1])


def _leading_dims(x: torch.Tensor) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Fold the leading dims of x into three (size, stride) pairs, outermost first."""
    dims = [(s, st) for s, st in zip(x.shape[:-1], x.stride()[:-1]) if s != 1]
    folded: list[tuple[int, int]] = []
    for size, stride in dims:
        if folded and folded[-1][1] == size * stride:  # the previous dim steps over exactly this one
            folded[-1] = (folded[-1][0] * size, stride)
        else:
            folded.append((size, stride))
    if len(folded) > 3:
        fail("rms_norm", f"x {shape(x)} with strides {tuple(x.stride())} has more than 3 non-foldable "
                         "leading dims; make it contiguous first")  # fmt: skip
    folded = [(1, 0)] * (3 - len(folded)) + folded
    return tuple(s for s, _ in folded), tuple(st for _, st in folded)


def launch(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Run the Triton kernel. -> contiguous tensor of x's shape and dtype."""
    _check(x, weight)
    return _launch(x, weight, eps)


def _launch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    check_launchable("rms_norm", _rms_norm_kernel, x, weight=weight)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    (_, n1, n2), strides = _leading_dims(x)
    c = x.shape[-1]
    n_rows = x.numel() // c
    block_m, block_c, num_warps = row_config(c)
    kernel = wrap_triton(_rms_norm_kernel) if tracing(x) else _rms_norm_kernel
    kernel[(triton.cdiv(n_rows, block_m),)](
        x, weight, out, n_rows, n1, n2, *strides, c, eps, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps
    )
    return out


# ---------------------------------------------------------------------------------------------
# Public op


@register("rms_norm")
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check(x, weight)
    if use_triton(x, _rms_norm_kernel):
        return _launch(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim (stats in fp32) times weight [C] (x.dtype). x [..., C], last dim
    contiguous. Triton on CUDA (a new contiguous tensor), the torch reference elsewhere."""
    return _rms_norm_op(x, weight, eps)


# ---------------------------------------------------------------------------------------------
# Benchmark: python -m dittune.kernels.rmsnorm


def benchmark() -> None:
    dev, dt = "cuda", torch.bfloat16
    cases = [
        ("z-image block norm [1, 4224, 3840]", torch.randn(1, 4096 + 128, 3840, device=dev, dtype=dt)),
        ("qwen-image text norm [1, 512, 3584]", torch.randn(1, 512, 3584, device=dev, dtype=dt)),
        ("flux q of packed qkv [1, 4608, 24, 128]",
         torch.randn(1, 4608, 3, 24, 128, device=dev, dtype=dt)[:, :, 0]),
    ]  # fmt: skip
    for name, x in cases:
        w = torch.randn(x.shape[-1], device=dev, dtype=dt)
        bench(f"rms_norm {name}", 2 * x.numel() * x.element_size(), reference=lambda: rms_norm_reference(x, w),
              triton=lambda: launch(x, w), op=lambda: rms_norm(x, w))  # fmt: skip


if __name__ == "__main__":
    benchmark()
