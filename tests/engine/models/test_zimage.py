"""Z-Image: native DiT vs diffusers' ZImageTransformer2DModel, and the Family glue vs ZImagePipeline."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen3Config, Qwen3Model

from dittune.engine import scheduler
from dittune.engine.attention import calls
from dittune.engine.errors import EngineError
from dittune.engine.models.base import TokenBatch
from dittune.engine.models.zimage import (
    FAMILY,
    SPECS,
    ZImageConfig,
    ZImageTransformer,
    _load,
    apply_prompt_template,
    pack_latents,
    unpack_latents,
)

TINY = SPECS["z-image-turbo-tiny"]
CFG: ZImageConfig = TINY.dit_config
ATOL, RTOL = 1e-5, 1e-4


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial weights everywhere (diffusers zero-inits the pad tokens, ones-inits the norms)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 2 and "pad_token" not in name:
                p.copy_(noise / math.sqrt(p.shape[1]))
            else:
                p.copy_(0.5 * noise)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ref = ZImageTransformer2DModel(**CFG.to_diffusers()).eval()
    _randomize(ref)
    ours = ZImageTransformer(CFG).eval()
    ours.load_state_dict(FAMILY.convert_diffusers_state_dict(ref.state_dict()), strict=True)
    return ref, ours


@pytest.fixture(scope="module")
def family():
    return FAMILY(TINY)


def _ref_forward(ref, lat: torch.Tensor, cap: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """diffusers on lists, as ZImagePipeline calls it: lat [B, C, H, W] -> [B, C, H, W]."""
    out = ref(list(lat.unsqueeze(2).unbind(0)), t, list(cap.unbind(0)), return_dict=False)[0]
    return torch.stack(out).squeeze(2)


# (latent H, latent W, caption tokens, batch): with and without padding to 32 on each stream
@pytest.mark.parametrize("lh,lw,lc,b", [(8, 8, 7, 1), (8, 16, 32, 1), (10, 6, 3, 1), (16, 8, 20, 2)])
def test_dit_matches_diffusers(models, lh, lw, lc, b):
    ref, ours = models
    g = torch.Generator().manual_seed(lh * 100 + lw + lc)
    lat = torch.randn(b, CFG.in_channels, lh, lw, generator=g)
    cap = torch.randn(b, lc, CFG.cap_feat_dim, generator=g)
    t = torch.rand(b, generator=g)
    with torch.no_grad():
        expected = _ref_forward(ref, lat, cap, t)
        got = unpack_latents(ours(pack_latents(lat), cap, t, lh // 2, lw // 2), lh // 2, lw // 2)
    assert expected.abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def test_pad_tokens_take_part(models):
    """Guards the premise of the padding logic: the learned pad tokens change the output."""
    ref, ours = models
    g = torch.Generator().manual_seed(1)
    lat, cap, t = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 5, CFG.cap_feat_dim, generator=g), torch.rand(1)
    with torch.no_grad():
        base = ours(pack_latents(lat), cap, t, 4, 4)
        saved = ours.cap_pad_token.clone()
        ours.cap_pad_token.add_(1.0)
        try:
            moved = ours(pack_latents(lat), cap, t, 4, 4)
        finally:
            ours.cap_pad_token.copy_(saved)
    assert (base - moved).abs().max() > 1e-3


def test_attention_goes_through_engine_layer(models):
    _, ours = models
    before = calls(ours).get("torch_sdpa", 0)
    with torch.no_grad():
        ours(torch.randn(1, 16, 64), torch.randn(1, 3, CFG.cap_feat_dim), torch.rand(1), 4, 4)
    assert calls(ours)["torch_sdpa"] - before == CFG.n_layers + 2 * CFG.n_refiner_layers


def test_builds_on_meta_without_buffers():
    real = SPECS["z-image-turbo"].dit_config
    with torch.device("meta"):
        model = ZImageTransformer(real)
        ref = ZImageTransformer2DModel(**real.to_diffusers())
    assert list(model.buffers()) == []
    assert all(p.is_meta for p in model.parameters())
    for name in ZImageTransformer.repeated_blocks:
        assert isinstance(getattr(model, name), torch.nn.ModuleList) and len(getattr(model, name)) > 0
    assert len(model.layers) == 30 and len(model.noise_refiner) == len(model.context_refiner) == 2
    n_ours = sum(p.numel() for p in model.parameters())
    assert n_ours == sum(p.numel() for p in ref.parameters())
    assert n_ours == 6_154_908_736  # Z-Image-Turbo's published transformer size


def test_real_spec_matches_public_configs():
    spec = SPECS["z-image-turbo"]
    assert spec.dit_config == ZImageConfig()  # the dataclass defaults are the real sizes
    assert spec.dit_config.head_dim == 128 and spec.dit_config.ffn_dim == 10240
    (te,) = spec.text_encoders
    assert (te.name, te.arch, te.tokenizer, te.max_length) == ("text_encoder", "qwen3", "tokenizer", 512)
    assert te.config["hidden_size"] == spec.dit_config.cap_feat_dim
    assert spec.vae.config["scaling_factor"] == 0.3611 and spec.vae.config["shift_factor"] == 0.1159
    assert spec.scheduler.shift == 3.0 and not spec.scheduler.use_dynamic_shifting
    assert (spec.width, spec.height, spec.steps, spec.guidance, spec.true_cfg, spec.cfg_renorm) == (
        1024, 1024, 9, 0.0, True, False,
    )
    assert TINY.text_encoders[0].config["hidden_size"] == CFG.cap_feat_dim


def test_from_diffusers_refuses_unsupported():
    cfg = _load("transformer")
    with pytest.raises(EngineError, match="Omni"):
        ZImageConfig.from_diffusers({**cfg, "siglip_feat_dim": 1152})
    with pytest.raises(EngineError, match="head_dim"):
        ZImageTransformer(ZImageConfig(dim=32, n_heads=2, axes_dims=(4, 4, 4)))


def test_convert_refuses_partial_qkv(models):
    ref, _ = models
    sd = {k: v for k, v in ref.state_dict().items() if k != "layers.0.attention.to_k.weight"}
    with pytest.raises(EngineError, match="layers.0.qkv.weight"):
        FAMILY.convert_diffusers_state_dict(sd)


def test_pack_matches_diffusers_patchify(models, family):
    ref, _ = models
    lat = torch.randn(2, 16, 6, 10)
    packed = pack_latents(lat)
    for i in range(2):
        torch.testing.assert_close(packed[i], ref._patchify_image(lat[i].unsqueeze(1), 2, 1)[0], rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(packed, 3, 5), lat, rtol=0, atol=0)
    expected = lat / 0.3611 + 0.1159
    torch.testing.assert_close(family.unpack_latents(packed, 48, 80), expected)


def test_prepare_latents_matches_pipeline(family):
    got = family.prepare_latents(2, 48, 80, torch.Generator().manual_seed(3), "cpu", torch.bfloat16)
    assert got.dtype == torch.float32  # the pipeline's latents stay fp32
    assert got.shape == (2, 3 * 5, 64)
    fake_pipe = SimpleNamespace(vae_scale_factor=8)
    expected = ZImagePipeline.prepare_latents(
        fake_pipe, 2, 16, 48, 80, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(got, pack_latents(expected), rtol=0, atol=0)
    with pytest.raises(EngineError, match="multiples of 16"):
        family.prepare_latents(1, 40, 64, torch.Generator(), "cpu", torch.float32)


class _CharTokenizer:
    """Stands in for the Qwen tokenizer (no downloads): the engine's wrapper contract, right padding."""

    def apply_chat_template(self, messages, tokenize, add_generation_prompt, enable_thinking):
        assert not tokenize and add_generation_prompt and enable_thinking and len(messages) == 1
        return apply_prompt_template(messages[0]["content"])

    def __call__(self, texts, padding, max_length, truncation, return_tensors):
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, text in enumerate(texts):
            row = [ord(ch) % 5000 + 1 for ch in text][:max_length]
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return SimpleNamespace(input_ids=ids, attention_mask=mask)


