"""Z-Image-Turbo: a single-stream DiT (S3-DiT) with noise/context refiners, Qwen3-4B text encoder.

Mirrors diffusers' `ZImageTransformer2DModel` (transformer_z_image.py) and `ZImagePipeline` for one
image per prompt. diffusers takes ragged lists and pads every sequence to a multiple of
SEQ_MULTI_OF; the padding tokens (learned `x_pad_token` / `cap_pad_token`) attend like any other
token, so they change the result and are reproduced here exactly:
- caption: Lc tokens + (-Lc % 32) copies of `cap_pad_token`; RoPE ids (1 + i, 0, 0) for every
  position i, pads included;
- image: h*w tokens with ids (Lc_pad + 1, row, col), + (-h*w % 32) copies of `x_pad_token` with
  ids (0, 0, 0);
- the main layers run on [image + pads, caption + pads] without an attention mask (batch items
  of equal lengths, which is what a dense batch is).

Timesteps: the pipeline feeds t = (1000 - 1000 * sigma) / 1000 (1 = clean image), the model
embeds t * t_scale, and the pipeline negates the model output before its Euler step.
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
from ..parallel.tensor import TensorPlan, column, row
from ..ops import reference
from ..errors import EngineError
from .base import Family, ModelSpec, SchedulerSpec, TextEncoderSpec, TokenBatch, VaeSpec

_CONFIGS = Path(__file__).parent.parent / "configs" / "zimage"

SEQ_MULTI_OF = 32  # diffusers pads image and caption sequences to this multiple
ADALN_EMBED_DIM = 256
TIMESTEP_FREQ_DIM = 256
TIMESTEP_MLP_DIM = 1024

# What ZImagePipeline's tokenizer.apply_chat_template gives for one user message with
# add_generation_prompt=True, enable_thinking=True (Qwen3 adds a <think> block only when thinking
# is off). Family.prompt_text applies it; the engine then tokenizes with padding="max_length",
# truncation=True, as the pipeline does.
PROMPT_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
TEXT_HIDDEN_STATE = -2  # hidden_states[-2]: the input of the last decoder layer, not normed


def apply_prompt_template(prompt: str) -> str:
    return PROMPT_TEMPLATE.format(prompt)


@dataclass(frozen=True)
class ZImageConfig:
    """Architecture of the DiT; defaults are Z-Image-Turbo's transformer/config.json."""

    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    norm_eps: float = 1e-5
    cap_feat_dim: int = 2560
    patch_size: int = 2
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1536, 512, 512)

    @property
    def heads(self) -> int:
        return self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        return int(self.dim / 3 * 8)

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, ADALN_EMBED_DIM)

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_channels

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any]) -> "ZImageConfig":
        """diffusers transformer config.json -> ZImageConfig; refuses what this DiT does not implement."""
        if list(cfg.get("all_patch_size", [2])) != [2] or list(cfg.get("all_f_patch_size", [1])) != [1]:
            raise EngineError("Z-Image: only all_patch_size [2] and all_f_patch_size [1] are supported")
        if not cfg.get("qk_norm", True) or cfg.get("siglip_feat_dim") is not None:
            raise EngineError("Z-Image: only qk_norm=true without SigLIP (not the Omni variant) is supported")
        if cfg.get("n_kv_heads", cfg["n_heads"]) != cfg["n_heads"]:
            raise EngineError("Z-Image: n_kv_heads must equal n_heads (diffusers ignores it too)")
        return cls(
            in_channels=cfg["in_channels"],
            dim=cfg["dim"],
            n_layers=cfg["n_layers"],
            n_refiner_layers=cfg["n_refiner_layers"],
            n_heads=cfg["n_heads"],
            norm_eps=cfg["norm_eps"],
            cap_feat_dim=cfg["cap_feat_dim"],
            rope_theta=cfg["rope_theta"],
            t_scale=cfg["t_scale"],
            axes_dims=tuple(cfg["axes_dims"]),
            axes_lens=tuple(cfg["axes_lens"]),
        )

    def to_diffusers(self) -> dict[str, Any]:
        """Kwargs for diffusers' ZImageTransformer2DModel (used by parity tests)."""
        return dict(
            all_patch_size=(self.patch_size,),
            all_f_patch_size=(1,),
            in_channels=self.in_channels,
            dim=self.dim,
            n_layers=self.n_layers,
            n_refiner_layers=self.n_refiner_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_heads,
            norm_eps=self.norm_eps,
            qk_norm=True,
            cap_feat_dim=self.cap_feat_dim,
            rope_theta=self.rope_theta,
            t_scale=self.t_scale,
            axes_dims=list(self.axes_dims),
            axes_lens=list(self.axes_lens),
        )


