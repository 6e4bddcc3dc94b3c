"""Qwen-Image: native DiT and family glue against diffusers' own transformer and pipeline (tiny, fp32, CPU)."""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
from transformers import (
    BatchEncoding,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLTextModel,
)

from dittune.engine.errors import EngineError
from dittune.engine.models import qwen_image as qi
from dittune.engine.models.base import TokenBatch

TINY = qi.SPECS["qwen-image-tiny"]
PAD_ID = 151643
_PREFIX, _SUFFIX = qi.PROMPT_TEMPLATE.split("{}")


def _randomize(module: torch.nn.Module) -> None:
    """Every weight non-trivial (diffusers zero-inits nothing here, but norms start at ones)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3 if "transformer" not in name else 0.1)


class StubTokenizer:
    """Stands in for Qwen2Tokenizer: the template prefix is DROP_IDX ids, the suffix 5, the prompt one a word."""

    def encode(self, text: str) -> list[int]:
        if not text.startswith(_PREFIX) or not text.endswith(_SUFFIX):
            raise ValueError("stub tokenizer expects the Qwen-Image template")
        words = re.findall(r"\s*\S+|\s+", text[len(_PREFIX) : -len(_SUFFIX)])
        body = [100 + sum(map(ord, w)) % 100_000 for w in words]
        return [151_600 + i for i in range(qi.DROP_IDX)] + body + [151645, 198, 151644, 77091, 198]

    def __call__(self, texts, max_length, padding, truncation, return_tensors):
        ids = [self.encode(t)[:max_length] for t in texts]
        longest = max(len(i) for i in ids)
        return BatchEncoding(
            {
                "input_ids": torch.tensor([i + [PAD_ID] * (longest - len(i)) for i in ids]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (longest - len(i)) for i in ids]),
            }
        )


def token_batch(prompts: list[str], max_length: int, left: bool = False) -> TokenBatch:
    """What the engine's tokenizer hands encode_prompt: Family.prompt_text, padded to max_length."""
    fam = qi.FAMILY(TINY)
    rows = [StubTokenizer().encode(fam.prompt_text("text_encoder", p))[:max_length] for p in prompts]
    ids, mask = [], []
    for r in rows:
        pad = max_length - len(r)
        ids.append([PAD_ID] * pad + r if left else r + [PAD_ID] * pad)
        mask.append([0] * pad + [1] * len(r) if left else [1] * len(r) + [0] * pad)
    return TokenBatch(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))


@pytest.fixture(scope="module")
def dits():
    torch.manual_seed(0)
    cfg = TINY.dit_config
    ref = QwenImageTransformer2DModel(
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=cfg.joint_attention_dim,
        axes_dims_rope=cfg.axes_dims_rope,
    ).eval()
    _randomize(ref)
    ours = qi.QwenImageTransformer(cfg).eval()
    ours.load_state_dict(qi.FAMILY.convert_diffusers_state_dict(ref.state_dict()), strict=True)
    return ref, ours


@pytest.fixture(scope="module")
def text_encoders():
    """The pipeline's Qwen2.5-VL and the engine's language-model-only encoder, same weights."""
    torch.manual_seed(1)
    text_cfg = dict(TINY.text_encoders[0].config)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                  fullatt_block_indexes=[0], spatial_merge_size=2, window_size=112)  # fmt: skip
    vl = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text_cfg, vision_config=vision)).eval()
    _randomize(vl)
    lm = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(**text_cfg)).eval()
    lm.load_state_dict(vl.model.language_model.state_dict(), strict=True)
    return vl, lm


@pytest.fixture(scope="module")
def pipe(dits, text_encoders):
    torch.manual_seed(2)
    vae = AutoencoderKLQwenImage.from_config(dict(TINY.vae.config)).eval()
    _randomize(vae)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(qi._load_config("scheduler"))
    return QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoders[0], tokenizer=StubTokenizer(), transformer=dits[0]
    )


# ---------------------------------------------------------------------------------------------
# DiT


