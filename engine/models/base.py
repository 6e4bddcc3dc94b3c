"""What every model family provides to the engine.

A family file (flux.py, qwen_image.py, zimage.py) holds its DiT, its architecture config with
the real sizes, the configs of its other components as data, and a `Family` subclass that
knows how to turn text-encoder outputs and latents into one DiT call. The pipeline
(engine/pipeline.py) is generic and calls only what is declared here.

Conventions shared by all families:
- the pipeline works in flow-matching sigma in [0, 1] (1 = pure noise); a family converts
  sigma to whatever timestep its DiT expects;
- latents travel packed as tokens, [B, L, C], from `prepare_latents` to `unpack_latents`;
- `predict` returns the velocity in the direction the Euler step uses:
  x_{next} = x + (sigma_next - sigma) * predict(...).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import torch
from torch import nn


@dataclass(frozen=True)
class TextEncoderSpec:
    name: str  # component folder in a diffusers checkpoint: "text_encoder", "text_encoder_2"
    arch: str  # "clip", "t5", "qwen2_5_vl", "qwen3"
    config: Mapping[str, Any]  # transformers config.json contents (real numbers)
    max_length: int  # tokens fed to the encoder for one prompt
    tokenizer: str  # tokenizer folder in the checkpoint: "tokenizer", "tokenizer_2"


@dataclass(frozen=True)
class VaeSpec:
    cls: str  # diffusers class name: "AutoencoderKL", "AutoencoderKLQwenImage"
    config: Mapping[str, Any]  # diffusers config.json contents


@dataclass(frozen=True)
class SchedulerSpec:
    """FlowMatchEulerDiscreteScheduler settings of the family's scheduler_config.json."""

    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"  # or "linear"
    # Qwen-Image: stretch the shifted sigmas so the last one (before the appended 0) is this.
    shift_terminal: float | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "SchedulerSpec":
        """From a scheduler_config.json: the fields it has, defaults for the rest."""
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})


@dataclass(frozen=True)
class ModelSpec:
    name: str  # exact CLI name: "flux-dev", "flux-dev-tiny"
    family: str  # "flux", "qwen_image", "zimage"
    hf_repo: str | None  # the Hugging Face repo this corresponds to
    dit_config: Any  # the family's architecture config dataclass
    text_encoders: tuple[TextEncoderSpec, ...]
    vae: VaeSpec
    scheduler: SchedulerSpec
    width: int = 1024
    height: int = 1024
    steps: int = 28
    guidance: float = 3.5
    # True classifier-free guidance (two DiT passes per step); see `cfg_style`.
    true_cfg: bool = False
    # "standard": neg + g * (pos - neg), on when g > 1 (Qwen-Image's true_cfg_scale);
    # "zimage": pos + g * (pos - neg), on when g > 0 (Z-Image's guidance_scale).
    cfg_style: str = "standard"
    # Qwen-Image style: rescale the CFG prediction to the norm of the conditional one.
    cfg_renorm: bool = False
    vae_scale: int = 8  # pixels per latent pixel
    patch: int = 2  # latent pixels per token side
    tiny: bool = False
    notes: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def size_multiple(self) -> int:
        return self.vae_scale * self.patch

    @property
    def attention_heads(self) -> int:
        return self.dit_config.heads

    def uses_cfg(self, guidance: float) -> bool:
        """Whether this guidance runs true CFG (two DiT passes per step)."""
        return self.true_cfg and guidance > (0.0 if self.cfg_style == "zimage" else 1.0)


