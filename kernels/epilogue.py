"""GEMM epilogues from cuBLASLt, instead of a separate elementwise pass over a GEMM's output.

    linear_gelu(x, weight, bias)            = gelu_tanh(x @ weight.T + bias)       FLUX and Qwen-Image MLPs
    linear_concat(a, b, weight, bias)       = cat([a, b], -1) @ weight.T + bias    FLUX single blocks

linear_gelu runs one cuBLASLt GEMM with its GELU epilogue (tanh approximation, applied to the
fp32 accumulator before the bf16 rounding: no write and re-read of the [L, 4 D] pre-activation).
linear_concat multiplies each part by its slice of the weight and accumulates the second GEMM
into the first one's output (beta = 1): the concatenated [L, D + M] input is never built.

These are not Triton kernels: cuBLAS already does the work, the ops only avoid the passes around
it. Like the Triton ops, each is a custom op `dittune::<name>` (one opaque node under
torch.compile, so Inductor does not split the epilogue back out) with its torch reference as the
fallback off CUDA. x, a, b: [..., K]; weight [N, K] (linear_concat: [N, Ka + Kb]); bias [N].
"""

import torch
import torch.nn.functional as F

from ._common import fail

# ---------------------------------------------------------------------------------------------
# Torch references (also the fallbacks)


def linear_gelu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def linear_concat_reference(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.linear(torch.cat([a, b], dim=-1), weight, bias)


# ---------------------------------------------------------------------------------------------
# cuBLASLt paths


def _check(name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int) -> None:
    if weight.dim() != 2 or bias is None or bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
        fail(name, f"weight [N, K] and bias [N] expected, got {tuple(weight.shape)} and "
                   f"{None if bias is None else tuple(bias.shape)}")  # fmt: skip
    if x.shape[-1] != k:
        fail(name, f"input has {x.shape[-1]} features, the weight takes {k}")
    if not (x.dtype == weight.dtype == bias.dtype):
        fail(name, f"dtypes differ: input {x.dtype}, weight {weight.dtype}, bias {bias.dtype}")


def _fast(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" and x.numel() > 0


def _linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    _check("linear_gelu", x, weight, bias, weight.shape[1])
    if not _fast(x):
        return linear_gelu_reference(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    return torch._addmm_activation(bias, x2, weight.t(), use_gelu=True).view(*x.shape[:-1], weight.shape[0])


def _linear_concat(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    ka = a.shape[-1]
    _check("linear_concat", a, weight, bias, weight.shape[1] - b.shape[-1])
    if a.shape[:-1] != b.shape[:-1] or a.dtype != b.dtype:
        fail("linear_concat", f"parts differ: {tuple(a.shape)} {a.dtype} and {tuple(b.shape)} {b.dtype}")
    if not _fast(a):
        return linear_concat_reference(a, b, weight, bias)
    a2, b2 = a.reshape(-1, ka), b.reshape(-1, b.shape[-1])
    out = torch.addmm(bias, a2, weight[:, :ka].t())  # weight slices are strided views: no copy
    out.addmm_(b2, weight[:, ka:].t())  # beta = 1: accumulates into out
    return out.view(*a.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile; eager calls skip the dispatcher


@torch.library.custom_op("dittune::linear_gelu", mutates_args=())
def _linear_gelu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _linear_gelu(x, weight, bias)


@_linear_gelu_op.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("dittune::linear_concat", mutates_args=())
def _linear_concat_op(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _linear_concat(a, b, weight, bias)


@_linear_concat_op.register_fake
def _(a, b, weight, bias):
    return a.new_empty(*a.shape[:-1], weight.shape[0])


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x @ weight.T + bias), the GELU in cuBLASLt's epilogue. [..., K] -> [..., N]"""
    if torch.compiler.is_compiling():
        return _linear_gelu_op(x, weight, bias)
    return _linear_gelu(x, weight, bias)


def linear_concat(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """cat([a, b], -1) @ weight.T + bias without building the concatenation. [..., Ka], [..., Kb] -> [..., N]"""
    if torch.compiler.is_compiling():
        return _linear_concat_op(a, b, weight, bias)
    return _linear_concat(a, b, weight, bias)


if __name__ == "__main__":  # kernel vs reference at FLUX / Qwen-Image shapes (CUDA)
    from ._common import bench

    dev, dt = "cuda", torch.bfloat16
    for label, l, k, n in (("FLUX single mlp_in 4608x3072->12288", 4608, 3072, 12288),
                           ("FLUX double img mlp_in 4096x3072->12288", 4096, 3072, 12288),
                           ("Qwen-Image img fc1 4096x3072->12288", 4096, 3072, 12288)):  # fmt: skip
        x = torch.randn(1, l, k, device=dev, dtype=dt)
        w = torch.randn(n, k, device=dev, dtype=dt) / k**0.5
        bb = torch.randn(n, device=dev, dtype=dt)
        bench("linear_gelu " + label, 2 * (l * k + n * k + l * n), lambda: linear_gelu_reference(x, w, bb),
              lambda: _linear_gelu(x, w, bb), lambda: linear_gelu(x, w, bb))
    a = torch.randn(1, 4608, 3072, device=dev, dtype=dt)
    m = torch.randn(1, 4608, 12288, device=dev, dtype=dt)
    w = torch.randn(3072, 15360, device=dev, dtype=dt) / 15360**0.5
    bb = torch.randn(3072, device=dev, dtype=dt)
    bench("linear_concat FLUX proj_out [4608, 3072+12288]->3072", 2 * (4608 * 15360 + 15360 * 3072 + 4608 * 3072),
          lambda: linear_concat_reference(a, m, w, bb), lambda: _linear_concat(a, m, w, bb), lambda: linear_concat(a, m, w, bb))
