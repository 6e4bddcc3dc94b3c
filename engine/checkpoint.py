"""The model a run uses: a built-in spec, or a diffusers-format checkpoint's own configs.

A checkpoint's config files are the truth for that checkpoint (DESIGN.md section 3): the DiT
(transformer/config.json), VAE (vae/config.json and its class in model_index.json), scheduler,
text encoders and the latent geometry all come from the directory; the built-in spec of the same
family supplies only what a checkpoint does not say (default workload, CFG style, the family
glue). The family comes from model_index.json's pipeline class, so `--model-path DIR` alone is
enough; with `--model` as well the two must agree."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .errors import EngineError
from .models import get_spec, registry
from .models.base import Family, ModelSpec, SchedulerSpec, VaeSpec

# diffusers pipeline class (model_index.json "_class_name") -> engine family
PIPELINES = {"FluxPipeline": "flux", "QwenImagePipeline": "qwen_image", "ZImagePipeline": "zimage"}

# Per family: the text encoder whose length --max-sequence-length sets, the tokens its tokenizer
# adds in front of the prompt's (Qwen-Image's dropped template prefix), and diffusers' limit.
_SEQUENCE = {"flux": ("text_encoder_2", 0, 512), "qwen_image": ("text_encoder", None, 1024), "zimage": ("text_encoder", 0, None)}


def resolve(model: str | None, model_path: Path | None, max_sequence_length: int | None = None) -> Family:
    """The Family a request runs: `model`'s built-in spec, or the checkpoint's configs (checked
    against `model` when both are given), with the text length the user asked for."""
    if model is None and model_path is None:
        raise EngineError("name a model (see `dittune models`) or give --model-path DIR (a diffusers checkpoint)")
    spec = get_spec(model) if model_path is None else checkpoint_spec(Path(model_path), model)
    if max_sequence_length is not None:
        spec = with_max_sequence_length(spec, max_sequence_length)
    return registry()[spec.name][1](spec)


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise EngineError(f"checkpoint file {path} is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"malformed {path}: {e}") from None
    if not isinstance(data, dict):
        raise EngineError(f"malformed {path}: not a JSON object")
    return data


def read_index(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise EngineError(f"--model-path {path} does not exist" if not path.exists() else f"--model-path {path} is not a directory")
    if not (path / "model_index.json").is_file():
        raise EngineError(f"--model-path {path} has no model_index.json (not a diffusers-format checkpoint)")
    return read_json(path / "model_index.json")


def checkpoint_spec(path: Path, model: str | None = None) -> ModelSpec:
    index = read_index(path)
    pipeline = index.get("_class_name")
    family = PIPELINES.get(pipeline)
    if family is None:
        raise EngineError(f"{path}: model_index.json names pipeline {pipeline!r}; dittune runs {', '.join(PIPELINES)}")
    if model is not None and get_spec(model).family != family:
        raise EngineError(f"--model {model} is a {get_spec(model).family} model but --model-path {path} holds a {pipeline} checkpoint")
    check_components(path, index, get_spec(model or _default_model(family, {})))
    dit_cfg = read_json(path / "transformer" / "config.json")
    base = get_spec(model or _default_model(family, dit_cfg))
    dit_config = type(base.dit_config).from_diffusers(dit_cfg)
    if family == "flux" and bool(dit_config.guidance_embeds) != bool(base.dit_config.guidance_embeds):
        kind = "a guidance-distilled (dev)" if dit_config.guidance_embeds else "a timestep-distilled (schnell)"
        raise EngineError(f"--model {model} does not match --model-path {path}: its transformer is {kind} FLUX")

    vae_entry = index.get("vae")
    vae_cls = vae_entry[1] if isinstance(vae_entry, list) and len(vae_entry) == 2 else base.vae.cls
    vae_cfg = read_json(path / "vae" / "config.json")
    sched_cfg = read_json(path / "scheduler" / "scheduler_config.json")
    if sched_cfg.get("_class_name", "FlowMatchEulerDiscreteScheduler") != "FlowMatchEulerDiscreteScheduler":
        raise EngineError(f"{path}/scheduler is a {sched_cfg['_class_name']}; the engine runs FlowMatchEulerDiscreteScheduler")
    encoders = tuple(
        dataclasses.replace(te, config=_text_config(te.arch, read_json(path / te.name / "config.json")))
        for te in base.text_encoders
    )
    return dataclasses.replace(
        base, dit_config=dit_config, text_encoders=encoders, vae=VaeSpec(vae_cls, vae_cfg),
        scheduler=SchedulerSpec.from_config(sched_cfg), vae_scale=_vae_scale(family, vae_cfg),
        tiny=False, notes=f"checkpoint {path}",
    )


def check_components(path: Path, index: dict[str, Any], spec: ModelSpec) -> None:
    """The component folders a `spec.family` pipeline needs, listed in model_index.json and present."""
    needed = ["transformer", "vae", "scheduler", *(te.name for te in spec.text_encoders), *(te.tokenizer for te in spec.text_encoders)]
    missing = [c for c in needed if c not in index or not (path / c).is_dir()]
    if missing:
        raise EngineError(f"checkpoint {path} lacks component folder(s) {', '.join(missing)} needed by {spec.family} models")


def with_max_sequence_length(spec: ModelSpec, n: int) -> ModelSpec:
    """--max-sequence-length: the prompt tokens the family's long text encoder sees (FLUX's T5,
    Qwen-Image's embeddings after the template prefix, Z-Image's Qwen3), as the diffusers
    pipelines' `max_sequence_length`."""
    name, prefix, limit = _SEQUENCE[spec.family]
    if n < 1 or (limit is not None and n > limit):
        raise EngineError(f"--max-sequence-length {n}: {spec.name} takes " + (f"1 to {limit} tokens" if limit else "at least 1 token"))
    if prefix is None:  # Qwen-Image: the tokenizer also sees the template prefix it drops
        prefix = spec.extra["drop_idx"]
    encoders = tuple(dataclasses.replace(te, max_length=prefix + n) if te.name == name else te for te in spec.text_encoders)
    return dataclasses.replace(spec, text_encoders=encoders)


def _default_model(family: str, dit_cfg: dict[str, Any]) -> str:
    if family == "flux":
        return "flux-dev" if dit_cfg.get("guidance_embeds", False) else "flux-schnell"
    return {"qwen_image": "qwen-image", "zimage": "z-image-turbo"}[family]


def _text_config(arch: str, config: dict[str, Any]) -> dict[str, Any]:
    # Qwen2.5-VL's config.json is the vision-language model's; the engine runs its language model.
    if arch == "qwen2_5_vl" and isinstance(config.get("text_config"), dict):
        return config["text_config"]
    return config


def _vae_scale(family: str, vae: dict[str, Any]) -> int:
    """Pixels per latent pixel, as the pipelines compute their vae_scale_factor."""
    try:
        if family == "qwen_image":
            return 2 ** len(vae["temperal_downsample"])
        return 2 ** (len(vae["block_out_channels"]) - 1)
    except (KeyError, TypeError):
        raise EngineError(f"the checkpoint's vae/config.json lacks the layout of a {family} VAE") from None


def fingerprint(path: Path) -> str:
    """sha256 of the checkpoint's model_index.json and its components' JSON files (configs,
    tokenizer files, shard indexes): which checkpoint a study measured, without reading weights."""
    import hashlib

    path = Path(path)
    files = [path / "model_index.json", *sorted(p for p in path.glob("*/*.json") if p.is_file())]
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()
