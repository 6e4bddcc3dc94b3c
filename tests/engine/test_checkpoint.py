"""A diffusers-format FLUX checkpoint, written by diffusers' own FluxPipeline.save_pretrained at
sizes that differ from every built-in spec (DiT, VAE with 4 latent channels and a 2x stride, CLIP,
T5, scheduler), with CLIP BPE and T5 tokenizers as diffusers writes them, loads from
`--model-path` alone and generates diffusers' image for the same weights, prompt and seed.
Broken checkpoints and disagreeing --model values are clear errors."""

import json
import shutil

import numpy as np
import pytest
import torch
from ckpt_tokenizers import clip_tokenizer, t5_tokenizer
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from dittune.engine import components
from dittune.engine.checkpoint import resolve
from dittune.engine.errors import EngineError
from dittune.engine.models import flux
from dittune.engine.run import GenerateRequest, generate

PROMPT = "a photo of a red fox in snow"
T5_LEN = 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    transformer = FluxTransformer2DModel(
        in_channels=16, num_layers=2, num_single_layers=1, attention_head_dim=24, num_attention_heads=2,
        joint_attention_dim=40, pooled_projection_dim=24, guidance_embeds=True, axes_dims_rope=(4, 10, 10))
    with torch.no_grad():  # diffusers zero-inits some output layers: make every weight count
        for p in transformer.parameters():
            p.normal_(0, 0.2)
    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16],
        layers_per_block=1, latent_channels=4, norm_num_groups=4, scaling_factor=0.5, shift_factor=0.1,
        use_quant_conv=False, use_post_quant_conv=False)
    end = clip_tok.convert_tokens_to_ids("<|endoftext|>")
    clip = CLIPTextModel(CLIPTextConfig(
        hidden_size=24, intermediate_size=40, num_attention_heads=2, num_hidden_layers=1, max_position_embeddings=77,
        vocab_size=len(clip_tok), projection_dim=24, hidden_act="quick_gelu",
        bos_token_id=clip_tok.convert_tokens_to_ids("<|startoftext|>"), eos_token_id=end, pad_token_id=end))
    t5 = T5EncoderModel(T5Config(
        d_model=40, d_kv=20, d_ff=48, num_heads=2, num_layers=1, vocab_size=len(t5_tok), feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0))
    sched = flux._load("scheduler_dev.json") | {"base_image_seq_len": 16, "max_image_seq_len": 256}
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(sched), vae=vae, text_encoder=clip,
                        tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)
    path = tmp_path_factory.mktemp("ckpt") / "flux"
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
    want = pipe(prompt=PROMPT, generator=torch.Generator("cpu").manual_seed(7), max_sequence_length=T5_LEN, height=24,
                width=32, num_inference_steps=2, guidance_scale=3.5, output_type="np").images[0]
    want = torch.from_numpy(np.round(want * 255)).permute(2, 0, 1).int()
    got = generate(GenerateRequest(model_path=path, prompt=PROMPT, width=32, height=24, steps=2, guidance=3.5, seed=7,
                                   max_sequence_length=T5_LEN, device="cpu"))
    assert got.dump["manifest"]["weights"] == f"checkpoint:{path}"
    assert got.dump["model"] == "flux-dev"  # the family and variant come from the checkpoint
    assert want.float().std() > 5  # a real image, not a constant
    diff = (got.image[0].int() - want).abs()
    assert diff.max().item() <= 1, diff.max().item()


def test_configs_come_from_the_checkpoint(checkpoint):
    _, path = checkpoint
    spec = resolve("flux-dev-tiny", path).spec  # --model of the same family: the checkpoint's sizes win
    assert (spec.dit_config.num_layers, spec.dit_config.attention_head_dim, spec.dit_config.in_channels) == (2, 24, 16)
    assert spec.vae_scale == 2 and spec.vae.config["latent_channels"] == 4
    assert spec.scheduler.base_image_seq_len == 16
    assert [te.config["hidden_size" if te.arch == "clip" else "d_model"] for te in spec.text_encoders] == [24, 40]
    assert resolve(None, path, 100).spec.text_encoders[1].max_length == 100


@pytest.mark.parametrize("model, max_len, fragment", [
    ("qwen-image-tiny", None, "--model qwen-image-tiny is a qwen_image model but --model-path"),
    ("flux-schnell", None, "--model flux-schnell does not match --model-path"),
    (None, 513, "--max-sequence-length 513"),
])
def test_disagreeing_model_is_refused(checkpoint, model, max_len, fragment):
    _, path = checkpoint
    with pytest.raises(EngineError, match=fragment) as e:
        resolve(model, path, max_len)
    assert str(path) in str(e.value) or max_len


