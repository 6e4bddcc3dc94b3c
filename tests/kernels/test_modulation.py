"""modulate / rms_norm_modulate: the Triton kernel (interpreted) against the torch reference, the
reference against the models' own code (bit for bit), input checks, and full shapes on the GPU."""

import functools

import pytest
import torch
import torch.nn.functional as F
from kernelcheck import assert_close, rand, run_interpreted

from dittune.kernels import triton_available
from dittune.kernels.modulation import (
    launch,
    modulate,
    modulate_reference,
    rms_norm_modulate,
    rms_norm_modulate_reference,
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _inputs(b, l, c, dtype, layout, shift=True, rms=False, weight=True, strided_x=False, device="cpu"):
    """layout of shift/scale: "chunk" [B, C] slices of a [B, 3C] modulation output (strided batch),
    "b1c" [B, 1, C], "per_token" [B, L, C]."""
    torch.manual_seed(0)
    x = rand(b, l + 2 * strided_x, c, dtype=dtype, device=device, scale=3, offset=1)[:, 2 * strided_x :]
    if layout == "chunk":
        mod = rand(b, 3 * c, dtype=dtype, device=device, scale=0.5)
        sh, sc = mod[:, :c], mod[:, 2 * c :]
    else:
        sh, sc = rand(2, b, 1 if layout == "b1c" else l, c, dtype=dtype, device=device, scale=0.5).unbind(0)
    w = rand(c, dtype=dtype, device=device, scale=0.2, offset=1) if rms and weight else None
    return x, w, (sh if shift else None), sc


CASES = {
    "flux-width-bf16-per-sample-chunks": dict(b=2, l=3, c=3072, dtype=torch.bfloat16, layout="chunk"),
    "flux-width-fp32-per-token": dict(b=2, l=3, c=3072, dtype=torch.float32, layout="per_token"),
    "qwen-width-fp16-b1c": dict(b=2, l=3, c=3072, dtype=torch.float16, layout="b1c"),
    "zimage-final-no-shift-fp32": dict(b=1, l=4, c=3840, dtype=torch.float32, layout="b1c", shift=False),
    # C=40: 32 rows per program, 37 tokens is not a multiple; columns padded to 64
    "narrow-rows-fp32": dict(b=2, l=37, c=40, dtype=torch.float32, layout="per_token"),
    "strided-x-bf16": dict(b=2, l=5, c=96, dtype=torch.bfloat16, layout="chunk", strided_x=True),
    "rms-zimage-width-bf16": dict(b=2, l=3, c=3840, dtype=torch.bfloat16, layout="b1c", rms=True),
    "rms-zimage-width-fp32": dict(b=1, l=3, c=3840, dtype=torch.float32, layout="chunk", rms=True),
    "rms-no-weight-fp16-per-token": dict(
        b=2, l=5, c=64, dtype=torch.float16, layout="per_token", rms=True, weight=False
    ),
}


def _check_triton(rms=False, **case):
    x, w, shift, scale = _inputs(rms=rms, **case)
    if rms:
        out, ref = rms_norm_modulate(x, w, scale, 1e-5), rms_norm_modulate_reference(x, w, scale, 1e-5)
        direct = launch(x, w, None, scale, 1e-5, rms=True)
    else:
        out, ref = modulate(x, shift, scale), modulate_reference(x, shift, scale)
        direct = launch(x, None, shift, scale, 1e-6, rms=False)
    assert torch.equal(out, direct) and out.is_contiguous()
    assert_close(out, ref)


def _check_rejects_strided_last_dim():
    x = torch.randn(2, 3, 16).transpose(1, 2)  # [2, 16, 3], last dim strided
    with pytest.raises(ValueError, match="last dim must be contiguous"):
        launch(x, None, None, torch.randn(2, 3), 1e-6, rms=False)


def interpreted_cases():
    cases = {name: functools.partial(_check_triton, **case) for name, case in CASES.items()}
    return {**cases, "rejects-strided-last-dim": _check_rejects_strided_last_dim}


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", [*CASES, "rejects-strided-last-dim"])
def test_triton_matches_reference(interpreted, case):
    assert interpreted[case] is None, interpreted[case]


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_the_models_op_sequence(dtype):
    from dittune.engine.models import flux, qwen_image, zimage

    x, w, shift, scale = _inputs(2, 5, 48, dtype, "chunk", rms=True)
    sh, sc = shift[:, None], scale[:, None]
    assert torch.equal(modulate_reference(x, shift, scale), flux.modulate(x, sh, sc))
    assert torch.equal(modulate_reference(x, sh, sc), qwen_image.modulate(x, sh, sc, 1e-6))
    assert torch.equal(rms_norm_modulate_reference(x, w, sc, 1e-5), zimage.rms_norm_modulate(x, w, sc, 1e-5))
    final = zimage.FinalLayer(zimage.ZImageConfig(dim=48, n_heads=2, axes_dims=(8, 8, 8))).to(dtype)
    c = rand(2, 48, dtype=dtype)
    s = final.adaLN_modulation(F.silu(c))
    assert torch.equal(final.linear(modulate_reference(x, None, s)), final(x, c))


def test_public_op_runs_the_reference_off_cuda():
    if triton_available("cpu"):
        pytest.skip("this process interprets the kernels")
    x, _, shift, scale = _inputs(2, 3, 40, torch.float32, "chunk")
    assert torch.equal(modulate(x, shift, scale), modulate_reference(x, shift, scale))
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        launch(x, None, shift, scale, 1e-6, rms=False)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda x, sh, sc: (x.long(), sh, sc), "x has dtype torch.int64"),
        (lambda x, sh, sc: (x, sh.half(), sc), "shift has dtype torch.float16 but x has torch.float32"),
        (lambda x, sh, sc: (x, sh, sc[:, :-1]), r"scale must be \[B, C\], \[B, 1, C\] or \[B, L, C\]"),
        (lambda x, sh, sc: (x[0], sh, sc), r"x must be \[B, L, C\]"),
    ],
)
def test_readable_refusals(mutate, match):
    x, _, shift, scale = _inputs(2, 3, 40, torch.float32, "chunk")
    with pytest.raises(ValueError, match=match):
        modulate(*mutate(x, shift, scale))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["chunk", "per_token"])
def test_cuda_flux_and_zimage_shapes(dtype, layout):
    b, l = 1, 4096 + 512
    x, _, shift, scale = _inputs(b, l, 3072, dtype, layout, device="cuda")
    assert_close(modulate(x, shift, scale), modulate_reference(x, shift, scale))
    x, w, _, scale = _inputs(b, 4096 + 128, 3840, dtype, layout, rms=True, device="cuda")
    assert_close(rms_norm_modulate(x, w, scale, 1e-5), rms_norm_modulate_reference(x, w, scale, 1e-5))
