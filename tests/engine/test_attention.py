"""The attention seam's layout: every model hands attention q, k, v as [B, H, L, D] views of
[B, L, H, D] storage (no copy before attention), and the output's reshape to [B, L, H * D] is a
view of what the backend returned (no copy after). On one process, every tiny model, with the
model files' ops and with dittune.kernels' ops (their torch references here on the CPU)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dittune.engine import attention, components
from dittune.engine.attention import Attention, merge_heads
from dittune.engine.models import get_family
from dittune.engine.ops import use_fused_kernels

MODELS = ("flux-dev-tiny", "qwen-image-tiny", "z-image-turbo-tiny")


def _cond(family) -> dict:
    cfg, g = family.spec.dit_config, torch.Generator().manual_seed(7)
    if family.spec.family == "flux":
        return {"prompt_embeds": torch.randn(1, 5, cfg.joint_attention_dim, generator=g),
                "pooled_prompt_embeds": torch.randn(1, cfg.pooled_projection_dim, generator=g),
                "txt_ids": torch.zeros(5, 3)}
    if family.spec.family == "qwen_image":  # with a key mask: the masked SDPA path
        return {"prompt_embeds": torch.randn(1, 5, cfg.joint_attention_dim, generator=g),
                "prompt_mask": (torch.arange(5) < 3).long()[None]}
    return {"cap_feats": torch.randn(1, 5, cfg.cap_feat_dim, generator=g)}


def _blhd_view(t: torch.Tensor) -> bool:
    """t [B, H, L, D] is a view of [B, L, H, D] storage: heads adjacent within a token (a token's
    stride may be wider, as in a packed QKV projection), and not itself contiguous."""
    b, h, l, d = t.shape
    return t.stride(3) == 1 and t.stride(1) == d and t.stride(2) >= h * d and not t.is_contiguous()


def _run(model: str, fused: bool, monkeypatch) -> tuple[list, list]:
    """One prediction of `model`; -> (what reached the backend per call, each Attention's output)."""
    family = get_family(model)
    spec = family.spec
    dit = components.build_dit(family, torch.device("cpu"), torch.float32, None, seed=0)
    if fused:
        from dittune import kernels

        monkeypatch.setattr(kernels, "triton_available", lambda device=None: True)  # CPU: the ops' references
        assert {"qk_norm_rope", "joint_qk_norm_rope"} & set(use_fused_kernels(dit, "cpu"))
    seen, outs = [], []
    sdpa = attention._IMPLS["torch_sdpa"]

    def spy(q, k, v, mask):
        out = sdpa(q, k, v, mask)
        seen.append(SimpleNamespace(q=q, k=k, v=v, out=out))
        return out

    monkeypatch.setitem(attention._IMPLS, "torch_sdpa", spy)
    hooks = [m.register_forward_hook(lambda _m, _a, out: outs.append(out)) for m in dit.modules()
             if isinstance(m, Attention)]
    try:
        latents = family.prepare_latents(1, spec.height, spec.width, torch.Generator().manual_seed(3), "cpu",
                                         torch.float32)
        with torch.no_grad():
            family.predict(dit, latents, torch.tensor([0.7]), _cond(family), spec.guidance, spec.height, spec.width)
    finally:
        for h in hooks:
            h.remove()
    return seen, outs


@pytest.mark.parametrize("fused", [False, True], ids=["model-ops", "kernel-ops"])
@pytest.mark.parametrize("model", MODELS)
def test_attention_gets_views_and_returns_without_a_copy(model, fused, monkeypatch):
    seen, outs = _run(model, fused, monkeypatch)
    assert seen and len(seen) == len(outs)
    for i, (call, out) in enumerate(zip(seen, outs)):
        for name in ("q", "k", "v"):
            t = getattr(call, name)
            assert _blhd_view(t), f"call {i}: {name} {tuple(t.shape)} strides {t.stride()}"
        b, h, l, d = call.q.shape
        assert out.shape == (b, l, h * d) and out.is_contiguous()
        # The backend's output itself, reshaped as a view: same storage, same first element.
        assert out.data_ptr() == call.out.data_ptr(), f"call {i}: the output was copied"
        assert out.untyped_storage().data_ptr() == call.out.untyped_storage().data_ptr()


def test_merge_heads_copies_only_what_is_not_already_token_major():
    blhd = torch.randn(2, 7, 3, 16)
    out = merge_heads(blhd.transpose(1, 2))
    assert out.data_ptr() == blhd.data_ptr() and out.is_contiguous()
    assert torch.equal(out, blhd.flatten(2))
    bhld = blhd.transpose(1, 2).contiguous()  # e.g. a kernel that returns contiguous [B, H, L, D]
    out = merge_heads(bhld)
    assert out.data_ptr() != bhld.data_ptr() and out.is_contiguous() and torch.equal(out, blhd.flatten(2))


def _qkv(b=2, l=9, h=3, d=16):
    """q, k, v as the models hand them: [B, H, L, D] views of one packed [B, L, 3, H, D] projection."""
    torch.manual_seed(0)
    proj = torch.randn(b, l, 3, h, d)
    return [t.transpose(1, 2) for t in proj.unbind(2)]


@pytest.mark.parametrize("backend", ["fa", "sage_attn"])
def test_third_party_backends_take_and_return_token_major_without_copies(backend, monkeypatch):
    """fa and sage_attn get [B, L, H, D] views of the callers' tensors (sage: a copy of K, which
    SageAttention 1.x smooths in place) and their [B, L, H, D] output comes back as is."""
    got, returned = {}, []

    def kernel(q, k, v, tensor_layout="NHD", is_causal=False):  # [B, L, H, D], both libraries' layout
        assert tensor_layout == "NHD" and not is_causal
        got.update(q=q, k=k, v=v)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        returned.append(out.transpose(1, 2).contiguous())
        return returned[-1]

    monkeypatch.setattr(attention, "_flash_attn_func", lambda: kernel)
    monkeypatch.setitem(sys.modules, "sageattention", SimpleNamespace(sageattn=kernel))
    q, k, v = _qkv()
    attn = Attention()
    attn.backend = backend
    out = attn(q, k, v)
    b, h, l, d = q.shape
    torch.testing.assert_close(out, merge_heads(F.scaled_dot_product_attention(q, k, v)))
    assert out.data_ptr() == returned[-1].data_ptr() and out.shape == (b, l, h * d) and out.is_contiguous()
    assert got["q"].data_ptr() == q.data_ptr() and got["v"].data_ptr() == v.data_ptr()
    assert (got["k"].data_ptr() == k.data_ptr()) == (backend == "fa")
    assert got["q"].shape == (b, l, h, d) and got["q"].stride(-1) == 1


def test_flashinfer_runs_one_prefill_per_sequence_on_token_major_views(monkeypatch):
    """flashinfer's single-request prefill gets each sequence as an [L, H, D] view of the caller's
    storage (no copy before), and the batch's outputs land in one [B, L, H, D] tensor that the
    [B, L, H * D] result is a view of (no copy after)."""
    calls = []

    def prefill(q, k, v, causal=False, kv_layout="NHD"):  # [L, H, D]
        assert kv_layout == "NHD" and not causal and q.dim() == 3 and q.stride(-1) == 1
        calls.append((q.data_ptr(), k.data_ptr(), v.data_ptr()))
        return F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)).transpose(0, 1)

    monkeypatch.setattr(attention, "_flashinfer_prefill", lambda: prefill)
    q, k, v = _qkv(b=2)
    attn = Attention()
    attn.backend = "flashinfer"
    out = attn(q, k, v)
    torch.testing.assert_close(out, merge_heads(F.scaled_dot_product_attention(q, k, v)))
    assert len(calls) == 2 and calls[0] == (q.data_ptr(), k.data_ptr(), v.data_ptr())
    assert calls[1][0] == q[1].data_ptr() and out.is_contiguous()


