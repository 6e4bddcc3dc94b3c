"""Packed modulation (base.pack_modulation): one GEMV for every block's adaLN Linear gives the
same outputs as the per-block Linears, changes no parameter, adds no memory; Qwen-Image's step
cache reuses temb and the modulations across the passes of one step."""

from __future__ import annotations

import pytest
import torch

from dittune.engine.components import randomize_
from dittune.engine.models import get_family
from dittune.engine.models.base import modulations, pack_modulation


def _dit(model: str):
    family = get_family(model)
    dit = family.transformer_cls(family.spec.dit_config).eval().requires_grad_(False)
    randomize_(dit, seed=3)
    return family, dit


def _inputs(model: str, dit, text_tokens: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c = dit.config if hasattr(dit, "config") else dit.cfg
    if model.startswith("flux"):
        ids = torch.zeros(4, 4, 3)
        ids[..., 1] = torch.arange(4)[:, None]
        ids[..., 2] = torch.arange(4)[None, :]
        return (torch.randn(1, 16, c.in_channels, generator=g), torch.randn(1, text_tokens, c.joint_attention_dim, generator=g),
                torch.randn(1, c.pooled_projection_dim, generator=g), torch.tensor([0.7]), ids.reshape(-1, 3),
                torch.zeros(text_tokens, 3), torch.full((1,), 3.5) if c.guidance_embeds else None)
    return (torch.randn(1, 16, c.in_channels, generator=g), torch.randn(1, text_tokens, c.joint_attention_dim, generator=g),
            None, torch.tensor([0.7]), 4, 4)


@pytest.mark.parametrize("model", ["flux-dev-tiny", "qwen-image-tiny"])
def test_packed_matches_per_block_and_keeps_parameters(model):
    _, dit = _dit(model)
    x = _inputs(model, dit)
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    nbytes = sum(p.numel() * p.element_size() for p in dit.parameters())
    with torch.no_grad():
        ref = dit(*x)
        assert modulations(dit, torch.zeros(1, 1)) is None
        assert pack_modulation(dit)
        out = dit(*x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    after = dit.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    weight, bias, sizes = dit.packed_modulation
    groups = dit.modulation_groups()
    assert len(sizes) == len(groups) and sum(sizes) == weight.shape[0]
    for g in groups:  # every modulation Linear now lives inside the packed buffers
        for lin in g:
            assert lin.weight.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
            assert lin.bias.untyped_storage().data_ptr() == bias.untyped_storage().data_ptr()
    assert sum(p.numel() * p.element_size() for p in dit.parameters()) == nbytes


def test_qwen_step_cache_reuses_temb_across_cfg_passes(monkeypatch):
    _, dit = _dit("qwen-image-tiny")
    pack_modulation(dit)
    cond, neg = _inputs("qwen-image-tiny", dit, 7, seed=0), _inputs("qwen-image-tiny", dit, 3, seed=1)
    neg = (cond[0], *neg[1:])  # same latents and timestep, other text
    with torch.no_grad():
        ref = dit(*cond), dit(*neg)
        calls = []
        orig = dit.time_embed.forward
        monkeypatch.setattr(dit.time_embed, "forward", lambda *a: calls.append(1) or orig(*a))
        cache: dict = {}
        out = dit(*cond, step_cache=cache), dit(*neg, step_cache=cache)
    assert len(calls) == 1  # the second pass took temb and the modulations from the step cache
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_pipeline_packs_a_resident_dit():
    """(Offloaded DiTs keep per-block modulation: checked by the GPU flag tests, offload is CUDA-only.)"""
    from dittune.engine.run import GenerateRequest, generate

    r = generate(GenerateRequest(model="flux-dev-tiny", steps=1, width=64, height=64, device="cpu"))
    assert r.dump["manifest"]["modulation"] == "packed"
