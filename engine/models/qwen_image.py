"""Qwen-Image (Qwen/Qwen-Image): 60 dual-stream MMDiT blocks, hidden 3072, true CFG.

Parity target: diffusers' QwenImageTransformer2DModel and QwenImagePipeline (diffusers 0.42).
What the pipeline does around the DiT, and what this file reproduces:
- text: Qwen2.5-VL-7B language model over PROMPT_TEMPLATE.format(prompt); the last hidden state
  (after the final norm) of the non-padding tokens, minus the DROP_IDX leading template tokens,
  at most MAX_SEQUENCE_LENGTH tokens; a mask only when prompts of a batch differ in length;
- latents: noise [B, 1, 16, H/8, W/8] packed into 2x2 patches, [B, H/16 * W/16, 64];
- DiT timestep: sigma (the pipeline passes scheduler t / 1000), rounded through the latent dtype;
- true CFG: the pipeline mixes neg + s * (pos - neg), then rescales each token of the mix to the
  norm of the conditional prediction over its 64 packed channels;
- VAE input: [B, 16, 1, H/8, W/8] with latents_mean / latents_std undone.

Checkpoint layout: the fused Q/K/V and modulation weights here are concatenations of diffusers'
separate ones (see QwenImageFamily.convert_diffusers_state_dict).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import Attention
from ..parallel.sequence import NO_SHARDS
from ..parallel.tensor import TensorPlan, column, gather, row
from ..ops import reference
from .rope import joint_qk_norm_rope, rms_norm
from ..errors import EngineError
from .base import Family, ModelSpec, SchedulerSpec, TextEncoderSpec, TokenBatch, VaeSpec, modulations

# QwenImageFamily.prompt_text applies this before tokenizing; encode_prompt drops the DROP_IDX
# tokens of its system prefix ("<|im_start|>system\n...<|im_end|>\n<|im_start|>user\n") and keeps
# the suffix ("<|im_end|>\n<|im_start|>assistant\n", 5 tokens), as the pipeline does.
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
    "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
    "<|im_end|>\n<|im_start|>assistant\n"
)
DROP_IDX = 34
# QwenImagePipeline.__call__(max_sequence_length=512): text tokens the DiT sees at most.
MAX_SEQUENCE_LENGTH = 512

_CONFIGS = Path(__file__).parent.parent / "configs" / "qwen_image"


@dataclass(frozen=True)
class QwenImageConfig:
    patch_size: int = 2
    in_channels: int = 64  # 16 latent channels x 2x2 patch
    out_channels: int = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584  # Qwen2.5-VL-7B hidden size
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)  # frame, height, width; sums to head dim
    rope_theta: int = 10000
    mlp_ratio: int = 4
    eps: float = 1e-6

    def __post_init__(self):
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise EngineError(
                f"axes_dims_rope {self.axes_dims_rope} must be even and sum to attention_head_dim "
                f"{self.attention_head_dim}"
            )

    @property
    def heads(self) -> int:
        return self.num_attention_heads

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any]) -> QwenImageConfig:
        """From a diffusers transformer/config.json; refuses the variants this DiT does not build."""
        for key in ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope"):
            if cfg.get(key):
                raise EngineError(
                    f"Qwen-Image transformer config sets {key}=true (an Edit/Layered/distilled variant); "
                    "only the text-to-image Qwen-Image DiT is supported"
                )
        return cls(
            patch_size=cfg["patch_size"],
            in_channels=cfg["in_channels"],
            out_channels=cfg.get("out_channels") or cfg["in_channels"],
            num_layers=cfg["num_layers"],
            attention_head_dim=cfg["attention_head_dim"],
            num_attention_heads=cfg["num_attention_heads"],
            joint_attention_dim=cfg["joint_attention_dim"],
            axes_dims_rope=tuple(cfg["axes_dims_rope"]),
        )


def _load_config(name: str) -> dict[str, Any]:
    """A public config.json, without its "_" bookkeeping keys (class name, versions)."""
    cfg = json.loads((_CONFIGS / f"{name}.json").read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


# ---------------------------------------------------------------------------------------------
# Elementwise pieces (targets for fused kernels)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine, then adaLN: * (1 + scale) + shift. x [B, L, C]; shift, scale [B, 1, C]."""
    return torch.addcmul(shift, F.layer_norm(x, (x.shape[-1],), eps=eps), 1 + scale)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y. x, y [B, L, C]; gate [B, 1, C]."""
    return torch.addcmul(x, gate, y)


def gated_residual_modulate(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention residual, then the MLP's modulation of it: (r, modulate(r)), r = x + gate * y."""
    r = gated_residual(x, gate, y)
    return r, modulate(r, shift, scale, eps)