@pytest.mark.parametrize("masked", [False, True])
def test_dit_matches_diffusers(dits, masked):
    ref, ours = dits
    torch.manual_seed(3)
    b, gh, gw, lt = 2, 3, 5, 7  # odd, non-square grid: checks the centred RoPE rows/columns
    img = torch.randn(b, gh * gw, 64)
    txt = torch.randn(b, lt, TINY.dit_config.joint_attention_dim)
    t = torch.rand(b)
    mask = None
    if masked:
        mask = torch.ones(b, lt, dtype=torch.long)
        mask[1, 4:] = 0
    with torch.no_grad():
        want = ref(
            hidden_states=img, encoder_hidden_states=txt, encoder_hidden_states_mask=mask,
            timestep=t, img_shapes=[[(1, gh, gw)]] * b, return_dict=False,
        )[0]  # fmt: skip
        got = ours(img, txt, mask, t, gh, gw)
    assert got.shape == (b, gh * gw, 64)
    assert want.abs().mean() > 0.1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_compiled_rope_path_matches_diffusers(dits, monkeypatch):
    """The real-arithmetic RoPE used under torch.compile gives what the eager complex one gives."""
    ref, ours = dits
    torch.manual_seed(4)
    img, txt, t = torch.randn(1, 12, 64), torch.randn(1, 5, TINY.dit_config.joint_attention_dim), torch.rand(1)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        want = ref(hidden_states=img, encoder_hidden_states=txt, timestep=t, img_shapes=[[(1, 4, 3)]], return_dict=False)[0]
        got = ours(img, txt, None, t, 4, 3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_joint_qk_norm_rope_matches_kernel_reference():
    """The in-model op and dittune.kernels.joint_qk_norm_rope are interchangeable."""
    from dittune.kernels.qk_norm_rope import joint_qk_norm_rope_reference

    torch.manual_seed(8)
    lt, li, h, d = 5, 12, 2, 16
    qkv_txt, qkv_img = torch.randn(2, lt, 3, h, d), torch.randn(2, li, 3, h, d)
    weights = [1 + 0.2 * torch.randn(d) for _ in range(4)]
    cos, sin = qi.rope_tables(3, 4, lt, (4, 6, 6), 10000, "cpu")
    args = (qkv_txt[:, :, 0], qkv_txt[:, :, 1], qkv_img[:, :, 0], qkv_img[:, :, 1], *weights, cos, sin, 1e-6)
    for got, want in zip(qi.joint_qk_norm_rope(*args), joint_qk_norm_rope_reference(*args)):
        # Both [B, H, L, D] views of new contiguous [B, L, H, D] tensors: attention's layout.
        assert got.shape == (2, h, lt + li, d) and got.transpose(1, 2).is_contiguous() and got.stride() == want.stride()
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_block_compiles_without_graph_breaks(dits):
    _, ours = dits
    cfg = TINY.dit_config
    cos, sin = qi.rope_tables(3, 4, 5, cfg.axes_dims_rope, cfg.rope_theta, "cpu")
    args = (torch.randn(1, 12, cfg.inner_dim), torch.randn(1, 5, cfg.inner_dim), torch.randn(1, cfg.inner_dim))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(ours.blocks[0])(*args, cos, sin, None)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_bf16_no_less_accurate_than_diffusers(dits):
    """bf16 error against the fp32 result is no worse than diffusers' own bf16 module's."""
    ref, ours = dits
    torch.manual_seed(6)
    gh, gw, lt = 8, 6, 9
    img, txt = torch.randn(1, gh * gw, 64), torch.randn(1, lt, TINY.dit_config.joint_attention_dim)
    t = torch.tensor([0.73])
    # The timestep embedding is where bf16 rounding hurts most (sin of up to 1000 rad): bit-identical.
    from diffusers.models.embeddings import Timesteps

    diffusers_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)
    torch.testing.assert_close(qi.timestep_embedding(t.bfloat16()), diffusers_proj(t.bfloat16()), rtol=0, atol=0)

    def run_ref(m, dt):
        return m(hidden_states=img.to(dt), encoder_hidden_states=txt.to(dt), timestep=t.to(dt),
                 img_shapes=[[(1, gh, gw)]], return_dict=False)[0].float()  # fmt: skip

    with torch.no_grad():
        exact = run_ref(ref, torch.float32)
        ref_bf16, ours_bf16 = copy.deepcopy(ref).bfloat16(), copy.deepcopy(ours).bfloat16()
        err_ref = (run_ref(ref_bf16, torch.bfloat16) - exact).norm() / exact.norm()
        err_ours = (ours_bf16(img.bfloat16(), txt.bfloat16(), None, t.bfloat16(), gh, gw).float() - exact).norm() / exact.norm()
    assert 0 < err_ours <= 1.25 * err_ref


