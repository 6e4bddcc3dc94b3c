"""Qwen-Image and Z-Image checkpoints written by diffusers' own QwenImagePipeline /
ZImagePipeline.save_pretrained, at sizes unlike any built-in spec (latent channels, VAE stride,
text encoder width, scheduler shift), with byte-level BPE Qwen tokenizers: `--model-path` alone
loads them and generates the pipelines' image for the same weights, prompt and seed."""

import numpy as np
import pytest
import torch
from ckpt_tokenizers import qwen_tokenizer

from dittune.engine.run import GenerateRequest, generate

PROMPT = "a photo of a red fox in snow"


def _randomize(module: torch.nn.Module, std: float = 0.2) -> None:
    with torch.no_grad():  # diffusers zero-inits some output layers: make every weight count
        for p in module.parameters():
            p.normal_(0, std)


def _image(out) -> torch.Tensor:
    return torch.from_numpy(np.round(out.images[0] * 255)).permute(2, 0, 1).int()


def _close(got, want: torch.Tensor) -> None:
    assert want.float().std() > 5  # a real image, not a constant
    diff = (got.image[0].int() - want).abs()
    assert diff.max().item() <= 1, diff.max().item()


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory):
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from dittune.engine.models import qwen_image

    torch.manual_seed(0)
    tok = qwen_tokenizer()
    z = 8  # latent channels (the real model has 16)
    transformer = QwenImageTransformer2DModel(
        in_channels=4 * z, out_channels=z, num_layers=1, attention_head_dim=24, num_attention_heads=2,
        joint_attention_dim=24, axes_dims_rope=(4, 10, 10))
    _randomize(transformer)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=z, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
                                 temperal_downsample=[False, True], latents_mean=[0.1 * i for i in range(z)],
                                 latents_std=[1.0 + 0.2 * i for i in range(z)])
    text = dict(model_type="qwen2_5_vl_text", vocab_size=len(tok), hidden_size=24, intermediate_size=48,
                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                rope_scaling={"mrope_section": [2, 2, 2], "rope_type": "default", "type": "default"},
                rms_norm_eps=1e-6, tie_word_embeddings=False)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=24,
                  fullatt_block_indexes=[0], spatial_merge_size=2, window_size=112)
    encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision)).eval()
    _randomize(encoder, 0.05)
    sched = qwen_image._load_config("scheduler") | {"base_image_seq_len": 16, "max_image_seq_len": 512}
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(sched), vae=vae,
                             text_encoder=encoder, tokenizer=tok, transformer=transformer)
    path = tmp_path_factory.mktemp("ckpt") / "qwen-image"
    pipe.save_pretrained(path, safe_serialization=True)
    return pipe, path


def test_qwen_image_checkpoint_matches_pipeline(qwen_checkpoint):
    pipe, path = qwen_checkpoint
    kw = dict(prompt=PROMPT, negative_prompt="a dog", height=32, width=24, num_inference_steps=2)
    with torch.no_grad():
        want = _image(pipe(**kw, true_cfg_scale=4.0, generator=torch.Generator("cpu").manual_seed(3),
                           max_sequence_length=40, output_type="np"))
    got = generate(GenerateRequest(model_path=path, prompt=PROMPT, negative_prompt="a dog", width=24, height=32, steps=2,
                                   guidance=4.0, seed=3, max_sequence_length=40, device="cpu"))
    assert got.dump["model"] == "qwen-image" and got.dump["manifest"]["parameters"]["dit"] == pipe.transformer.num_parameters()
    _close(got, want)


@pytest.fixture(scope="module")
def zimage_checkpoint(tmp_path_factory):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from dittune.engine.models.zimage import ZImageConfig, _load

    torch.manual_seed(0)
    tok = qwen_tokenizer()
    cfg = ZImageConfig(in_channels=4, dim=48, n_layers=1, n_refiner_layers=1, n_heads=2, cap_feat_dim=24,
                       axes_dims=(8, 8, 8), axes_lens=(256, 64, 64))
    transformer = ZImageTransformer2DModel(**cfg.to_diffusers())
    _randomize(transformer)
    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16],
        layers_per_block=1, latent_channels=4, norm_num_groups=4, scaling_factor=0.4, shift_factor=0.05,
        use_quant_conv=False, use_post_quant_conv=False)
    encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tok), hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=12, max_position_embeddings=2048, tie_word_embeddings=True)).eval()
    sched = _load("scheduler") | {"shift": 2.0}
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(sched), vae=vae, text_encoder=encoder,
                          tokenizer=tok, transformer=transformer)
    path = tmp_path_factory.mktemp("ckpt") / "z-image"
    pipe.save_pretrained(path, safe_serialization=True)
    return pipe, path


def test_zimage_checkpoint_matches_pipeline(zimage_checkpoint):
    pipe, path = zimage_checkpoint
    with torch.no_grad():
        want = _image(pipe(prompt=PROMPT, height=24, width=32, num_inference_steps=2, guidance_scale=0.0,
                           generator=torch.Generator("cpu").manual_seed(5), max_sequence_length=48, output_type="np"))
    got = generate(GenerateRequest(model_path=path, prompt=PROMPT, width=32, height=24, steps=2, seed=5,
                                   max_sequence_length=48, device="cpu"))
    assert got.dump["model"] == "z-image-turbo"
    _close(got, want)