def test_optional_backends_missing_say_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", None)
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    from dittune.engine.errors import EngineError

    with pytest.raises(EngineError, match=r"dittune\[flashinfer\]"):
        attention._flashinfer_prefill()
    with pytest.raises(EngineError, match=r"dittune\[fa4\]"):
        attention._flash_attn_func()
    assert attention.available_backends("cpu") == ["torch_sdpa"]


# --- on the device: the optional kernels against cuDNN at the three DiTs' attention shapes ---------

SHAPES = {"flux-dev": (1, 4608, 24, 128), "qwen-image": (2, 4128, 24, 128), "z-image-turbo": (1, 4128, 30, 128)}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["fa", "flashinfer"])
@pytest.mark.parametrize("model", list(SHAPES))
def test_optional_backends_match_cudnn_on_gpu(backend, model):
    if backend not in attention.available_backends("cuda"):
        pytest.skip(f"{backend} is not installed on this machine (dittune[fa4] / dittune[flashinfer])")
    b, l, h, d = SHAPES[model]
    g = torch.Generator(device="cuda").manual_seed(0)
    proj = torch.randn(b, l, 3, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = (t.transpose(1, 2) for t in proj.unbind(2))
    attn = Attention()
    attn.backend = "torch_cudnn_sdpa"
    ref = attn(q, k, v)
    attn.backend = backend
    out = attn(q, k, v)
    assert out.shape == ref.shape == (b, l, h * d) and out.is_contiguous()
    err = (out.float() - ref.float()).abs()
    assert err.max().item() < 2e-2 and err.mean().item() < 1e-3, (err.max().item(), err.mean().item())