def test_dit_is_checked_before_the_text_encoders(checkpoint, tmp_path, monkeypatch):
    _, path = checkpoint
    p = shutil.copytree(path, tmp_path / "ckpt")
    cfg = json.loads((p / "transformer" / "config.json").read_text())
    (p / "transformer" / "config.json").write_text(json.dumps(cfg | {"num_single_layers": 2}))
    monkeypatch.setattr(components, "build_text_encoder", lambda *a, **k: pytest.fail("text encoders loaded first"))
    with pytest.raises(EngineError, match="does not match"):
        generate(GenerateRequest(model_path=p, width=32, height=24, steps=1, device="cpu"))


def test_tokenizer_falls_back_to_fast_files(checkpoint, monkeypatch, capsys):
    """transformers 5 raised TypeError loading FLUX's declared T5Tokenizer (seen with the real
    checkpoint; simulated here): the tokenizer.json beside it gives the same ids, with a note."""
    import transformers

    _, path = checkpoint
    want = components.HFTokenizer(path / "tokenizer_2", T5_LEN)(PROMPT).input_ids

    def broken(*a, **k):
        raise TypeError("T5Tokenizer.__init__() got an unexpected keyword argument")

    monkeypatch.setattr(transformers.T5Tokenizer, "__init__", broken)
    got = components.HFTokenizer(path / "tokenizer_2", T5_LEN)(PROMPT).input_ids
    assert torch.equal(got, want)
    note = capsys.readouterr().err
    assert "T5Tokenizer cannot load here (TypeError" in note and "tokenizer.json" in note
    (tmp := path.parent / "tok-nofast").mkdir(exist_ok=True)
    shutil.copy(path / "tokenizer_2" / "tokenizer_config.json", tmp)
    with pytest.raises(EngineError, match="cannot load tokenizer from .*TypeError"):
        components.HFTokenizer(tmp, T5_LEN)


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
        generate(GenerateRequest(model=model, model_path=p, width=32, height=24, steps=1, device="cpu"))
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_tune_trials_load_the_checkpoint(checkpoint, tmp_path):
    """`dittune tune --model-path DIR`: the trial's engine runs the checkpoint's weights, and the
    study's key names the checkpoint (path and a hash of its configs)."""
    from dittune import db as D
    from dittune.db.models import Study, Trial
    from dittune.engine.checkpoint import fingerprint
    from dittune.tuner import TuneOptions, tune
    from sqlalchemy import select

    _, path = checkpoint
    url = f"sqlite:///{tmp_path / 't.db'}"
    res = tune(TuneOptions(None, model_path=path, width=32, height=24, steps=1, trials=1, confirm=0, device="cpu",
                           db_url=url, fix=("enable-torch-compile=false",)), log=lambda m: None)
    digest = fingerprint(path)
    assert res.measured == 1 and f"ckpt{digest[:8]}" in res.study
    db = D.open_db(url)
    with db.session() as s:
        study = s.scalars(select(Study)).one()
        trial = s.scalars(select(Trial)).one()
    assert study.versions["checkpoint"] == {"path": str(path.resolve()), "sha256": digest}
    assert trial.manifest["weights"] == f"checkpoint:{path.resolve()}"
    assert trial.manifest["parameters"]["dit"] == sum(p.numel() for p in checkpoint[0].transformer.parameters())


@pytest.mark.gpu
def test_gpu_noise_is_diffusers_cpu_generator_noise(monkeypatch):
    """On the GPU too, --seed S draws diffusers' noise for generator=torch.Generator("cpu").manual_seed(S)."""
    from diffusers.utils.torch_utils import randn_tensor

    from dittune.engine.models.flux import FluxFamily, _pack

    seen = []
    original = FluxFamily.prepare_latents

    def spy(self, batch, height, width, generator, device, dtype):
        out = original(self, batch, height, width, generator, device, dtype)
        seen.append(out)
        return out

    monkeypatch.setattr(FluxFamily, "prepare_latents", spy)
    generate(GenerateRequest(model="flux-dev-tiny", width=64, height=64, steps=1, seed=11, device="cuda"))
    (got,) = seen
    c = 16  # flux-dev-tiny: 16 latent channels, 8x VAE
    want = randn_tensor((1, c, 8, 8), generator=torch.Generator("cpu").manual_seed(11), device=torch.device("cuda"),
                        dtype=torch.bfloat16)
    assert torch.equal(got, _pack(want))