def test_dit_builds_on_meta_without_buffers():
    from diffusers import QwenImageTransformer2DModel as Ref

    with torch.device("meta"):
        ours = qi.QwenImageTransformer(qi.SPECS["qwen-image"].dit_config)
        ref = Ref.from_config(qi._load_config("transformer"))
    assert list(ours.buffers()) == []
    assert all(p.is_meta for p in ours.parameters())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    for name in ours.repeated_blocks:
        blocks = getattr(ours, name)
        assert isinstance(blocks, torch.nn.ModuleList) and len(blocks) == 60
    with torch.device("meta"):
        tiny = qi.QwenImageTransformer(TINY.dit_config)
    tiny.to_empty(device="cpu")
    assert all(p.device.type == "cpu" for p in tiny.parameters())


def test_real_configs():
    assert qi.QwenImageConfig.from_diffusers(qi._load_config("transformer")) == qi.QwenImageConfig()
    text = Qwen2_5_VLTextConfig(**qi.SPECS["qwen-image"].text_encoders[0].config)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        3584, 28, 28, 4,
    )  # fmt: skip
    assert (text.intermediate_size, text.vocab_size, text.rms_norm_eps) == (18944, 152064, 1e-6)
    assert text.rope_parameters["rope_theta"] == 1e6
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    vae = qi.SPECS["qwen-image"].vae.config
    assert vae["z_dim"] == len(vae["latents_mean"]) == len(vae["latents_std"]) == 16
    spec = qi.SPECS["qwen-image"]
    assert spec.text_encoders[0].max_length == qi.DROP_IDX + 512
    assert (spec.steps, spec.guidance, spec.true_cfg, spec.cfg_renorm) == (50, 4.0, True, True)
    with pytest.raises(EngineError, match="zero_cond_t"):
        qi.QwenImageConfig.from_diffusers({**qi._load_config("transformer"), "zero_cond_t": True})


def test_convert_refuses_unknown_and_partial_state_dicts(dits):
    sd = dits[0].state_dict()
    with pytest.raises(EngineError, match="unexpected keys"):
        qi.FAMILY.convert_diffusers_state_dict({**sd, "pos_embed.extra": torch.zeros(1)})
    partial = {k: v for k, v in sd.items() if not k.endswith("attn.to_k.weight")}
    with pytest.raises(EngineError, match="shard by shard"):
        qi.FAMILY.convert_diffusers_state_dict(partial)


# ---------------------------------------------------------------------------------------------
# Family glue


