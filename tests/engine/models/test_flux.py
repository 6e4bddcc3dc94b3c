"""FLUX: native DiT vs diffusers' FluxTransformer2DModel, and the Family glue vs FluxPipeline (CPU, fp32)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from dittune.engine.errors import EngineError
from dittune.engine.models import flux
from dittune.engine.models.base import TokenBatch

TINY = flux.SPECS["flux-dev-tiny"]
ATOL, RTOL = 1e-5, 1e-4


def _diffusers_kwargs(cfg: flux.FluxConfig) -> dict:
    return dict(
        in_channels=cfg.in_channels,
        num_layers=cfg.num_layers,
        num_single_layers=cfg.num_single_layers,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=cfg.joint_attention_dim,
        pooled_projection_dim=cfg.pooled_projection_dim,
        guidance_embeds=cfg.guidance_embeds,
        axes_dims_rope=cfg.axes_dims_rope,
    )


def _randomize(module: torch.nn.Module) -> None:
    """Every weight non-trivial: norm scales away from 1, biases away from 0."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1:
                p.normal_(0, 0.1)
            else:
                p.normal_(0, p.shape[1] ** -0.5)


def _pair(cfg: flux.FluxConfig, seed: int = 0):
    torch.manual_seed(seed)
    ref = FluxTransformer2DModel(**_diffusers_kwargs(cfg)).eval()
    _randomize(ref)
    ours = flux.FluxTransformer(cfg).eval()
    ours.load_state_dict(flux.FluxFamily.convert_diffusers_state_dict(ref.state_dict()), strict=True)
    return ref, ours


@pytest.fixture(scope="module")
def dit_pair():
    # Two blocks of each kind so that block-to-block hand-off is covered too.
    return _pair(dataclasses.replace(TINY.dit_config, num_layers=2, num_single_layers=2))


@pytest.fixture(scope="module")
def encoders():
    torch.manual_seed(1)
    clip_spec, t5_spec = TINY.text_encoders
    clip = CLIPTextModel(CLIPTextConfig(**clip_spec.config)).eval()
    t5 = T5EncoderModel(T5Config(**t5_spec.config)).eval()
    return {"text_encoder": clip, "text_encoder_2": t5}


def _tokens(batch: int = 1) -> dict[str, TokenBatch]:
    clip_spec, t5_spec = TINY.text_encoders
    g = torch.Generator().manual_seed(2)
    clip_ids = torch.full((batch, clip_spec.max_length), 1)  # pad
    clip_ids[:, 0] = 0  # BOS
    clip_ids[:, 1:6] = torch.randint(3, 900, (batch, 5), generator=g)
    clip_ids[:, 6] = 999  # EOT: the highest id, which the legacy CLIP pooling picks
    t5_ids = torch.zeros((batch, t5_spec.max_length), dtype=torch.long)
    t5_ids[:, :9] = torch.randint(2, 1000, (batch, 9), generator=g)
    t5_ids[:, 9] = 1  # EOS
    return {
        "text_encoder": TokenBatch(clip_ids, (clip_ids != 1).long()),
        "text_encoder_2": TokenBatch(t5_ids, (t5_ids != 0).long()),
    }


def _inputs(cfg: flux.FluxConfig, batch: int = 2, h: int = 4, w: int = 6, lt: int = 7):
    g = torch.Generator().manual_seed(3)
    return dict(
        hidden_states=torch.randn(batch, h * w, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, lt, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.3, 0.85])[:batch],
        img_ids=FluxPipeline._prepare_latent_image_ids(batch, h, w, "cpu", torch.float32),
        txt_ids=torch.zeros(lt, 3),
        guidance=torch.full((batch,), 3.5) if cfg.guidance_embeds else None,
    )


# ---------------------------------------------------------------------------------------------
# DiT


@torch.no_grad()
def test_dit_matches_diffusers(dit_pair):
    ref, ours = dit_pair
    x = _inputs(ours.config)
    want = ref(**x, return_dict=False)[0]
    got = ours(**x)
    assert got.shape == want.shape == x["hidden_states"].shape
    assert got.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_dit_without_guidance_matches_diffusers():
    ref, ours = _pair(dataclasses.replace(TINY.dit_config, guidance_embeds=False), seed=4)
    assert ours.guidance_in is None
    x = _inputs(ours.config, batch=1)
    want = ref(**x, return_dict=False)[0]
    got = ours(**x)
    assert got.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    with pytest.raises(EngineError, match="no guidance"):
        ours(**{**x, "guidance": torch.ones(1)})


def test_dit_refuses_missing_guidance(dit_pair):
    _, ours = dit_pair
    with pytest.raises(EngineError, match="pass `guidance`"):
        ours(**{**_inputs(ours.config), "guidance": None})


