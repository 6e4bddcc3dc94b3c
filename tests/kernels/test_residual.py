"""gated_residual / gated_residual_modulate / gated_norm_residual: Triton (interpreted) vs the torch
reference, the references vs the models' own code (bit for bit), input checks, GPU full shapes."""

import functools

import pytest
import torch
from kernelcheck import assert_close, rand, run_interpreted

from dittune.kernels.residual import (
    gated_norm_residual,
    gated_norm_residual_reference,
    gated_residual,
    gated_residual_modulate,
    gated_residual_modulate_reference,
    gated_residual_reference,
    launch,
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _inputs(b, l, c, dtype, layout, device="cpu", **_):
    """x, y [B, L, C]; gate, shift, scale laid out as "chunk" ([B, C] slices of a [B, 6C]
    modulation output), "b1c" ([B, 1, C]) or "per_token" ([B, L, C]); RMSNorm weight [C]."""
    torch.manual_seed(0)
    x, y = rand(2, b, l, c, dtype=dtype, device=device, scale=2).unbind(0)
    if layout == "chunk":
        mod = rand(b, 6 * c, dtype=dtype, device=device, scale=0.5)
        gate, shift, scale = mod[:, 2 * c : 3 * c], mod[:, 3 * c : 4 * c], mod[:, 4 * c : 5 * c]
    else:
        gate, shift, scale = rand(3, b, 1 if layout == "b1c" else l, c, dtype=dtype, device=device, scale=0.5).unbind(0)
    w = rand(c, dtype=dtype, device=device, scale=0.2, offset=1)
    return x, y, gate, shift, scale, w


CASES = {
    "residual-flux-width-bf16-chunk": dict(op="residual", b=2, l=3, c=3072, dtype=torch.bfloat16, layout="chunk"),
    "residual-fp32-per-token": dict(op="residual", b=2, l=37, c=40, dtype=torch.float32, layout="per_token"),
    "residual-fp16-b1c": dict(op="residual", b=2, l=3, c=3072, dtype=torch.float16, layout="b1c"),
    "modulate-flux-width-bf16-chunk": dict(op="modulate", b=2, l=3, c=3072, dtype=torch.bfloat16, layout="chunk"),
    "modulate-fp32-per-token": dict(op="modulate", b=2, l=37, c=40, dtype=torch.float32, layout="per_token"),
    "modulate-no-shift-fp16": dict(op="modulate", b=1, l=3, c=3072, dtype=torch.float16, layout="b1c", shift=False),
    "norm-zimage-width-bf16": dict(op="norm", b=2, l=3, c=3840, dtype=torch.bfloat16, layout="b1c"),
    "norm-zimage-width-fp32": dict(op="norm", b=1, l=3, c=3840, dtype=torch.float32, layout="b1c"),
    "norm-no-gate-fp16": dict(op="norm", b=2, l=5, c=96, dtype=torch.float16, layout="b1c", gate=False),
}


def _check_triton(op, shift=True, gate=True, **case):
    x, y, g, sh, sc, w = _inputs(**case)
    sh, g = (sh if shift else None), (g if gate else None)
    if op == "residual":
        out, ref, direct = gated_residual(x, g, y), gated_residual_reference(x, g, y), launch(x, g, y)
    elif op == "modulate":
        out = gated_residual_modulate(x, g, y, sh, sc)
        ref = gated_residual_modulate_reference(x, g, y, sh, sc)
        direct = launch(x, g, y, shift=sh, scale=sc)
        assert torch.equal(out[1], direct[1]) and out[1].is_contiguous()
        assert_close(out[1], ref[1])
        out, ref, direct = out[0], ref[0], direct
    else:
        out, ref = gated_norm_residual(x, g, y, w, 1e-5), gated_norm_residual_reference(x, g, y, w, 1e-5)
        direct = launch(x, g, y, weight=w, eps=1e-5)
    assert torch.equal(out, direct[0]) and out.is_contiguous()
    assert_close(out, ref)


def interpreted_cases():
    return {name: functools.partial(_check_triton, **case) for name, case in CASES.items()}


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference(interpreted, case):
    assert interpreted[case] is None, interpreted[case]


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_the_models_op_sequence(dtype):
    from dittune.engine.models import flux, qwen_image, zimage

    x, y, gate, shift, scale, w = _inputs(2, 5, 48, dtype, "chunk")
    g, sh, sc = gate[:, None], shift[:, None], scale[:, None]
    assert torch.equal(gated_residual_reference(x, gate, y), flux.gated_residual(x, g, y))
    assert torch.equal(gated_residual_reference(x, g, y), qwen_image.gated_residual(x, g, y))
    r, h = gated_residual_modulate_reference(x, gate, y, shift, scale)
    assert torch.equal(r, flux.gated_residual(x, g, y)) and torch.equal(h, flux.modulate(r, sh, sc))
    for fused in (flux.gated_residual_modulate(x, g, y, sh, sc, 1e-6), qwen_image.gated_residual_modulate(x, g, y, sh, sc, 1e-6)):
        assert torch.equal(fused[0], r) and torch.equal(fused[1], h)
    for g in (gate[:, None].tanh(), None):
        ref = gated_norm_residual_reference(x, g, y, w, 1e-5)
        assert torch.equal(ref, zimage.gated_norm_residual(x, g, y, w, 1e-5))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x, y, g, w: gated_residual(x, g, y[:, :-1]), r"y \[2, 2, 40\] must have the shape of x"),
        (lambda x, y, g, w: gated_residual(x, g.T, y), "gate must be"),
        (lambda x, y, g, w: gated_norm_residual(x, g, y, w[:-1]), r"weight must be \[40\]"),
        (lambda x, y, g, w: gated_norm_residual(x, g, y, w.half()), "weight has dtype torch.float16"),
    ],
)
def test_readable_refusals(call, match):
    x, y, gate, _, _, w = _inputs(2, 3, 40, torch.float32, "chunk")
    with pytest.raises(ValueError, match=match):
        call(x, y, gate, w)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["chunk", "per_token"])
def test_cuda_full_shapes(dtype, layout):
    x, y, gate, shift, scale, w = _inputs(1, 4096 + 512, 3072, dtype, layout, device="cuda")
    assert_close(gated_residual(x, gate, y), gated_residual_reference(x, gate, y))
    out = gated_residual_modulate(x, gate, y, shift, scale)
    ref = gated_residual_modulate_reference(x, gate, y, shift, scale)
    assert_close(out[0], ref[0])
    assert_close(out[1], ref[1])
    x, y, gate, _, _, w = _inputs(1, 4096 + 128, 3840, dtype, layout, device="cuda")
    assert_close(gated_norm_residual(x, gate, y, w, 1e-5), gated_norm_residual_reference(x, gate, y, w, 1e-5))
