"""linear_gelu / linear_concat (cuBLASLt epilogues): the CUDA path's arithmetic (run on the CPU
by forcing it) and the custom ops vs the torch references, the references vs the models' own
code, input checks, GPU full shapes in fp32/bf16/fp16."""

import pytest
import torch
from kernelcheck import assert_close

from dittune.engine.models import flux, qwen_image
from dittune.kernels import epilogue
from dittune.kernels.epilogue import linear_concat, linear_concat_reference, linear_gelu, linear_gelu_reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _gelu_inputs(l, k, n, dtype, device="cpu"):
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(1, l, k, generator=g, device=device).to(dtype)
    w = (torch.randn(n, k, generator=g, device=device) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g, device=device).to(dtype)
    return x, w, b


def _concat_inputs(l, ka, kb, n, dtype, device="cpu"):
    g = torch.Generator(device).manual_seed(1)
    a = torch.randn(1, l, ka, generator=g, device=device).to(dtype)
    m = torch.randn(1, l, kb, generator=g, device=device).to(dtype)
    w = (torch.randn(n, ka + kb, generator=g, device=device) / (ka + kb) ** 0.5).to(dtype)
    b = torch.randn(n, generator=g, device=device).to(dtype)
    return a, m, w, b


def test_references_are_the_models_code():
    x, w, b = _gelu_inputs(5, 24, 40, torch.float32)
    for fn in (flux.linear_gelu, qwen_image.linear_gelu):
        assert torch.equal(fn(x, w, b), linear_gelu_reference(x, w, b))
    a, m, w, b = _concat_inputs(5, 24, 40, 16, torch.float32)
    assert torch.equal(flux.linear_concat(a, m, w, b), linear_concat_reference(a, m, w, b))


def test_cuda_arithmetic_on_cpu(monkeypatch):
    """The fast path (GELU epilogue via _addmm_activation; the split, accumulating GEMMs on strided
    weight slices) forced on the CPU, in fp32."""
    monkeypatch.setattr(epilogue, "_fast", lambda x: True)
    # The CPU's _addmm_activation applies the exact (erf) GELU where CUDA's epilogue applies the
    # tanh form (checked by test_cuda_full_shapes): here it checks the GEMM plumbing.
    x, w, b = _gelu_inputs(37, 48, 80, torch.float32)
    exact = lambda x: torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b))  # noqa: E731
    torch.testing.assert_close(linear_gelu(x, w, b), exact(x), rtol=1e-5, atol=1e-5)
    x_strided = torch.randn(1, 80, 37).transpose(1, 2)[..., :48]  # non-contiguous input
    torch.testing.assert_close(linear_gelu(x_strided, w, b), exact(x_strided), rtol=1e-5, atol=1e-5)
    a, m, w, b = _concat_inputs(37, 24, 96, 40, torch.float32)
    torch.testing.assert_close(linear_concat(a, m, w, b), linear_concat_reference(a, m, w, b), rtol=1e-5, atol=1e-5)


def test_custom_ops_trace_as_one_node():
    x, w, b = _gelu_inputs(7, 16, 32, torch.float32)
    a, m, wc, bc = _concat_inputs(7, 16, 32, 8, torch.float32)

    def f(x, a, m):
        return linear_gelu(x, w, b).sum() + linear_concat(a, m, wc, bc).sum()

    graphs = []

    def backend(gm, _):
        graphs.append(gm)
        return gm

    out = torch.compile(f, backend=backend, fullgraph=True)(x, a, m)
    torch.testing.assert_close(out, f(x, a, m))
    targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert any("linear_gelu" in t for t in targets) and any("linear_concat" in t for t in targets)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: linear_gelu(torch.ones(2, 3), torch.ones(4, 5), torch.ones(4)), "3 features, the weight takes 5"),
        (lambda: linear_gelu(torch.ones(2, 5), torch.ones(4, 5), torch.ones(3)), r"bias \[N\] expected"),
        (lambda: linear_gelu(torch.ones(2, 5), torch.ones(4, 5, dtype=torch.float16), torch.ones(4)), "dtypes differ"),
        (lambda: linear_concat(torch.ones(2, 3), torch.ones(2, 4), torch.ones(6, 8), torch.ones(6)), "3 features, the weight takes 4"),
        (lambda: linear_concat(torch.ones(2, 3), torch.ones(3, 5), torch.ones(6, 8), torch.ones(6)), "parts differ"),
    ],
)
def test_readable_refusals(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_full_shapes(dtype):
    # fp32: both sides accumulate 3072-15360 products in fp32, in different orders (5.6e-6 apart
    # at values ~5, measured); bf16/fp16: the outputs round alike within 2 units.
    ulps = 64 if dtype == torch.float32 else 2
    for l in (4608, 4096, 512, 128):  # FLUX joint / image / text tokens; Qwen-Image text
        x, w, b = _gelu_inputs(l, 3072, 12288, dtype, "cuda")
        assert_close(linear_gelu(x, w, b), linear_gelu_reference(x, w, b), ulps)
    a, m, w, b = _concat_inputs(4608, 3072, 12288, 3072, dtype, "cuda")
    assert_close(linear_concat(a, m, w, b), linear_concat_reference(a, m, w, b), ulps)
