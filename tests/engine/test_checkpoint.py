"""A tiny diffusers-format checkpoint, written by diffusers' own save_pretrained (sharded
transformer included), loads through dittune and generates the same image as diffusers'
FluxPipeline on the same weights, prompt and seed. Broken checkpoints are clear errors."""

import json
import shutil

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from dittune.engine.errors import EngineError
from dittune.engine.models import get_spec
from dittune.engine.models import flux
from dittune.engine.run import GenerateRequest, generate

SPEC = get_spec("flux-dev-tiny")
PROMPT = "w5 w17 w3 w999 w42"


def _tokenizer(max_len: int, bos: int, pad: int, eos: int) -> PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(1000)}
    special = {bos: "<s>", pad: "<pad>", eos: "</s>"}
    for i, name in special.items():
        vocab.pop(f"w{i}")
        vocab[name] = i
    vocab.pop("w3")
    vocab["<unk>"] = 3
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=max_len)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    clip_te, t5_te = SPEC.text_encoders
    c = SPEC.dit_config
    transformer = FluxTransformer2DModel(
        in_channels=c.in_channels, num_layers=c.num_layers, num_single_layers=c.num_single_layers,
        attention_head_dim=c.attention_head_dim, num_attention_heads=c.num_attention_heads,
        joint_attention_dim=c.joint_attention_dim, pooled_projection_dim=c.pooled_projection_dim,
        guidance_embeds=c.guidance_embeds, axes_dims_rope=c.axes_dims_rope)
    with torch.no_grad():  # diffusers zero-inits some output layers: make every weight count
        for p in transformer.parameters():
            p.normal_(0, 0.2)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(flux._load("scheduler_dev.json")),
        vae=AutoencoderKL(**SPEC.vae.config),
        text_encoder=CLIPTextModel(CLIPTextConfig(**clip_te.config)),
        tokenizer=_tokenizer(clip_te.max_length, 0, 1, 2),
        text_encoder_2=T5EncoderModel(T5Config(**t5_te.config)),
        tokenizer_2=_tokenizer(t5_te.max_length, 4, 0, 1),
        transformer=transformer,
    )
    path = tmp_path_factory.mktemp("ckpt") / "flux-tiny"
    pipe.save_pretrained(path, safe_serialization=True)
    transformer.save_pretrained(path / "transformer", safe_serialization=True, max_shard_size="100KB")
    return pipe, path


def test_checkpoint_is_sharded(checkpoint):
    _, path = checkpoint
    assert (path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    index = json.loads((path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


def test_loaded_checkpoint_matches_diffusers_pipeline(checkpoint):
    pipe, path = checkpoint
    kw = dict(height=64, width=64, num_inference_steps=3, guidance_scale=3.5)
    want = pipe(prompt=PROMPT, generator=torch.Generator("cpu").manual_seed(7), max_sequence_length=SPEC.text_encoders[1].max_length,
                output_type="np", **kw).images[0]
    want = torch.from_numpy(np.round(want * 255)).permute(2, 0, 1).int()
    got = generate(GenerateRequest(model="flux-dev-tiny", model_path=path, prompt=PROMPT, width=64, height=64, steps=3,
                                   guidance=3.5, seed=7, device="cpu"))
    assert got.dump["manifest"]["weights"] == f"checkpoint:{path}"
    assert want.float().std() > 5  # a real image, not a constant
    diff = (got.image[0].int() - want).abs()
    assert diff.max().item() <= 1, diff.max().item()


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("breakage, fragment", [
    ("no_dir", "does not exist"),
    ("no_index", "no model_index.json"),
    ("no_vae", "lacks component folder(s) vae"),
    ("bad_index_json", "malformed"),
    ("corrupt_weights", "cannot read"),
    ("missing_shard", "missing"),
    ("wrong_model", "does not match model"),
])
def test_broken_checkpoints_are_clear_errors(checkpoint, tmp_path, breakage, fragment):
    _, path = checkpoint
    model = "flux-dev-tiny"
    p = tmp_path / "ckpt"
    if breakage == "no_dir":
        p = tmp_path / "nothing"
    else:
        _copy(path, p)
    if breakage == "no_index":
        (p / "model_index.json").unlink()
    elif breakage == "no_vae":
        shutil.rmtree(p / "vae")
    elif breakage == "bad_index_json":
        (p / "model_index.json").write_text("{not json")
    elif breakage == "corrupt_weights":
        index = json.loads((p / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
        (p / "transformer" / sorted(set(index["weight_map"].values()))[0]).write_bytes(b"\x00garbage" * 10)
    elif breakage == "missing_shard":
        index = json.loads((p / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
        (p / "transformer" / sorted(set(index["weight_map"].values()))[-1]).unlink()
    elif breakage == "wrong_model":
        # the transformer's config.json says two double blocks, its weights hold one
        cfg = json.loads((p / "transformer" / "config.json").read_text())
        (p / "transformer" / "config.json").write_text(json.dumps(cfg | {"num_layers": cfg["num_layers"] + 1}))
    with pytest.raises(EngineError) as e:
        generate(GenerateRequest(model=model, model_path=p, width=64, height=64, steps=1, device="cpu"))
    assert fragment in str(e.value) and "\n" not in str(e.value)