def test_grad_mode_gives_the_same_output(dit_pair):
    """No inference-only tricks (out= writes) in the forward: autograd mode runs and agrees."""
    _, ours = dit_pair
    x = _inputs(ours.config, batch=1)
    with torch.no_grad():
        want = ours(**x)
    got = ours(**x)
    assert got.requires_grad
    torch.testing.assert_close(got.detach(), want, atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_blocks_trace_as_one_graph(dit_pair):
    """Regional torch.compile needs each repeated block to be one graph with no breaks."""
    _, ours = dit_pair
    x = _inputs(ours.config, batch=1)
    cos, sin = flux.rope_tables(torch.cat([x["txt_ids"], x["img_ids"]]), ours.config.axes_dims_rope, 10000)
    d = ours.config.hidden_size
    img, txt, vec = torch.randn(1, 24, d), torch.randn(1, 7, d), torch.randn(1, d)
    torch._dynamo.reset()
    cases = [
        (ours.double_blocks[0], (img, txt, vec, cos, sin)),
        (ours.single_blocks[0], (torch.cat([txt, img], dim=1), vec, cos, sin)),
    ]
    for block, args in cases:
        explained = torch._dynamo.explain(block)(*args)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()


def test_rope_compiled_path_matches_eager(monkeypatch):
    """rope() has a complex-multiply path (eager) and a real one (under torch.compile)."""
    x = torch.randn(2, 11, 3, 16)  # [B, L, H, D]
    ids = FluxPipeline._prepare_latent_image_ids(1, 1, 11, "cpu", torch.float32)
    cos, sin = flux.rope_tables(ids, (4, 6, 6), 10000)
    eager = flux.rope(x, cos, sin)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(flux.rope(x, cos, sin), eager, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(eager, x)


@pytest.mark.parametrize("name", sorted(flux.SPECS))
def test_builds_on_meta_without_buffers(name):
    cfg = flux.SPECS[name].dit_config
    with torch.device("meta"):
        ours = flux.FluxTransformer(cfg)
        ref = FluxTransformer2DModel(**_diffusers_kwargs(cfg))
    assert list(ours.buffers()) == []
    assert all(p.is_meta for p in ours.parameters())
    # The key map and the fused shapes hold at the real sizes too.
    ours.load_state_dict(flux.FluxFamily.convert_diffusers_state_dict(ref.state_dict()), strict=True, assign=True)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    for attr, n in zip(ours.repeated_blocks, (cfg.num_layers, cfg.num_single_layers)):
        blocks = getattr(ours, attr)
        assert isinstance(blocks, torch.nn.ModuleList) and len(blocks) == n


def test_real_configs():
    dev, schnell = flux.SPECS["flux-dev"], flux.SPECS["flux-schnell"]
    assert dev.dit_config == flux.FluxConfig()
    assert dev.dit_config.hidden_size == 3072 and schnell.dit_config.guidance_embeds is False
    assert [t.max_length for t in dev.text_encoders] == [77, 512]
    assert [t.max_length for t in schnell.text_encoders] == [77, 256]
    assert dev.scheduler.use_dynamic_shifting and dev.scheduler.shift == 3.0
    assert not schnell.scheduler.use_dynamic_shifting and schnell.scheduler.shift == 1.0
    assert dev.vae.config["scaling_factor"] == 0.3611 and dev.vae.config["shift_factor"] == 0.1159
    assert (dev.steps, dev.guidance, schnell.steps, schnell.guidance) == (28, 3.5, 4, 0.0)


def test_bad_configs_and_state_dicts_are_refused(dit_pair):
    with pytest.raises(EngineError, match="axes_dims_rope"):
        flux.FluxConfig(axes_dims_rope=(16, 56, 58))
    with pytest.raises(EngineError, match="does not know"):
        flux.FluxConfig.from_diffusers({"num_layers": 1, "qkv_bias": True})
    sd = dict(dit_pair[0].state_dict())
    with pytest.raises(EngineError, match="does not know"):
        flux.FluxFamily.convert_diffusers_state_dict({**sd, "extra.weight": torch.zeros(1)})
    sd.pop("transformer_blocks.0.attn.to_k.bias")
    with pytest.raises(EngineError, match="missing"):
        flux.FluxFamily.convert_diffusers_state_dict(sd)


# ---------------------------------------------------------------------------------------------
# Family glue


def _fake_pipe(encoders, tokens):
    """Just enough of a FluxPipeline for its own prompt helpers, with tokenizers that return `tokens`."""

    def tokenizer(name):
        return lambda *a, **k: SimpleNamespace(input_ids=tokens[name].input_ids)

    return SimpleNamespace(
        tokenizer=tokenizer("text_encoder"),
        tokenizer_2=tokenizer("text_encoder_2"),
        text_encoder=encoders["text_encoder"],
        text_encoder_2=encoders["text_encoder_2"],
        tokenizer_max_length=77,
        _execution_device=torch.device("cpu"),
    )


@torch.no_grad()
def test_encode_prompt_matches_pipeline(encoders):
    family = flux.FluxFamily(TINY)
    tokens = _tokens()
    cond = family.encode_prompt(encoders, tokens)
    pipe = _fake_pipe(encoders, tokens)
    t5_len = TINY.text_encoders[1].max_length
    want_embeds = FluxPipeline._get_t5_prompt_embeds(pipe, "p", max_sequence_length=t5_len, device="cpu")
    want_pooled = FluxPipeline._get_clip_prompt_embeds(pipe, "p", device="cpu")
    assert cond["prompt_embeds"].shape == (1, t5_len, 32) and cond["pooled_prompt_embeds"].shape == (1, 32)
    assert cond["pooled_prompt_embeds"].abs().max() > 0
    torch.testing.assert_close(cond["prompt_embeds"], want_embeds, atol=0, rtol=0)
    torch.testing.assert_close(cond["pooled_prompt_embeds"], want_pooled, atol=0, rtol=0)
    assert torch.equal(cond["txt_ids"], torch.zeros(t5_len, 3))


def test_latents_pack_like_pipeline():
    family = flux.FluxFamily(TINY)
    b, height, width = 2, 64, 96
    got = family.prepare_latents(b, height, width, torch.Generator().manual_seed(5), "cpu", torch.float32)
    pipe = SimpleNamespace(
        vae_scale_factor=8,
        _pack_latents=FluxPipeline._pack_latents,
        _prepare_latent_image_ids=FluxPipeline._prepare_latent_image_ids,
    )
    want, want_ids = FluxPipeline.prepare_latents(
        pipe, b, 16, height, width, torch.float32, "cpu", torch.Generator().manual_seed(5)
    )
    assert got.shape == (b, (height // 16) * (width // 16), 64)
    assert torch.equal(got, want)
    assert torch.equal(family._image_ids(height, width, "cpu"), want_ids)

    vae_in = family.unpack_latents(got, height, width)
    assert vae_in.shape == (b, 16, height // 8, width // 8)
    unpacked = FluxPipeline._unpack_latents(got, height, width, 8)
    torch.testing.assert_close(vae_in, unpacked / 0.3611 + 0.1159)
    torch.testing.assert_close(flux._pack((vae_in - 0.1159) * 0.3611), got)


def test_bad_sizes_are_refused():
    family = flux.FluxFamily(TINY)
    with pytest.raises(EngineError, match="multiples of 16"):
        family.prepare_latents(1, 72, 64, torch.Generator(), "cpu", torch.float32)


@torch.no_grad()
def test_denoise_and_decode_match_pipeline(encoders):
    """Family.predict in a plain Euler loop + unpack + VAE == FluxPipeline on the same tiny components."""
    torch.manual_seed(6)
    ref, dit = _pair(TINY.dit_config, seed=7)
    vae = AutoencoderKL.from_config(TINY.vae.config).eval()
    s = TINY.scheduler
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=s.shift,
        use_dynamic_shifting=s.use_dynamic_shifting,
        base_shift=s.base_shift,
        max_shift=s.max_shift,
        base_image_seq_len=s.base_image_seq_len,
        max_image_seq_len=s.max_image_seq_len,
    )
    pipe = FluxPipeline(scheduler, vae, encoders["text_encoder"], None, encoders["text_encoder_2"], None, ref)
    pipe.set_progress_bar_config(disable=True)

    family = flux.FluxFamily(TINY)
    cond = family.encode_prompt(encoders, _tokens())
    height, width, steps = 64, 96, 3
    want = pipe(
        prompt_embeds=cond["prompt_embeds"],
        pooled_prompt_embeds=cond["pooled_prompt_embeds"],
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=TINY.guidance,
        generator=torch.Generator().manual_seed(8),
        output_type="pt",
    ).images

    x = family.prepare_latents(1, height, width, torch.Generator().manual_seed(8), "cpu", torch.float32)
    mu = calculate_shift(
        family.image_seq_len(height, width), s.base_image_seq_len, s.max_image_seq_len, s.base_shift, s.max_shift
    )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    sigmas = scheduler.sigmas
    for i in range(steps):
        v = family.predict(dit, x, sigmas[i : i + 1], cond, TINY.guidance, height, width)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    image = vae.decode(family.unpack_latents(x, height, width)).sample
    got = (image / 2 + 0.5).clamp(0, 1)

    assert got.shape == want.shape == (1, 3, height, width)
    assert got.std() > 0
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