# ---------------------------------------------------------------------------------------------
# Elementwise pieces (kept small and module-level so fused kernels can replace them)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rms_norm_modulate(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """adaLN modulation without shift: rms_norm(x) * (1 + scale). [B, L, C]; scale [B, 1, C]"""
    return rms_norm(x, weight, eps) * (1.0 + scale)


def gated_norm_residual(
    x: torch.Tensor, gate: torch.Tensor | None, y: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """x + gate * rms_norm(y); gate None for the unmodulated context refiner. [B, L, C]"""
    y = rms_norm(y, weight, eps)
    return x + y if gate is None else x + gate * y


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """[..., 2F] (w1 x | w3 x) -> silu(w1 x) * w3 x, [..., F]"""
    a, b = x.chunk(2, dim=-1)
    return F.silu(a) * b


def norm_rope(x: torch.Tensor, weight: torch.Tensor, freqs: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-head RMSNorm then interleaved-pair RoPE in fp32, as diffusers' complex product.

    x: [B, L, H, D]; freqs: [L, D/2, 2] fp32 (cos, sin) -> [B, H, L, D] in x.dtype, a view of a new
    contiguous [B, L, H, D] (the layout attention takes without a copy).
    """
    x = rms_norm(x, weight, eps)
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B, L, H, D/2]
    fc = torch.view_as_complex(freqs).unsqueeze(1)  # [L, 1, D/2]
    out = torch.view_as_real(xc * fc).flatten(-2)  # [B, L, H, D] fp32
    return out.to(x.dtype).transpose(1, 2)


def qk_norm_rope(
    q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
    sin: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """norm_rope of q and k [B, L, H, D] with cos, sin [L, D/2] fp32 views of one [L, D/2, 2] table:
    the signature of dittune.kernels.qk_norm_rope."""
    freqs = torch.stack((cos, sin), dim=-1)  # [L, D/2, 2], small
    return norm_rope(q, q_weight, freqs, eps), norm_rope(k, k_weight, freqs, eps)


def rope_freqs(ids: torch.Tensor, axes_dims: tuple[int, ...], theta: float) -> torch.Tensor:
    """ids [L, n_axes] int -> [L, sum(axes_dims)/2, 2] fp32 (cos, sin).

    Angles in float64 then rounded to fp32, as diffusers' RopeEmbedder tables."""
    angles = []
    for i, d in enumerate(axes_dims):
        inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d))
        angles.append(torch.outer(ids[:, i].to(torch.float64), inv).float())
    ang = torch.cat(angles, dim=-1)  # [L, D/2]
    return torch.stack((ang.cos(), ang.sin()), dim=-1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """t [B] -> [B, dim] fp32 (cos | sin)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# ---------------------------------------------------------------------------------------------
# Building blocks


# Blocks call these through `self.ops`; --fused-kernels swaps in dittune.kernels' ops of the same names.
OPS = reference(("gated_norm_residual", "rms_norm_modulate", "qk_norm_rope"), gated_norm_residual=gated_norm_residual,
                rms_norm_modulate=rms_norm_modulate, qk_norm_rope=qk_norm_rope)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class TimestepEmbedder(nn.Module):
    def __init__(self, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(TIMESTEP_FREQ_DIM, TIMESTEP_MLP_DIM)
        self.fc2 = nn.Linear(TIMESTEP_MLP_DIM, out_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, TIMESTEP_FREQ_DIM).to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(emb)))  # [B, adaln_dim]


class Block(nn.Module):
    """Pre/post-RMSNorm attention + SwiGLU; tanh-gated adaLN scale (no shift) when modulated."""

    def __init__(self, cfg: ZImageConfig, modulation: bool):
        super().__init__()
        dim, self.heads, self.eps = cfg.dim, cfg.n_heads, cfg.norm_eps
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.norm_q = RMSNorm(cfg.head_dim, eps=1e-5)
        self.norm_k = RMSNorm(cfg.head_dim, eps=1e-5)
        self.attn = Attention()
        self.ops = OPS
        self.proj = nn.Linear(dim, dim, bias=False)
        self.w13 = nn.Linear(dim, 2 * cfg.ffn_dim, bias=False)  # w1 | w3
        self.w2 = nn.Linear(cfg.ffn_dim, dim, bias=False)
        self.attention_norm1 = RMSNorm(dim, cfg.norm_eps)
        self.attention_norm2 = RMSNorm(dim, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(dim, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(dim, cfg.norm_eps)
        self.adaLN_modulation = nn.Linear(cfg.adaln_dim, 4 * dim) if modulation else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        # x [B, L, C]; cos, sin [L, D/2] fp32; c [B, adaln_dim] or None (context refiner)
        eps = self.eps
        if self.adaLN_modulation is not None:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).unsqueeze(1).chunk(4, dim=2)
            gate_msa, gate_mlp = gate_msa.tanh(), gate_mlp.tanh()
            h = self.ops.rms_norm_modulate(x, self.attention_norm1.weight, scale_msa, eps)  # scales [B, 1, C]
        else:
            gate_msa = gate_mlp = scale_mlp = None
            h = self.attention_norm1(x)

        b, l, _ = h.shape
        q, k, v = self.qkv(h).view(b, l, 3, self.heads, -1).unbind(2)  # [B, L, H, D] each
        # both QK norms use eps 1e-5
        q, k = self.ops.qk_norm_rope(q, k, self.norm_q.weight, self.norm_k.weight, cos, sin, self.norm_q.eps)  # [B, H, L, D]
        v = v.transpose(1, 2)  # q, k, v: [B, H, L, D] views of [B, L, H, D] storage, no copy
        x = self.ops.gated_norm_residual(x, gate_msa, self.proj(self.attn(q, k, v)), self.attention_norm2.weight, eps)

        h = self.ffn_norm1(x) if scale_mlp is None else self.ops.rms_norm_modulate(x, self.ffn_norm1.weight, scale_mlp, eps)
        return self.ops.gated_norm_residual(x, gate_mlp, self.w2(swiglu(self.w13(h))), self.ffn_norm2.weight, eps)


class FinalLayer(nn.Module):
    def __init__(self, cfg: ZImageConfig):
        super().__init__()
        self.linear = nn.Linear(cfg.dim, cfg.patch_dim)
        self.adaLN_modulation = nn.Linear(cfg.adaln_dim, cfg.dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + self.adaLN_modulation(F.silu(c)).unsqueeze(1)  # [B, 1, C]
        return self.linear(F.layer_norm(x, (x.shape[-1],), eps=1e-6) * scale)


# ---------------------------------------------------------------------------------------------
# The DiT


class ZImageTransformer(nn.Module):
    repeated_blocks: tuple[str, ...] = ("noise_refiner", "context_refiner", "layers")
    seq = NO_SHARDS  # token sharding seam: identity on one GPU (engine/parallel/sequence.py)

    def __init__(self, cfg: ZImageConfig):
        super().__init__()
        if cfg.dim % cfg.n_heads or cfg.head_dim != sum(cfg.axes_dims) or any(d % 2 for d in cfg.axes_dims):
            raise EngineError(
                f"Z-Image: head_dim {cfg.dim}/{cfg.n_heads} must equal sum(axes_dims) {cfg.axes_dims}, all even"
            )
        self.cfg = cfg
        self.x_embedder = nn.Linear(cfg.patch_dim, cfg.dim)
        self.t_embedder = TimestepEmbedder(cfg.adaln_dim)
        self.cap_norm = RMSNorm(cfg.cap_feat_dim, cfg.norm_eps)
        self.cap_proj = nn.Linear(cfg.cap_feat_dim, cfg.dim)
        self.x_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.noise_refiner = nn.ModuleList(Block(cfg, modulation=True) for _ in range(cfg.n_refiner_layers))
        self.context_refiner = nn.ModuleList(Block(cfg, modulation=False) for _ in range(cfg.n_refiner_layers))
        self.layers = nn.ModuleList(Block(cfg, modulation=True) for _ in range(cfg.n_layers))
        self.final_layer = FinalLayer(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.weight.dtype

    def position_ids(self, h: int, w: int, x_len: int, cap_len: int, device) -> torch.Tensor:
        """RoPE ids of [image + pads, caption + pads] as diffusers' patchify_and_embed: [L, 3]."""
        rows = torch.arange(h, device=device).repeat_interleave(w)
        cols = torch.arange(w, device=device).repeat(h)
        img = torch.stack((torch.full_like(rows, cap_len + 1), rows, cols), dim=-1)  # [h*w, 3]
        img_pad = torch.zeros(x_len - h * w, 3, dtype=img.dtype, device=device)
        cap = torch.zeros(cap_len, 3, dtype=img.dtype, device=device)
        cap[:, 0] = torch.arange(1, cap_len + 1, device=device)
        return torch.cat((img, img_pad, cap), dim=0)

    def forward(self, x: torch.Tensor, cap_feats: torch.Tensor, t: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """x [B, h*w, p*p*C] patch tokens (row-major, features (ph, pw, c)); cap_feats [B, Lc, cap_dim];
        t [B] with 1 = clean image -> [B, h*w, p*p*C] (the model's raw output, before the
        pipeline's negation)."""
        cfg = self.cfg
        b, n_img, _ = x.shape
        if n_img != h * w:
            raise EngineError(f"Z-Image: got {n_img} image tokens for a {h}x{w} token grid")
        x_len = n_img + (-n_img) % SEQ_MULTI_OF
        cap_len = cap_feats.shape[1] + (-cap_feats.shape[1]) % SEQ_MULTI_OF

        freqs = rope_freqs(self.position_ids(h, w, x_len, cap_len, x.device), cfg.axes_dims, cfg.rope_theta)
        # [L, D/2] each, image positions first; contiguous: the fused QK-norm + RoPE kernel reads a
        # stride-2 view of the (cos, sin) table at a quarter of its bandwidth (noise refiner, H200)
        cos, sin = (t.contiguous() for t in freqs.unbind(-1))
        c = self.t_embedder(t * cfg.t_scale).to(x.dtype)  # [B, adaln_dim]

        # Under sequence parallelism each rank keeps its slice of the (padded) image and caption
        # tokens and of their RoPE rows; attention is the only place tokens meet.
        seq = self.seq
        seq.joint(x_len)
        seq.joint(cap_len)
        seq.joint(x_len, cap_len)
        cos_x, sin_x, cos_c, sin_c = (seq.split(t, 0) for t in (cos[:x_len], sin[:x_len], cos[x_len:], sin[x_len:]))

        x = self.x_embedder(x)  # [B, n_img, C]
        if x_len > n_img:
            x = torch.cat((x, self.x_pad_token.expand(b, x_len - n_img, -1)), dim=1)
        x = seq.split(x, 1)
        for block in self.noise_refiner:
            x = block(x, cos_x, sin_x, c)

        cap = self.cap_proj(self.cap_norm(cap_feats))  # [B, Lc, C]
        if cap_len > cap.shape[1]:
            cap = torch.cat((cap, self.cap_pad_token.expand(b, cap_len - cap.shape[1], -1)), dim=1)
        cap = seq.split(cap, 1)
        for block in self.context_refiner:
            cap = block(cap, cos_c, sin_c, None)

        lx = x.shape[1]
        x = torch.cat((x, cap), dim=1)  # [B, x_len + cap_len, C]
        cos, sin = torch.cat((cos_x, cos_c)), torch.cat((sin_x, sin_c))
        for block in self.layers:
            x = block(x, cos, sin, c)
        return seq.gather(self.final_layer(x[:, :lx], c), 1, x_len)[:, :n_img]


def tensor_plan(cfg: ZImageConfig) -> TensorPlan:
    """Tensor parallel (engine/parallel/tensor.py), every block alike (refiners and main layers):
    Q/K/V and w1|w3 split by output features (each rank's heads of q, k and v; its share of w1 and
    of w3, so SwiGLU stays local), proj and w2 by input features (one all-reduce each). The
    adaLN modulation, embedders and final layer stay whole."""
    d, f = cfg.dim, cfg.ffn_dim
    block = {"qkv": column(d, d, d), "proj": row(d), "w13": column(f, f), "w2": row(f)}
    return TensorPlan(cfg.heads, {name: block for name in ZImageTransformer.repeated_blocks})


# ---------------------------------------------------------------------------------------------
# Family glue


def pack_latents(latents: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), p*p*C], features ordered (ph, pw, c) as diffusers' _patchify_image."""
    b, c, hh, ww = latents.shape
    x = latents.view(b, c, hh // patch, patch, ww // patch, patch).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (hh // patch) * (ww // patch), patch * patch * c)


def unpack_latents(tokens: torch.Tensor, h: int, w: int, patch: int = 2) -> torch.Tensor:
    """[B, h*w, p*p*C] -> [B, C, h*p, w*p]; h, w in tokens."""
    b, _, d = tokens.shape
    c = d // (patch * patch)
    x = tokens.view(b, h, w, patch, patch, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, h * patch, w * patch)


class ZImageFamily(Family):
    transformer_cls = ZImageTransformer

    @staticmethod
    def convert_diffusers_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        fused: dict[str, dict[str, torch.Tensor]] = {}
        renames = {
            "all_x_embedder.2-1.": "x_embedder.",
            "all_final_layer.2-1.adaLN_modulation.1.": "final_layer.adaLN_modulation.",
            "all_final_layer.2-1.linear.": "final_layer.linear.",
            "t_embedder.mlp.0.": "t_embedder.fc1.",
            "t_embedder.mlp.2.": "t_embedder.fc2.",
            "cap_embedder.0.": "cap_norm.",
            "cap_embedder.1.": "cap_proj.",
        }
        block_renames = {
            "attention.to_out.0.": "proj.",
            "attention.norm_q.": "norm_q.",
            "attention.norm_k.": "norm_k.",
            "feed_forward.w2.": "w2.",
            "adaLN_modulation.0.": "adaLN_modulation.",
        }
        fuse_parts = {  # diffusers key part -> (our fused key part, position in the concat)
            "attention.to_q.": ("qkv.", 0),
            "attention.to_k.": ("qkv.", 1),
            "attention.to_v.": ("qkv.", 2),
            "feed_forward.w1.": ("w13.", 0),
            "feed_forward.w3.": ("w13.", 1),
        }
        for key, value in sd.items():
            new = next((n + key[len(o) :] for o, n in renames.items() if key.startswith(o)), None)
            if new is not None:
                out[new] = value
                continue
            head, sep, rest = key.partition(".")
            if head in ZImageTransformer.repeated_blocks and sep:
                idx, _, name = rest.partition(".")
                prefix = f"{head}.{idx}."
                part = next((p for p in fuse_parts if name.startswith(p)), None)
                if part is not None:
                    target, pos = fuse_parts[part]
                    fused.setdefault(prefix + target + name[len(part) :], {})[pos] = value
                    continue
                old = next((o for o in block_renames if name.startswith(o)), None)
                out[prefix + (block_renames[old] + name[len(old) :] if old else name)] = value
                continue
            out[key] = value
        for key, parts in fused.items():
            n = 3 if ".qkv." in key else 2
            if sorted(parts) != list(range(n)):
                raise EngineError(f"Z-Image checkpoint is missing a part of {key} (has {sorted(parts)} of {n})")
            out[key] = torch.cat([parts[i] for i in range(n)], dim=0)
        return out

    def prompt_text(self, encoder: str, prompt: str) -> str:
        return apply_prompt_template(prompt)

    def encode_prompt(
        self, encoders: Mapping[str, nn.Module], tokens: Mapping[str, TokenBatch]
    ) -> dict[str, torch.Tensor]:
        """Qwen3 hidden_states[-2] of the templated prompt, valid tokens only -> {"cap_feats": [B, Lc, 2560]}."""
        batch = tokens["text_encoder"]
        mask = batch.attention_mask.bool()  # [B, L]
        lengths = mask.sum(dim=1)
        if int(lengths.min()) == 0:
            raise EngineError("Z-Image: the tokenized prompt has no valid tokens")
        if int(lengths.max()) != int(lengths.min()):
            raise EngineError("Z-Image: a batch of prompts must have equal token counts (encode them one by one)")
        out = encoders["text_encoder"](
            input_ids=batch.input_ids, attention_mask=mask, output_hidden_states=True, use_cache=False
        )
        hidden = out.hidden_states[TEXT_HIDDEN_STATE]  # [B, L, 2560]
        return {"cap_feats": hidden[mask].view(hidden.shape[0], int(lengths[0]), hidden.shape[-1])}

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        m = self.spec.size_multiple
        if height % m or width % m or height <= 0 or width <= 0:
            raise EngineError(f"Z-Image: height and width must be positive multiples of {m}, got {height}x{width}")
        h, w = height // m, width // m
        lens = self.spec.dit_config.axes_lens
        if h > lens[1] or w > lens[2]:
            raise EngineError(f"Z-Image: {height}x{width} exceeds the RoPE table of {lens[1]}x{lens[2]} tokens")
        return h, w

    def prepare_latents(
        self, batch: int, height: int, width: int, generator: torch.Generator, device, dtype
    ) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        h, w = self._grid(height, width)
        p = self.spec.patch
        shape = (batch, self.spec.dit_config.in_channels, h * p, w * p)
        # ZImagePipeline draws and keeps its latents in fp32 whatever the DiT dtype (predict casts
        # them per call), so `dtype` is not used: same draw as the pipeline for the same generator.
        noise = randn_tensor(shape, generator=generator, device=torch.device(device), dtype=torch.float32)
        return pack_latents(noise, p)

    def predict(
        self,
        dit: nn.Module,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        cond: Mapping[str, torch.Tensor],
        guidance: float,
        height: int,
        width: int,
        step_cache: dict | None = None,  # unused: nothing here depends on the timestep alone
    ) -> torch.Tensor:
        h, w = self._grid(height, width)
        if sigma.dim() == 0:
            sigma = sigma.expand(latents.shape[0])
        cap = cond["cap_feats"]
        if cap.shape[0] != latents.shape[0]:
            cap = cap.expand(latents.shape[0], -1, -1)
        dtype = dit.dtype
        t = (1000 - sigma * 1000) / 1000  # the pipeline's (1000 - timestep) / 1000, 1 = clean
        out = dit(latents.to(dtype), cap.to(dtype), t.to(latents.device), h, w)
        return -out.float()  # the pipeline negates the model output before its Euler step

    def unpack_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        h, w = self._grid(height, width)
        vae = self.spec.vae.config
        return unpack_latents(latents, h, w, self.spec.patch) / vae["scaling_factor"] + vae["shift_factor"]


# ---------------------------------------------------------------------------------------------
# Specs


def _load(name: str) -> dict[str, Any]:
    return json.loads((_CONFIGS / f"{name}.json").read_text())



_TINY_DIT = ZImageConfig(dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, cap_feat_dim=32, axes_dims=(4, 6, 6))

_TINY_QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,  # hidden_states[-2] must be a decoder layer's output
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "hidden_act": "silu",
    "attention_bias": False,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000,
    "tie_word_embeddings": True,
    "vocab_size": 151936,  # the real tokenizer's ids must fit
}

_TINY_VAE = {
    **{k: v for k, v in _load("vae").items() if not k.startswith("_")},
    "block_out_channels": [32, 32, 32, 32],  # four blocks keep the 8x spatial factor
    "layers_per_block": 1,
    "sample_size": 64,
}

_REAL_TE = _load("text_encoder")
_REAL_VAE = _load("vae")
_REAL_SCHEDULER = SchedulerSpec.from_config(_load("scheduler"))

_COMMON = dict(
    family="zimage",
    hf_repo="Tongyi-MAI/Z-Image-Turbo",
    scheduler=_REAL_SCHEDULER,
    guidance=0.0,
    true_cfg=True,
    cfg_style="zimage",
    cfg_renorm=False,
    vae_scale=8,
    patch=2,
)

SPECS: dict[str, ModelSpec] = {
    "z-image-turbo": ModelSpec(
        name="z-image-turbo",
        dit_config=ZImageConfig.from_diffusers(_load("transformer")),
        text_encoders=(TextEncoderSpec("text_encoder", "qwen3", _REAL_TE, 512, "tokenizer"),),
        vae=VaeSpec("AutoencoderKL", _REAL_VAE),
        steps=9,
        notes="Distilled: 9 steps, no CFG (guidance 0).",
        **_COMMON,
    ),
    "z-image-turbo-tiny": ModelSpec(
        name="z-image-turbo-tiny",
        dit_config=_TINY_DIT,
        text_encoders=(TextEncoderSpec("text_encoder", "qwen3", _TINY_QWEN3, 64, "tokenizer"),),
        vae=VaeSpec("AutoencoderKL", _TINY_VAE),
        width=64,  # 4x4 image tokens: exercises the pad-to-32 path
        height=64,
        steps=2,
        tiny=True,
        notes="Random tiny Z-Image for CPU tests.",
        **{**_COMMON, "hf_repo": None},
    ),
}

FAMILY = ZImageFamily
