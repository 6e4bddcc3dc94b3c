"""qk_norm_rope / joint_qk_norm_rope: Triton (interpreted) vs the torch reference on the layouts
the models produce, the reference vs each model's own QK-norm + RoPE, input checks, GPU shapes."""

import functools

import pytest
import torch
from kernelcheck import assert_close, rand, run_interpreted

from dittune.kernels.qk_norm_rope import (
    joint_qk_norm_rope,
    joint_qk_norm_rope_reference,
    launch,
    launch_joint,
    qk_norm_rope,
    qk_norm_rope_reference,
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _qk(b, l, h, d, dtype, layout="packed", device="cpu"):
    """q, k [B, L, H, D] views as the models make them:
    "packed": qkv.unflatten(-1, (3, H, D))[:, :, i] of one [B, L, 3HD] projection (Qwen-Image, Z-Image);
    "flux-single": [B, H, L, D] views of a wider [B, L, 3HD + M] projection, transposed back."""
    if layout == "packed":
        qkv = rand(b, l, 3 * h * d, dtype=dtype, device=device, scale=2).unflatten(-1, (3, h, d))
        return qkv[:, :, 0], qkv[:, :, 1]
    proj = rand(b, l, 3 * h * d + 4 * d, dtype=dtype, device=device, scale=2)[..., : 3 * h * d]
    q, k, _ = proj.unflatten(-1, (3, h, d)).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, L, D] each
    return q.transpose(1, 2), k.transpose(1, 2)