@pytest.fixture(scope="module")
def text_encoder():
    torch.manual_seed(0)
    return Qwen3Model(Qwen3Config(**TINY.text_encoders[0].config)).eval()


def test_encode_prompt_matches_pipeline(family, text_encoder):
    tok = _CharTokenizer()
    prompt = "a red fox in snow"
    text = family.prompt_text("text_encoder", prompt)
    assert text == "<|im_start|>user\na red fox in snow<|im_end|>\n<|im_start|>assistant\n"
    enc = tok([text], "max_length", TINY.text_encoders[0].max_length, True, "pt")
    with torch.no_grad():
        got = family.encode_prompt(
            {"text_encoder": text_encoder}, {"text_encoder": TokenBatch(enc.input_ids, enc.attention_mask)}
        )["cap_feats"]
        fake_pipe = SimpleNamespace(tokenizer=tok, text_encoder=text_encoder)
        (expected,) = ZImagePipeline._encode_prompt(
            fake_pipe, [prompt], device=torch.device("cpu"), max_sequence_length=TINY.text_encoders[0].max_length
        )
    assert got.shape == (1, int(enc.attention_mask.sum()), CFG.cap_feat_dim)
    assert got.abs().max() > 0
    torch.testing.assert_close(got[0], expected, atol=ATOL, rtol=RTOL)


def test_denoise_loop_matches_pipeline(models, family, text_encoder):
    """A few Euler steps through Family.predict == ZImagePipeline(output_type="latent")."""
    ref, ours = models
    steps, height, width = 3, 48, 64
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    vae = AutoencoderKL(**{k: v for k, v in TINY.vae.config.items() if not k.startswith("_")})
    pipe = ZImagePipeline(sched, vae, text_encoder, None, ref)
    g = torch.Generator().manual_seed(7)
    cap = torch.randn(1, 9, CFG.cap_feat_dim, generator=g)
    init = family.prepare_latents(1, height, width, g, "cpu", torch.float32)
    h, w = height // 16, width // 16
    with torch.no_grad():
        expected = pipe(
            prompt_embeds=[cap[0]], height=height, width=width, num_inference_steps=steps, guidance_scale=0.0,
            latents=unpack_latents(init, h, w), output_type="latent", return_dict=False,
        )[0]
        # The engine's schedule for this spec: linspace(1, 1/N, N), static shift 3, then 0.
        s = scheduler.sigmas(TINY.scheduler, steps, family.image_seq_len(height, width))
        shifted = torch.linspace(1.0, 1.0 / steps, steps)
        torch.testing.assert_close(s[:-1], 3.0 * shifted / (1 + 2.0 * shifted))
        lat = init
        for i in range(steps):
            v = family.predict(ours, lat, s[i : i + 1], {"cap_feats": cap}, 0.0, height, width)
            lat = scheduler.euler_step(lat, v, float(s[i]), float(s[i + 1]))
    assert (lat - init).abs().max() > 1e-2
    torch.testing.assert_close(unpack_latents(lat, h, w), expected, atol=ATOL, rtol=RTOL)