def test_latents_pack_unpack_match_pipeline():
    fam = qi.FAMILY(TINY)
    h, w = 64, 96
    lat = fam.prepare_latents(2, h, w, torch.Generator().manual_seed(5), "cpu", torch.float32)
    assert lat.shape == (2, (h // 16) * (w // 16), 64)
    noise = torch.randn((2, 1, 16, h // 8, w // 8), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(lat, QwenImagePipeline._pack_latents(noise, 2, 16, h // 8, w // 8), rtol=0, atol=0)

    out = fam.unpack_latents(lat, h, w)
    assert out.shape == (2, 16, 1, h // 8, w // 8)
    unpacked = QwenImagePipeline._unpack_latents(lat, h, w, 8)
    torch.testing.assert_close(unpacked, noise.transpose(1, 2), rtol=0, atol=0)
    mean = torch.tensor(TINY.vae.config["latents_mean"]).view(1, 16, 1, 1, 1)
    std = torch.tensor(TINY.vae.config["latents_std"]).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(out, unpacked * std + mean)
    with pytest.raises(EngineError, match="multiples of 16"):
        fam.prepare_latents(1, 1000, 1024, torch.Generator(), "cpu", torch.float32)


@pytest.mark.parametrize("left", [False, True])
def test_encode_prompt_matches_pipeline(pipe, text_encoders, left):
    fam = qi.FAMILY(TINY)
    max_length = TINY.text_encoders[0].max_length
    with torch.no_grad():
        want, want_mask = pipe.encode_prompt("a red fox", device="cpu")
        got = fam.encode_prompt({"text_encoder": text_encoders[1]}, {"text_encoder": token_batch(["a red fox"], max_length, left)})
    assert want_mask is None and set(got) == {"prompt_embeds"}
    # The template's suffix ("<|im_end|>\n<|im_start|>assistant\n") stays in the embeddings.
    n_tokens = len(StubTokenizer().encode(qi.PROMPT_TEMPLATE.format("a red fox")))
    assert want.shape == (1, n_tokens - qi.DROP_IDX, 32)
    torch.testing.assert_close(got["prompt_embeds"], want, atol=1e-5, rtol=1e-4)


def test_encode_prompt_batch_of_unequal_prompts_matches_pipeline(pipe, text_encoders):
    fam = qi.FAMILY(TINY)
    prompts = ["a red fox", "a lighthouse at dusk, oil painting"]
    with torch.no_grad():
        want, want_mask = pipe.encode_prompt(prompts, device="cpu")
        got = fam.encode_prompt(
            {"text_encoder": text_encoders[1]}, {"text_encoder": token_batch(prompts, TINY.text_encoders[0].max_length)}
        )
    torch.testing.assert_close(got["prompt_mask"], want_mask, rtol=0, atol=0)
    torch.testing.assert_close(got["prompt_embeds"], want, atol=1e-5, rtol=1e-4)


def test_encode_prompt_with_engine_synthetic_tokenizer(text_encoders):
    from dittune.engine.components import build_tokenizer

    fam = qi.FAMILY(TINY)
    tokenizer = build_tokenizer(TINY.text_encoders[0], None)
    tokens = tokenizer(fam.prompt_text("text_encoder", "a red fox in the snow"))
    with torch.no_grad():
        cond = fam.encode_prompt({"text_encoder": text_encoders[1]}, {"text_encoder": tokens})
    assert set(cond) == {"prompt_embeds"}
    assert cond["prompt_embeds"].shape == (1, int(tokens.attention_mask.sum()) - qi.DROP_IDX, 32)


def test_encode_prompt_refuses_untemplated_tokens(text_encoders):
    fam = qi.FAMILY(TINY)
    tokens = TokenBatch(input_ids=torch.full((1, 20), 100), attention_mask=torch.ones(1, 20, dtype=torch.long))
    with pytest.raises(EngineError, match="PROMPT_TEMPLATE"):
        fam.encode_prompt({"text_encoder": text_encoders[1]}, {"text_encoder": tokens})


def test_scheduler_recipe_matches_diffusers():
    """What the engine's scheduler must compute for Qwen-Image (exponential mu shift + terminal stretch)."""
    spec, n = qi.SPECS["qwen-image"], 50
    s = spec.scheduler
    seq = qi.FAMILY(spec).image_seq_len(1024, 1024)
    mu = calculate_shift(seq, s.base_image_seq_len, s.max_image_seq_len, s.base_shift, s.max_shift)
    sigmas = np.linspace(1.0, 1 / n, n).astype(np.float32)
    shifted = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    term = s.shift_terminal
    want = 1 - (1 - shifted) * (1 - term) / (1 - shifted[-1])

    ref = FlowMatchEulerDiscreteScheduler.from_config(qi._load_config("scheduler"))
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    np.testing.assert_allclose(ref.sigmas[:-1].numpy(), want, rtol=1e-6, atol=1e-6)
    assert ref.sigmas[-1] == 0 and abs(float(ref.sigmas[-2]) - term) < 1e-6


def test_engine_scheduler_matches_diffusers():
    from dittune.engine import scheduler

    spec, n = qi.SPECS["qwen-image"], 50
    seq = qi.FAMILY(spec).image_seq_len(1024, 1024)
    ref = FlowMatchEulerDiscreteScheduler.from_config(qi._load_config("scheduler"))
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=scheduler.calculate_shift(seq, spec.scheduler))
    torch.testing.assert_close(scheduler.sigmas(spec.scheduler, n, seq), ref.sigmas, atol=1e-6, rtol=1e-6)


def test_attention_goes_through_engine_layer(dits):
    from dittune.engine.attention import calls

    _, ours = dits
    before = calls(ours).get("torch_sdpa", 0)
    with torch.no_grad():
        ours(torch.randn(1, 6, 64), torch.randn(1, 3, 32), None, torch.rand(1), 2, 3)
    assert calls(ours)["torch_sdpa"] - before == TINY.dit_config.num_layers


def test_denoise_and_decode_match_pipeline(pipe, dits, text_encoders):
    """encode_prompt + prepare_latents + predict with true CFG and norm rescale + unpack_latents, end to end."""
    fam = qi.FAMILY(TINY)
    _, ours = dits
    h, w, steps, cfg_scale = 64, 96, 3, 4.0
    captured = {}

    def keep_latents(_pipe, i, t, kwargs):
        captured["latents"] = kwargs["latents"]
        return {}

    with torch.no_grad():
        want_image = pipe(
            prompt="a red fox", negative_prompt=" ", true_cfg_scale=cfg_scale, height=h, width=w,
            num_inference_steps=steps, generator=torch.Generator().manual_seed(7), output_type="pt",
            callback_on_step_end=keep_latents,
        ).images  # fmt: skip

        max_length = TINY.text_encoders[0].max_length
        enc = {"text_encoder": text_encoders[1]}
        cond = fam.encode_prompt(enc, {"text_encoder": token_batch(["a red fox"], max_length)})
        uncond = fam.encode_prompt(enc, {"text_encoder": token_batch([" "], max_length)})
        lat = fam.prepare_latents(1, h, w, torch.Generator().manual_seed(7), "cpu", torch.float32)
        sched = FlowMatchEulerDiscreteScheduler.from_config(qi._load_config("scheduler"))
        s = TINY.scheduler
        mu = calculate_shift(fam.image_seq_len(h, w), s.base_image_seq_len, s.max_image_seq_len, s.base_shift, s.max_shift)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        for i in range(steps):
            sigma, nxt = sched.sigmas[i].reshape(1), sched.sigmas[i + 1]
            pos = fam.predict(ours, lat, sigma, cond, cfg_scale, h, w)
            neg = fam.predict(ours, lat, sigma, uncond, cfg_scale, h, w)
            assert pos.shape == lat.shape
            mix = neg + cfg_scale * (pos - neg)
            v = mix * (pos.norm(dim=-1, keepdim=True) / mix.norm(dim=-1, keepdim=True))
            lat = lat + (nxt - sigma) * v
        assert lat.abs().mean() > 0.1
        torch.testing.assert_close(lat, captured["latents"], atol=1e-4, rtol=1e-4)

        image = pipe.vae.decode(fam.unpack_latents(lat, h, w)).sample[:, :, 0]
        image = (image / 2 + 0.5).clamp(0, 1)
    assert image.shape == want_image.shape == (1, 3, h, w)
    torch.testing.assert_close(image, want_image, atol=1e-4, rtol=1e-4)