def joint_heads(txt: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """txt [B, Lt, H, D], img [B, Li, H, D] (strided views) -> [B, H, Lt + Li, D], a view of a new
    contiguous [B, Lt + Li, H, D].

    Two strided copies into one buffer: a torch.cat of strided views ran at half the speed.
    """
    b, lt, h, d = txt.shape
    out = txt.new_empty(b, lt + img.shape[1], h, d)
    out[:, :lt].copy_(txt)
    out[:, lt:].copy_(img)
    return out.transpose(1, 2)


def timestep_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """Sinusoidal embedding of diffusers' Timesteps(dim, flip_sin_to_cos=True, shift=0, scale=1000).

    t [B] (already rounded to the model dtype, as diffusers does) -> [B, dim] fp32.
    """
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = 1000 * (t[:, None].float() * torch.exp(exponent)[None, :])
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_tables(
    grid_h: int, grid_w: int, txt_len: int, axes_dims: tuple[int, int, int], theta: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-Image's 3-axis RoPE for the joint [text, image] sequence -> cos, sin [Lt + Li, D/2] fp32.

    Image tokens: frame 0; rows and columns centred on 0 (rows -(h - h//2) .. h//2 - 1).
    Text tokens: position max(h//2, w//2) + i on all three axes, i.e. after the image.
    """
    inv = [
        1.0 / torch.pow(theta, torch.arange(0, d, 2, dtype=torch.float32, device=device).div(d))
        for d in axes_dims
    ]
    pos_txt = torch.arange(txt_len, dtype=torch.float32, device=device) + max(grid_h // 2, grid_w // 2)
    ang_txt = torch.cat([pos_txt[:, None] * f for f in inv], dim=-1)  # [Lt, D/2]
    rows = torch.arange(grid_h, dtype=torch.float32, device=device) - (grid_h - grid_h // 2)
    cols = torch.arange(grid_w, dtype=torch.float32, device=device) - (grid_w - grid_w // 2)
    ang_img = torch.cat(
        [
            torch.zeros(grid_h, grid_w, axes_dims[0] // 2, device=device),
            (rows[:, None] * inv[1])[:, None, :].expand(grid_h, grid_w, -1),
            (cols[:, None] * inv[2])[None, :, :].expand(grid_h, grid_w, -1),
        ],
        dim=-1,
    ).reshape(grid_h * grid_w, -1)  # [Li, D/2]
    ang = torch.cat([ang_txt, ang_img])
    return ang.cos(), ang.sin()


# ---------------------------------------------------------------------------------------------
# Building blocks


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The MLP's first layer and its activation (GELU, tanh approximation)."""
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.ops = OPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ops.linear_gelu(x, self.fc1.weight, self.fc1.bias))


class TimestepMLP(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


# Blocks call these through `self.ops`; --fused-kernels swaps in dittune.kernels' ops of the same names.
OPS = reference(("modulate", "gated_residual", "gated_residual_modulate", "joint_qk_norm_rope", "linear_gelu"),
                modulate=modulate, gated_residual=gated_residual, gated_residual_modulate=gated_residual_modulate,
                joint_qk_norm_rope=joint_qk_norm_rope, linear_gelu=linear_gelu)


class DualStreamBlock(nn.Module):
    """Image and text streams with their own weights, joined in one attention over [text, image]."""

    def __init__(self, cfg: QwenImageConfig):
        super().__init__()
        dim, hd = cfg.inner_dim, cfg.attention_head_dim
        self.heads, self.head_dim, self.eps = cfg.num_attention_heads, hd, cfg.eps
        # shift, scale, gate for attention then MLP; image stream's six, then text stream's six.
        self.mod = nn.Linear(dim, 12 * dim)
        self.img_qkv = nn.Linear(dim, 3 * dim)
        self.txt_qkv = nn.Linear(dim, 3 * dim)
        self.img_norm_q = nn.Parameter(torch.ones(hd))
        self.img_norm_k = nn.Parameter(torch.ones(hd))
        self.txt_norm_q = nn.Parameter(torch.ones(hd))
        self.txt_norm_k = nn.Parameter(torch.ones(hd))
        self.attn = Attention()
        self.ops = OPS
        self.img_out = nn.Linear(dim, dim)
        self.txt_out = nn.Linear(dim, dim)
        self.img_mlp = MLP(dim, cfg.mlp_ratio * dim)
        self.txt_mlp = MLP(dim, cfg.mlp_ratio * dim)

    def forward(
        self,
        img: torch.Tensor,  # [B, Li, C]
        txt: torch.Tensor,  # [B, Lt, C]
        temb: torch.Tensor,  # [B, C], SiLU already applied
        cos: torch.Tensor,  # [Lt + Li, D/2] fp32, text first
        sin: torch.Tensor,
        mask: torch.Tensor | None,  # [B, 1, 1, Lt + Li] bool, or None
        mod: torch.Tensor | None = None,  # [B, 12 C] = self.mod(temb), precomputed (packed DiT)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mod = (self.mod(temb) if mod is None else mod)[:, None].chunk(12, dim=-1)  # 12 x [B, 1, C]
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = mod[:6]
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = mod[6:]
        h, d, eps, lt = self.heads, self.head_dim, self.eps, txt.shape[1]

        img_qkv = self.img_qkv(self.ops.modulate(img, i_shift1, i_scale1, eps)).unflatten(-1, (3, h, d))  # [B, Li, 3, H, D]
        txt_qkv = self.txt_qkv(self.ops.modulate(txt, t_shift1, t_scale1, eps)).unflatten(-1, (3, h, d))
        q, k = self.ops.joint_qk_norm_rope(
            txt_qkv[:, :, 0], txt_qkv[:, :, 1], img_qkv[:, :, 0], img_qkv[:, :, 1],
            self.txt_norm_q, self.txt_norm_k, self.img_norm_q, self.img_norm_k, cos, sin, eps,
        )  # fmt: skip
        v = joint_heads(txt_qkv[:, :, 2], img_qkv[:, :, 2])  # q, k, v: [B, H, Lt + Li, D] views of [B, L, H, D]
        out = self.attn(q, k, v, mask)  # [B, Lt + Li, C]

        img, m = self.ops.gated_residual_modulate(img, i_gate1, self.img_out(out[:, lt:]), i_shift2, i_scale2, eps)
        txt, n = self.ops.gated_residual_modulate(txt, t_gate1, self.txt_out(out[:, :lt]), t_shift2, t_scale2, eps)
        img = self.ops.gated_residual(img, i_gate2, self.img_mlp(m))
        txt = self.ops.gated_residual(txt, t_gate2, self.txt_mlp(n))
        if img.dtype == torch.float16:
            img, txt = img.clip(-65504, 65504), txt.clip(-65504, 65504)
        return img, txt


class QwenImageTransformer(nn.Module):
    repeated_blocks: tuple[str, ...] = ("blocks",)
    seq = NO_SHARDS  # token sharding seam: identity on one GPU (engine/parallel/sequence.py)

    def __init__(self, cfg: QwenImageConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.inner_dim
        self.img_in = nn.Linear(cfg.in_channels, dim)
        self.txt_norm = nn.Parameter(torch.ones(cfg.joint_attention_dim))
        self.txt_in = nn.Linear(cfg.joint_attention_dim, dim)
        self.time_embed = TimestepMLP(dim)
        self.blocks = nn.ModuleList(DualStreamBlock(cfg) for _ in range(cfg.num_layers))
        self.norm_out = nn.Linear(dim, 2 * dim)  # scale, shift of the final adaLN
        self.proj_out = nn.Linear(dim, cfg.patch_size**2 * cfg.out_channels)

    def forward(
        self,
        img: torch.Tensor,  # [B, Li, in_channels] packed latents
        txt: torch.Tensor,  # [B, Lt, joint_attention_dim] text hidden states
        txt_mask: torch.Tensor | None,  # [B, Lt], 1 = real token; None = all real
        timestep: torch.Tensor,  # [B], sigma in [0, 1]
        grid_h: int,  # image tokens per column (latent height / patch)
        grid_w: int,  # image tokens per row
        step_cache: dict | None = None,  # shared by the passes of one denoise step (true CFG)
    ) -> torch.Tensor:  # [B, Li, patch^2 * out_channels]
        cfg = self.cfg
        if img.shape[1] != grid_h * grid_w:
            raise EngineError(f"{img.shape[1]} image tokens do not form a {grid_h}x{grid_w} grid")
        # Under sequence parallelism each rank keeps its slice of the text and of the image tokens
        # (and of their RoPE rows); attention is the only place tokens meet.
        seq, n_img, n_txt = self.seq, img.shape[1], txt.shape[1]
        seq.joint(n_txt, n_img)
        img = self.img_in(seq.split(img, 1))
        txt = self.txt_in(rms_norm(seq.split(txt, 1), self.txt_norm, cfg.eps))
        # temb and the modulations depend on the timestep alone, so the passes of one step (true
        # CFG: conditional and negative prompt) compute them once.
        cached = step_cache.get("qwen_image_temb") if step_cache is not None else None
        if cached is not None and cached[0].shape[0] == img.shape[0]:
            temb, mods = cached
        else:
            temb = self.time_embed(timestep_embedding(timestep.to(img.dtype)).to(img.dtype))
            temb = F.silu(temb)  # every consumer (block and output modulation) takes SiLU(temb)
            mods = modulations(self, temb) or [None] * (len(self.blocks) + 1)
            if step_cache is not None:
                step_cache["qwen_image_temb"] = (temb, mods)
        cos, sin = (torch.cat([seq.split(t[:n_txt], 0), seq.split(t[n_txt:], 0)])
                    for t in rope_tables(grid_h, grid_w, n_txt, cfg.axes_dims_rope, cfg.rope_theta, img.device))
        mask = None
        if txt_mask is not None:  # over the keys of every rank, in the order attention sees them
            img_mask = txt_mask.new_ones(img.shape[0], n_img, dtype=torch.bool)
            mask = seq.rank_order([txt_mask.bool(), img_mask], 1)[:, None, None, :]  # [B, 1, 1, L]

        for block, mod in zip(self.blocks, mods):
            img, txt = block(img, txt, temb, cos, sin, mask, mod)

        scale, shift = (self.norm_out(temb) if mods[-1] is None else mods[-1])[:, None].chunk(2, dim=-1)
        return seq.gather(self.proj_out(modulate(img, shift, scale, cfg.eps)), 1, n_img)

    def modulation_groups(self) -> list[list[nn.Linear]]:
        """The adaLN Linears of temb, per consumer in forward order (see base.pack_modulation)."""
        return [[b.mod] for b in self.blocks] + [[self.norm_out]]


def tensor_plan(cfg: QwenImageConfig) -> TensorPlan:
    """Tensor parallel (engine/parallel/tensor.py): each stream's Q/K/V and MLP input split by
    output features (its heads of q, k and v; its hidden units), the output projections by input
    features (one all-reduce after attention and one after each MLP). The modulations split by
    output and all-gathered (one all-gather per forward when packed)."""
    d, m = cfg.inner_dim, cfg.mlp_ratio * cfg.inner_dim
    plan = {"mod": gather(*[d] * 12)}
    for s in ("img", "txt"):
        plan |= {f"{s}_qkv": column(d, d, d), f"{s}_out": row(d), f"{s}_mlp.fc1": column(m), f"{s}_mlp.fc2": row(m)}
    return TensorPlan(cfg.heads, {"blocks": plan, "": {"norm_out": gather(d, d)}})


# ---------------------------------------------------------------------------------------------
# Family glue


def _fuse(sd: Mapping[str, torch.Tensor], out: dict, used: set, dst: str, srcs: list[str]) -> None:
    for suffix in ("weight", "bias"):
        keys = [f"{s}.{suffix}" for s in srcs]
        present = [k for k in keys if k in sd]
        if len(present) != len(keys):
            raise EngineError(
                f"cannot build {dst}.{suffix}: {sorted(set(keys) - set(present))} missing; "
                "convert the whole transformer state dict at once, not shard by shard"
            )
        out[f"{dst}.{suffix}"] = torch.cat([sd[k] for k in keys], dim=0)
        used.update(keys)


class QwenImageFamily(Family):
    transformer_cls = QwenImageTransformer

    @staticmethod
    def convert_diffusers_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        used: set[str] = set()

        def move(src: str, dst: str) -> None:
            if src in sd:
                out[dst] = sd[src]
                used.add(src)

        for name in ("img_in", "txt_in", "proj_out"):
            for s in ("weight", "bias"):
                move(f"{name}.{s}", f"{name}.{s}")
        move("txt_norm.weight", "txt_norm")
        for s in ("weight", "bias"):
            move(f"norm_out.linear.{s}", f"norm_out.{s}")
            for i in (1, 2):
                move(f"time_text_embed.timestep_embedder.linear_{i}.{s}", f"time_embed.linear_{i}.{s}")

        blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
        for i in blocks:
            p, q = f"transformer_blocks.{i}.", f"blocks.{i}."
            a = p + "attn."
            _fuse(sd, out, used, q + "mod", [p + "img_mod.1", p + "txt_mod.1"])
            _fuse(sd, out, used, q + "img_qkv", [a + "to_q", a + "to_k", a + "to_v"])
            _fuse(sd, out, used, q + "txt_qkv", [a + "add_q_proj", a + "add_k_proj", a + "add_v_proj"])
            for src, dst in (("norm_q", "img_norm_q"), ("norm_k", "img_norm_k"),
                             ("norm_added_q", "txt_norm_q"), ("norm_added_k", "txt_norm_k")):  # fmt: skip
                move(f"{a}{src}.weight", q + dst)
            for s in ("weight", "bias"):
                move(f"{a}to_out.0.{s}", f"{q}img_out.{s}")
                move(f"{a}to_add_out.{s}", f"{q}txt_out.{s}")
                for stream in ("img", "txt"):
                    move(f"{p}{stream}_mlp.net.0.proj.{s}", f"{q}{stream}_mlp.fc1.{s}")
                    move(f"{p}{stream}_mlp.net.2.{s}", f"{q}{stream}_mlp.fc2.{s}")

        unknown = sorted(set(sd) - used)
        if unknown:
            raise EngineError(
                f"unexpected keys in the Qwen-Image transformer state dict: {', '.join(unknown[:8])}"
                + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
            )
        return out

    def prompt_text(self, encoder: str, prompt: str) -> str:
        return PROMPT_TEMPLATE.format(prompt)

    def encode_prompt(
        self, encoders: Mapping[str, nn.Module], tokens: Mapping[str, TokenBatch]
    ) -> dict[str, torch.Tensor]:
        """-> {"prompt_embeds": [B, L, 3584]} (+ "prompt_mask" [B, L] when prompt lengths differ).

        `tokens` hold PROMPT_TEMPLATE.format(prompt), padded on either side.
        """
        encoder, batch = encoders["text_encoder"], tokens["text_encoder"]
        valid = batch.attention_mask.bool()
        # The pipeline pads to the longest prompt only: dropping all-padding columns gives the
        # encoder the same sequence (and positions) as the pipeline for one prompt.
        keep = valid.any(0)
        ids, valid = batch.input_ids[:, keep], valid[:, keep]
        lengths = valid.sum(1).tolist()
        if min(lengths) <= DROP_IDX:
            raise EngineError(
                f"a prompt has {min(lengths)} tokens, no more than the {DROP_IDX} of the Qwen-Image "
                "template prefix: tokenize PROMPT_TEMPLATE.format(prompt), not the bare prompt"
            )
        # hidden_states[-1] of the pipeline's Qwen2.5-VL is this output (after the final norm).
        hidden = encoder(input_ids=ids, attention_mask=valid.long()).last_hidden_state  # [B, L, C]
        keep_n = self.spec.text_encoders[0].max_length - DROP_IDX  # the pipeline's max_sequence_length
        embeds = [h[v][DROP_IDX:][:keep_n] for h, v in zip(hidden, valid)]
        longest = max(e.shape[0] for e in embeds)
        if all(e.shape[0] == longest for e in embeds):
            return {"prompt_embeds": torch.stack(embeds)}
        mask = torch.zeros(len(embeds), longest, dtype=torch.long, device=hidden.device)
        for i, e in enumerate(embeds):
            mask[i, : e.shape[0]] = 1
        prompt_embeds = torch.stack([F.pad(e, (0, 0, 0, longest - e.shape[0])) for e in embeds])
        return {"prompt_embeds": prompt_embeds, "prompt_mask": mask}

    def _latent_size(self, height: int, width: int) -> tuple[int, int]:
        m = self.spec.size_multiple
        if height <= 0 or width <= 0 or height % m or width % m:
            raise EngineError(f"Qwen-Image needs height and width that are multiples of {m}, got {height}x{width}")
        return height // self.spec.vae_scale, width // self.spec.vae_scale

    def prepare_latents(
        self, batch: int, height: int, width: int, generator: torch.Generator, device, dtype
    ) -> torch.Tensor:
        h, w = self._latent_size(height, width)
        c = self.spec.dit_config.in_channels // self.spec.patch**2
        # Drawn on the generator's device and moved, as diffusers' randn_tensor does.
        noise = torch.randn((batch, 1, c, h, w), generator=generator, device=generator.device, dtype=dtype)
        noise = noise.to(device).view(batch, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return noise.reshape(batch, (h // 2) * (w // 2), c * 4)  # [B, L, 64]

    def predict(
        self,
        dit: nn.Module,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        cond: Mapping[str, torch.Tensor],
        guidance: float,  # true CFG is mixed by the pipeline; the DiT takes no guidance input
        height: int,
        width: int,
        step_cache: dict | None = None,
    ) -> torch.Tensor:
        h, w = self._latent_size(height, width)
        # The pipeline passes (t = 1000 * sigma) cast to the latent dtype, then divided by 1000.
        t = ((sigma.float() * 1000).to(latents.dtype) / 1000).expand(latents.shape[0])
        txt = cond["prompt_embeds"].to(latents.dtype)
        return dit(latents, txt, cond.get("prompt_mask"), t, h // 2, w // 2, step_cache)

    def unpack_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        h, w = self._latent_size(height, width)
        b, _, c = latents.shape
        x = latents.view(b, h // 2, w // 2, c // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        x = x.reshape(b, c // 4, 1, h, w)  # [B, 16, 1, h, w]
        vae = self.spec.vae.config
        shape = (1, vae["z_dim"], 1, 1, 1)
        mean = torch.tensor(vae["latents_mean"]).view(shape).to(x.device, x.dtype)
        # Written as the pipeline writes it: divide by the (rounded) reciprocal of std.
        inv_std = 1.0 / torch.tensor(vae["latents_std"]).view(shape).to(x.device, x.dtype)
        return x / inv_std + mean


# ---------------------------------------------------------------------------------------------
# Specs


_SCHEDULER = _load_config("scheduler")
_VAE = _load_config("vae")

_EXTRA = {
    "prompt_template": PROMPT_TEMPLATE,
    "drop_idx": DROP_IDX,
}

_TINY_TEXT = {
    "model_type": "qwen2_5_vl_text",
    "vocab_size": 152064,  # real ids (template tokens) must embed
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "hidden_act": "silu",
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-06,
    "use_sliding_window": False,
    "sliding_window": 32768,
    "max_window_layers": 2,
    "attention_dropout": 0.0,
    "rope_theta": 1000000.0,
    "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "tie_word_embeddings": False,
}

_TINY_VAE = {
    "base_dim": 8,
    "z_dim": 16,
    "dim_mult": [1, 1, 1, 1],  # three downsamples: still 8 pixels per latent pixel
    "num_res_blocks": 1,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "latents_mean": _VAE["latents_mean"],
    "latents_std": _VAE["latents_std"],
}

SPECS: dict[str, ModelSpec] = {
    "qwen-image": ModelSpec(
        name="qwen-image",
        family="qwen_image",
        hf_repo="Qwen/Qwen-Image",
        dit_config=QwenImageConfig.from_diffusers(_load_config("transformer")),
        text_encoders=(
            TextEncoderSpec(
                name="text_encoder",
                arch="qwen2_5_vl",
                config=_load_config("text_encoder"),
                max_length=DROP_IDX + MAX_SEQUENCE_LENGTH,
                tokenizer="tokenizer",
            ),
        ),
        vae=VaeSpec(cls="AutoencoderKLQwenImage", config=_VAE),
        scheduler=SchedulerSpec.from_config(_SCHEDULER),
        width=1024,
        height=1024,
        steps=50,
        guidance=4.0,
        true_cfg=True,
        cfg_renorm=True,
        vae_scale=8,
        patch=2,
        notes="20B MMDiT, 60 dual-stream blocks; true CFG (two passes per step) with norm rescale",
        extra=_EXTRA,
    ),
    "qwen-image-tiny": ModelSpec(
        name="qwen-image-tiny",
        family="qwen_image",
        hf_repo=None,
        dit_config=QwenImageConfig(
            num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6)
        ),
        text_encoders=(
            TextEncoderSpec(
                name="text_encoder",
                arch="qwen2_5_vl",
                config=_TINY_TEXT,
                max_length=DROP_IDX + 32,
                tokenizer="tokenizer",
            ),
        ),
        vae=VaeSpec(cls="AutoencoderKLQwenImage", config=_TINY_VAE),
        scheduler=SchedulerSpec.from_config(_SCHEDULER),
        width=128,
        height=128,
        steps=4,
        guidance=4.0,
        true_cfg=True,
        cfg_renorm=True,
        vae_scale=8,
        patch=2,
        tiny=True,
        notes="CPU test variant of qwen-image: 2 blocks, 2 heads x 16, random weights",
        extra=_EXTRA,
    ),
}

FAMILY = QwenImageFamily