def _rope(l, d, device="cpu", interleaved_table=False):
    """cos, sin [L, D/2] fp32; from a [L, D/2, 2] (cos, sin) table like Z-Image's when asked (strided)."""
    ang = torch.rand(l, d // 2, dtype=torch.float64, device=device) * 200
    table = torch.stack([ang.cos(), ang.sin()], dim=-1).float()
    if interleaved_table:
        return table[..., 0], table[..., 1]
    return table[..., 0].contiguous(), table[..., 1].contiguous()


def _weights(d, dtype, n=2, device="cpu"):
    return rand(n, d, dtype=dtype, device=device, scale=0.2, offset=1).unbind(0)


CASES = {
    "packed-bf16": dict(b=2, l=5, h=3, d=128, dtype=torch.bfloat16),
    "packed-fp32": dict(b=2, l=5, h=3, d=128, dtype=torch.float32),
    "packed-fp16": dict(b=1, l=37, h=2, d=128, dtype=torch.float16),  # 32 tokens per program: a ragged block
    "flux-single-view-bf16": dict(b=2, l=5, h=3, d=128, dtype=torch.bfloat16, layout="flux-single"),
    "zimage-strided-table-fp32": dict(b=1, l=6, h=2, d=128, dtype=torch.float32, interleaved_table=True),
    "tiny-head-dim-fp32": dict(b=2, l=7, h=2, d=16, dtype=torch.float32),
    "odd-pairs-d24-fp32": dict(b=1, l=3, h=2, d=24, dtype=torch.float32),  # D not a power of 2
    # heads share a program 8 at a time: 11 heads are a full group and a ragged one, per sample
    "ragged-head-groups-fp32": dict(b=2, l=9, h=11, d=32, dtype=torch.float32),
    "ragged-head-groups-joint-bf16": dict(b=2, l=6, h=11, d=32, dtype=torch.bfloat16, joint=2),
    "joint-bf16": dict(b=2, l=5, h=3, d=128, dtype=torch.bfloat16, joint=3),
    "joint-fp32": dict(b=1, l=40, h=2, d=128, dtype=torch.float32, joint=7),
}


def _check_triton(b, l, h, d, dtype, layout="packed", interleaved_table=False, joint=0):
    torch.manual_seed(0)
    q, k = _qk(b, l, h, d, dtype, layout)
    cos, sin = _rope(l, d, interleaved_table=interleaved_table)
    if joint:
        w = _weights(d, dtype, n=4)
        args = (q[:, :joint], k[:, :joint], q[:, joint:], k[:, joint:], *w, cos, sin)
        out, ref, direct = joint_qk_norm_rope(*args), joint_qk_norm_rope_reference(*args), launch_joint(*args)
    else:
        args = (q, k, *_weights(d, dtype), cos, sin)
        out, ref, direct = qk_norm_rope(*args), qk_norm_rope_reference(*args), launch(*args)
    for o, r, t in zip(out, ref, direct):
        assert o.shape == r.shape == (b, h, l, d) and torch.equal(o, t)
        for x in (o, r, t):  # [B, H, L, D] views of contiguous [B, L, H, D]: attention's layout
            assert_attention_layout(x)
        assert_close(o, r)


def assert_attention_layout(x: torch.Tensor) -> None:
    """x [B, H, L, D] is the transpose of a contiguous [B, L, H, D] (not itself contiguous)."""
    assert x.transpose(1, 2).is_contiguous() and not x.is_contiguous(), tuple(x.stride())


def interpreted_cases():
    return {name: functools.partial(_check_triton, **case) for name, case in CASES.items()}


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference(interpreted, case):
    assert interpreted[case] is None, interpreted[case]


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_each_models_qk_norm_rope_bit_for_bit(dtype):
    from dittune.engine.models import flux, qwen_image, zimage

    torch.manual_seed(0)
    lt = 2
    q, k = _qk(2, 6, 3, 32, dtype)
    cos, sin = _rope(6, 32)
    w = _weights(32, dtype, n=4)
    single = qk_norm_rope_reference(q, k, *w[:2], cos, sin, 1e-6)
    for ours, theirs in zip(single, flux.qk_norm_rope(q, k, *w[:2], cos, sin, 1e-6)):
        assert torch.equal(ours, theirs), "flux single stream"
        assert_attention_layout(ours)
        assert_attention_layout(theirs)
    joint_args = (q[:, :lt], k[:, :lt], q[:, lt:], k[:, lt:], *w, cos, sin, 1e-6)
    joint = joint_qk_norm_rope_reference(*joint_args)
    for model in (flux, qwen_image):
        for ours, theirs in zip(joint, model.joint_qk_norm_rope(*joint_args)):
            assert torch.equal(ours, theirs), model.__name__
            assert_attention_layout(ours)
            assert_attention_layout(theirs)
    freqs = torch.stack([cos, sin], dim=-1)  # [L, D/2, 2], Z-Image's table
    assert torch.equal(single[0], zimage.norm_rope(q, w[0], freqs, 1e-6)), "zimage"
    for ours, theirs in zip(single, zimage.qk_norm_rope(q, k, *w[:2], cos, sin, 1e-6)):
        assert torch.equal(ours, theirs), "zimage pair"
        assert_attention_layout(theirs)


def test_readable_refusals():
    q, k = _qk(1, 4, 2, 16, torch.float32)
    cos, sin = _rope(4, 16)
    w = torch.ones(16)
    with pytest.raises(ValueError, match=r"cos must be \[L, D/2\] = \[4, 8\]"):
        qk_norm_rope(q, k, w, w, cos[:3], sin)
    with pytest.raises(ValueError, match="sin must be float32"):
        qk_norm_rope(q, k, w, w, cos, sin.half())
    with pytest.raises(ValueError, match=r"q_weight must be \[16\]"):
        qk_norm_rope(q, k, torch.ones(8), w, cos, sin)
    with pytest.raises(ValueError, match="must agree on B, H, D"):
        joint_qk_norm_rope(q, k, q[:, :, :1], k[:, :, :1], w, w, w, w, torch.cat([cos, cos]), torch.cat([sin, sin]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_flux_shapes(dtype):
    b, lt, li, h, d = 1, 512, 4096, 24, 128
    q, k = _qk(b, lt + li, h, d, dtype, "flux-single", device="cuda")
    cos, sin = _rope(lt + li, d, device="cuda")
    w = _weights(d, dtype, n=4, device="cuda")
    for o, r in zip(qk_norm_rope(q, k, *w[:2], cos, sin), qk_norm_rope_reference(q, k, *w[:2], cos, sin)):
        assert_attention_layout(o)
        assert_close(o, r)
    args = (q[:, :lt], k[:, :lt], q[:, lt:], k[:, lt:], *w, cos, sin)
    for o, r in zip(joint_qk_norm_rope(*args), joint_qk_norm_rope_reference(*args)):
        assert_attention_layout(o)
        assert_close(o, r)