class Family(abc.ABC):
    """Family-specific glue around a DiT; one subclass per model file."""

    transformer_cls: type[nn.Module]

    def __init__(self, spec: ModelSpec):
        self.spec = spec

    @staticmethod
    @abc.abstractmethod
    def convert_diffusers_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Diffusers transformer key names -> ours (identity if they already agree)."""

    @abc.abstractmethod
    def encode_prompt(
        self, encoders: Mapping[str, nn.Module], tokens: Mapping[str, "TokenBatch"]
    ) -> dict[str, torch.Tensor]:
        """Run the text encoders (keyed by TextEncoderSpec.name) -> conditioning tensors."""

    @abc.abstractmethod
    def prepare_latents(
        self, batch: int, height: int, width: int, generator: torch.Generator, device, dtype
    ) -> torch.Tensor:
        """Initial noise, packed: [B, L, C]."""

    @abc.abstractmethod
    def predict(
        self,
        dit: nn.Module,
        latents: torch.Tensor,  # [B, L, C]
        sigma: torch.Tensor,  # [B] in [0, 1]
        cond: Mapping[str, torch.Tensor],
        guidance: float,
        height: int,
        width: int,
        step_cache: dict | None = None,
    ) -> torch.Tensor:
        """One DiT forward -> velocity [B, L, C] (see module docstring for the sign).

        `step_cache` is one dict per denoise step, shared by its passes (true CFG): a family may
        keep there what depends on the timestep alone and reuse it in the next pass."""

    @abc.abstractmethod
    def unpack_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """[B, L, C] -> VAE input [B, C, (T,) h, w], scaling/shift factors undone."""

    def prompt_text(self, encoder: str, prompt: str) -> str:
        """The text the tokenizer of `encoder` sees (a family with a chat template applies it here)."""
        return prompt

    def image_seq_len(self, height: int, width: int) -> int:
        p = self.spec.size_multiple
        return (height // p) * (width // p)


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # [B, L] int64
    attention_mask: torch.Tensor  # [B, L] int64, 1 = real token


# ---------------------------------------------------------------------------------------------
# Timestep-only modulation, packed


def pack_modulation(dit: nn.Module) -> bool:
    """Pack every adaLN modulation Linear of a DiT into one weight, evaluated by one GEMV per
    forward (`modulations`), instead of one small GEMV per block.

    The modulation vectors depend only on the conditioning vector (timestep, guidance, pooled
    text), not on the tokens, and their weights are a large share of the model (FLUX.1-dev:
    3.2 B of 11.9 B parameters, read once per forward at batch 1). One large GEMV streams them
    at closer to the memory bandwidth than 57-120 small ones. The per-block Linears keep their
    parameters, as views into the packed weight, so state dicts and the unpacked path see the
    same modules; no memory is added.

    Only for a DiT that stays whole on its device: layerwise and whole-DiT offload move
    parameters one by one, which would break the views. Under tensor parallelism (every Linear a
    parallel.tensor.GatherLinear: this rank's part of each section) the packed GEMV makes this
    rank's part of every modulation and one all-gather makes them whole. A DiT opts in by defining
    `modulation_groups()` -> one list of Linears per consumer, in forward order. Returns whether
    it packed."""
    from ..parallel.tensor import GatherLinear

    groups_fn = getattr(dit, "modulation_groups", None)
    if groups_fn is None:
        return False
    groups: list[list[nn.Linear]] = groups_fn()
    linears = [lin for g in groups for lin in g]
    if not linears or any(lin.bias is None for lin in linears):
        return False
    gathered = [isinstance(lin, GatherLinear) for lin in linears]
    tp = linears[0].tp if gathered[0] else None
    if any(gathered) and not (all(gathered) and all(lin.tp is tp for lin in linears)
                              and len({lin.weight.shape[0] // lin.sections for lin in linears}) == 1):
        return False  # a mix, or unequal sections: one all-gather cannot put them back in place
    w0 = linears[0].weight
    if any(lin.weight.shape[1] != w0.shape[1] or lin.weight.device != w0.device or lin.weight.dtype != w0.dtype
           for lin in linears):
        return False
    total = sum(lin.weight.shape[0] for lin in linears)
    weight = torch.empty(total, w0.shape[1], device=w0.device, dtype=w0.dtype)
    bias = torch.empty(total, device=w0.device, dtype=linears[0].bias.dtype)
    o = 0
    for lin in linears:
        n = lin.weight.shape[0]
        weight[o : o + n].copy_(lin.weight.data)
        bias[o : o + n].copy_(lin.bias.data)
        lin.weight.data, lin.bias.data = weight[o : o + n], bias[o : o + n]
        o += n
    scale = tp.degree if tp is not None else 1  # the consumers take whole modulations
    dit.packed_modulation = (weight, bias, [sum(lin.weight.shape[0] for lin in g) * scale for g in groups])
    dit.packed_gather = (tp, sum(lin.sections for lin in linears)) if tp is not None else None
    return True


def modulations(dit: nn.Module, vec: torch.Tensor) -> list[torch.Tensor | None] | None:
    """Every consumer's modulation vector from one GEMV (packed DiT), or None: each block
    computes its own."""
    packed = getattr(dit, "packed_modulation", None)
    if packed is None:
        return None
    weight, bias, sizes = packed
    out = torch.nn.functional.linear(vec, weight, bias)
    gathered = getattr(dit, "packed_gather", None)
    if gathered is not None:  # tensor parallel: this rank's part of every section -> all of them
        tp, sections = gathered
        out = tp.gather(out, sections)
    return list(out.split(sizes, dim=-1))
