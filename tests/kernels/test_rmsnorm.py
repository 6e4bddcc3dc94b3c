"""rms_norm: Triton (interpreted) vs the torch reference over contiguous and strided leading dims,
the reference vs the models' own rms_norm (bit for bit), input checks, GPU full shapes."""

import functools

import pytest
import torch
from kernelcheck import assert_close, rand, run_interpreted

from dittune.kernels.rmsnorm import launch, rms_norm, rms_norm_reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _x(layout: str, dtype, device="cpu") -> torch.Tensor:
    torch.manual_seed(0)
    if layout == "zimage-width":  # [B, L, C] contiguous
        return rand(2, 3, 3840, dtype=dtype, device=device, scale=2, offset=0.5)
    if layout == "qkv-view":  # [B, L, H, D] of a packed [B, L, 3, H, D]: no leading dims fold
        return rand(2, 5, 3, 3, 128, dtype=dtype, device=device, scale=2)[:, :, 1]
    if layout == "rows-2d":  # 37 rows of 40: 32 rows per program, padded columns
        return rand(37, 40, dtype=dtype, device=device)
    if layout == "folding-5d":  # a slice of the last leading dim: outer dims fold into one
        return rand(2, 2, 3, 6, 24, dtype=dtype, device=device)[:, :, :, 1:5]
    if layout == "1d":
        return rand(3072, dtype=dtype, device=device)
    raise ValueError(layout)


CASES = {
    "zimage-width-bf16": ("zimage-width", torch.bfloat16),
    "zimage-width-fp32": ("zimage-width", torch.float32),
    "qkv-view-fp16": ("qkv-view", torch.float16),
    "qkv-view-fp32": ("qkv-view", torch.float32),
    "rows-2d-bf16": ("rows-2d", torch.bfloat16),
    "folding-5d-fp32": ("folding-5d", torch.float32),
    "1d-fp16": ("1d", torch.float16),
}


def _check_triton(layout, dtype):
    x = _x(layout, dtype)
    w = rand(x.shape[-1], dtype=dtype, scale=0.2, offset=1)
    out, ref = rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5)
    assert torch.equal(out, launch(x, w, 1e-5)) and out.is_contiguous()
    assert_close(out, ref)


def _check_rejects_unfoldable():
    x = torch.randn(2, 3, 4, 5, 8)[:, :, :, ::2][:, ::2]  # 4 leading dims that cannot fold
    with pytest.raises(ValueError, match="more than 3 non-foldable leading dims"):
        launch(x, torch.ones(8), 1e-6)


def interpreted_cases():
    cases = {name: functools.partial(_check_triton, *case) for name, case in CASES.items()}
    return {**cases, "rejects-unfoldable": _check_rejects_unfoldable}


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", [*CASES, "rejects-unfoldable"])
def test_triton_matches_reference(interpreted, case):
    assert interpreted[case] is None, interpreted[case]


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_the_models_rms_norm(dtype):
    from dittune.engine.models import flux, qwen_image, zimage

    x = _x("qkv-view", dtype)
    w = rand(x.shape[-1], dtype=dtype, scale=0.2, offset=1)
    ref = rms_norm_reference(x, w, 1e-6)
    for model in (flux, qwen_image, zimage):
        assert torch.equal(ref, model.rms_norm(x, w, 1e-6)), model.__name__


def test_readable_refusals():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"weight must be \[8\]"):
        rms_norm(x, torch.ones(4))
    with pytest.raises(ValueError, match="weight has dtype torch.bfloat16"):
        rms_norm(x, torch.ones(8, dtype=torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_full_shapes(dtype):
    for x in (
        rand(1, 4096 + 128, 3840, dtype=dtype, device="cuda"),  # Z-Image block norms
        rand(1, 4096 + 512, 3, 24, 128, dtype=dtype, device="cuda")[:, :, 0],  # FLUX q view
    ):
        w = rand(x.shape[-1], dtype=dtype, device="cuda", scale=0.2, offset=1)
        assert_close(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5))
