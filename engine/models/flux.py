"""FLUX.1-dev and FLUX.1-schnell (Black Forest Labs): MMDiT with 19 double-stream blocks (text and
image keep their own weights, attend jointly) and 38 single-stream blocks (parallel attention
+ MLP over the concatenated sequence), RoPE over (t, h, w) position ids.

Weights load from diffusers' FluxTransformer2DModel through `FluxFamily.convert_diffusers_state_dict`,
which fuses each stream's Q/K/V projections into one Linear.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import Attention
from ..ops import reference
from ..parallel.sequence import NO_SHARDS
from ..parallel.tensor import NO_TP, TensorPlan, column, gather, row
from .rope import joint_qk_norm_rope, rms_norm, rope
from ..errors import EngineError
from .base import Family, ModelSpec, SchedulerSpec, TextEncoderSpec, TokenBatch, VaeSpec, modulations

_CONFIGS = Path(__file__).parent.parent / "configs" / "flux"


@dataclass(frozen=True)
class FluxConfig:
    """FluxTransformer2DModel config (field names as in diffusers' config.json); real FLUX.1-dev sizes."""

    in_channels: int = 64  # 16 latent channels x 2x2 packing
    num_layers: int = 19  # double-stream blocks
    num_single_layers: int = 38
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    joint_attention_dim: int = 4096  # T5-XXL hidden size
    pooled_projection_dim: int = 768  # CLIP-L pooled output
    guidance_embeds: bool = True  # dev: guidance-distilled; schnell: False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)  # RoPE dims for the (t, h, w) id axes
    rope_theta: int = 10000
    mlp_ratio: float = 4.0
    patch_size: int = 1  # packing happens in the Family, the DiT sees tokens
    out_channels: int | None = None

    def __post_init__(self):
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise EngineError(
                f"flux axes_dims_rope {tuple(self.axes_dims_rope)} must be even and sum to "
                f"attention_head_dim={self.attention_head_dim}"
            )
        if self.patch_size != 1:
            raise EngineError(f"flux patch_size={self.patch_size} is not supported (only 1)")

    @property
    def heads(self) -> int:
        return self.num_attention_heads

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def out_dim(self) -> int:
        return self.out_channels or self.in_channels

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> FluxConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
        if unknown:
            raise EngineError(f"flux transformer config has keys this engine does not know: {unknown}")
        kw = {k: v for k, v in config.items() if k in known}
        if "axes_dims_rope" in kw:
            kw["axes_dims_rope"] = tuple(kw["axes_dims_rope"])
        return cls(**kw)


# ---------------------------------------------------------------------------------------------
# Elementwise pieces: targets for fused kernels, with the signatures of dittune.kernels.


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """adaLN: LayerNorm(x) * (1 + scale) + shift.  x [B, L, C]; shift, scale [B, 1, C]."""
    return torch.addcmul(shift, F.layer_norm(x, (x.shape[-1],), eps=eps), 1 + scale)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y.  x, y [B, L, C]; gate [B, 1, C]."""
    return torch.addcmul(x, gate, y)


def gated_residual_modulate(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention residual, then the MLP's modulation of it: (r, modulate(r)), r = x + gate * y."""
    r = gated_residual(x, gate, y)
    return r, modulate(r, shift, scale, eps)


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm, then RoPE.  q, k [B, L, H, D] (strided views of the packed QKV projection);
    cos, sin [L, D/2] fp32 -> (q, k) [B, H, L, D] in q.dtype, views of new contiguous [B, L, H, D]."""

    def one(x, w):
        return rope(rms_norm(x, w, eps), cos, sin).to(x.dtype).transpose(1, 2)

    return one(q, q_weight), one(k, k_weight)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The MLPs' first layer and its activation (GELU, tanh approximation)."""
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def linear_concat(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The single block's output projection of [attention | MLP]."""
    return F.linear(torch.cat([a, b], dim=-1), weight, bias)


def joint_heads(txt: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """txt [B, Lt, H, D], img [B, Li, H, D] (strided views) -> [B, H, Lt + Li, D], a view of a new
    contiguous [B, Lt + Li, H, D].

    Two strided copies into one buffer: a cat of strided views runs at half the speed."""
    b, lt, h, d = txt.shape
    out = txt.new_empty(b, lt + img.shape[1], h, d)
    out[:, :lt].copy_(txt)
    out[:, lt:].copy_(img)
    return out.transpose(1, 2)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, [cos | sin] halves (diffusers' flip_sin_to_cos=True).  t [B] -> [B, dim] fp32."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t[:, None].float() * torch.exp(exponent)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_tables(ids: torch.Tensor, axes_dims: tuple[int, ...], theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids [L, n_axes] -> cos, sin [L, sum(axes_dims) / 2] fp32.

    Angles in float64 as the reference implementations compute them, so the tables match theirs."""
    angles = []
    for i, dim in enumerate(axes_dims):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles.append(ids[:, i].to(torch.float64)[:, None] * freqs[None])
    a = torch.cat(angles, dim=-1)  # [L, D/2]
    return a.cos().float(), a.sin().float()


def split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, L, 3 * H * D] -> q, k, v views [B, L, H, D]."""
    return qkv.unflatten(-1, (3, heads, -1)).unbind(2)


# ---------------------------------------------------------------------------------------------
# Blocks


# Blocks call these through `self.ops`; --fused-kernels swaps in dittune.kernels' ops of the same names.
OPS = reference(("modulate", "gated_residual", "gated_residual_modulate", "qk_norm_rope", "joint_qk_norm_rope",
                 "linear_gelu", "linear_concat"),
                modulate=modulate, gated_residual=gated_residual, gated_residual_modulate=gated_residual_modulate,
                qk_norm_rope=qk_norm_rope, joint_qk_norm_rope=joint_qk_norm_rope, linear_gelu=linear_gelu,
                linear_concat=linear_concat)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (timestep, guidance and pooled-text embedders)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class DoubleStreamBlock(nn.Module):
    """Text and image streams with separate weights, one joint attention over [txt, img]."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        d, hd, m = cfg.hidden_size, cfg.attention_head_dim, cfg.mlp_hidden_dim
        self.heads = cfg.num_attention_heads
        self.img_mod = nn.Linear(d, 6 * d)
        self.txt_mod = nn.Linear(d, 6 * d)
        self.img_qkv = nn.Linear(d, 3 * d)
        self.txt_qkv = nn.Linear(d, 3 * d)
        self.img_norm_q = nn.Parameter(torch.empty(hd))
        self.img_norm_k = nn.Parameter(torch.empty(hd))
        self.txt_norm_q = nn.Parameter(torch.empty(hd))
        self.txt_norm_k = nn.Parameter(torch.empty(hd))
        self.attn = Attention()
        self.ops = OPS
        self.img_proj = nn.Linear(d, d)
        self.txt_proj = nn.Linear(d, d)
        self.img_mlp_in = nn.Linear(d, m)
        self.img_mlp_out = nn.Linear(m, d)
        self.txt_mlp_in = nn.Linear(d, m)
        self.txt_mlp_out = nn.Linear(m, d)

    def forward(
        self,
        img: torch.Tensor,  # [B, Li, D]
        txt: torch.Tensor,  # [B, Lt, D]
        vec: torch.Tensor,  # [B, D], silu(temb)
        cos: torch.Tensor,  # [Lt + Li, hd/2] fp32
        sin: torch.Tensor,
        mod: torch.Tensor | None = None,  # [B, 12 D] = [img_mod(vec) | txt_mod(vec)], precomputed (packed DiT)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lt = txt.shape[1]
        im, tm = (self.img_mod(vec), self.txt_mod(vec)) if mod is None else mod.chunk(2, dim=-1)
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = im[:, None].chunk(6, dim=-1)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = tm[:, None].chunk(6, dim=-1)

        iq, ik, iv = split_heads(self.img_qkv(self.ops.modulate(img, i_shift1, i_scale1)), self.heads)  # [B, Li, H, hd]
        tq, tk, tv = split_heads(self.txt_qkv(self.ops.modulate(txt, t_shift1, t_scale1)), self.heads)  # [B, Lt, H, hd]
        q, k = self.ops.joint_qk_norm_rope(
            tq, tk, iq, ik, self.txt_norm_q, self.txt_norm_k, self.img_norm_q, self.img_norm_k, cos, sin
        )  # [B, H, L, hd] views of [B, L, H, hd]
        out = self.attn(q, k, joint_heads(tv, iv))  # [B, L, D]

        img, h = self.ops.gated_residual_modulate(img, i_gate1, self.img_proj(out[:, lt:]), i_shift2, i_scale2, 1e-6)
        h = self.ops.linear_gelu(h, self.img_mlp_in.weight, self.img_mlp_in.bias)
        img = self.ops.gated_residual(img, i_gate2, self.img_mlp_out(h))

        txt, h = self.ops.gated_residual_modulate(txt, t_gate1, self.txt_proj(out[:, :lt]), t_shift2, t_scale2, 1e-6)
        h = self.ops.linear_gelu(h, self.txt_mlp_in.weight, self.txt_mlp_in.bias)
        txt = self.ops.gated_residual(txt, t_gate2, self.txt_mlp_out(h))
        if txt.dtype == torch.float16:  # as diffusers: the text stream overflows fp16
            txt = txt.clip(-65504, 65504)
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP over the joint sequence, one output projection for both."""

    tp = NO_TP  # tensor parallel: proj_out is row-parallel but runs as a fused op (engine/parallel/tensor.py)

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        d, hd, m = cfg.hidden_size, cfg.attention_head_dim, cfg.mlp_hidden_dim
        self.heads = cfg.num_attention_heads
        self.mod = nn.Linear(d, 3 * d)
        self.qkv = nn.Linear(d, 3 * d)
        # Kept apart from qkv (the reference fuses them): GELU on a strided slice of a fused
        # output runs at half the bandwidth, which costs more than the second GEMM launch.
        self.mlp_in = nn.Linear(d, m)
        self.norm_q = nn.Parameter(torch.empty(hd))
        self.norm_k = nn.Parameter(torch.empty(hd))
        self.attn = Attention()
        self.ops = OPS
        self.proj_out = nn.Linear(d + m, d)  # input [attn | mlp]

    def forward(
        self,
        x: torch.Tensor,  # [B, L, D], L = Lt + Li
        vec: torch.Tensor,  # [B, D]
        cos: torch.Tensor,  # [L, hd/2] fp32
        sin: torch.Tensor,
        mod: torch.Tensor | None = None,  # [B, 3 D] = self.mod(vec), precomputed (packed DiT)
    ) -> torch.Tensor:
        shift, scale, gate = (self.mod(vec) if mod is None else mod)[:, None].chunk(3, dim=-1)
        h = self.ops.modulate(x, shift, scale)
        q, k, v = split_heads(self.qkv(h), self.heads)  # [B, L, H, hd] views
        mlp = self.ops.linear_gelu(h, self.mlp_in.weight, self.mlp_in.bias)  # [B, L, M]
        q, k = self.ops.qk_norm_rope(q, k, self.norm_q, self.norm_k, cos, sin)  # [B, H, L, hd] views
        out = self.attn(q, k, v.transpose(1, 2))  # [B, L, D]
        y = self.tp.reduce(self.ops.linear_concat(out, mlp, self.proj_out.weight, self.proj_out.bias))  # [B, L, D]
        x = self.ops.gated_residual(x, gate, y)
        if x.dtype == torch.float16:
            x = x.clip(-65504, 65504)
        return x


class FluxTransformer(nn.Module):
    """Denoiser: packed latent tokens + T5 tokens + CLIP pooled vector -> velocity tokens."""

    repeated_blocks: tuple[str, ...] = ("double_blocks", "single_blocks")
    seq = NO_SHARDS  # token sharding seam: identity on one GPU (engine/parallel/sequence.py)

    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.x_embedder = nn.Linear(config.in_channels, d)
        self.context_embedder = nn.Linear(config.joint_attention_dim, d)
        self.time_in = MLPEmbedder(256, d)
        self.guidance_in = MLPEmbedder(256, d) if config.guidance_embeds else None
        self.pooled_in = MLPEmbedder(config.pooled_projection_dim, d)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(config) for _ in range(config.num_layers))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(config) for _ in range(config.num_single_layers))
        self.norm_out = nn.Linear(d, 2 * d)  # final adaLN: [scale | shift]
        self.ops = OPS
        self.proj_out = nn.Linear(d, config.out_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,  # [B, Li, in_channels] packed latents
        encoder_hidden_states: torch.Tensor,  # [B, Lt, joint_attention_dim]
        pooled_projections: torch.Tensor,  # [B, pooled_projection_dim]
        timestep: torch.Tensor,  # [B] sigma in [0, 1]
        img_ids: torch.Tensor,  # [Li, 3] (0, row, col)
        txt_ids: torch.Tensor,  # [Lt, 3] zeros
        guidance: torch.Tensor | None = None,  # [B] guidance scale; dev only
    ) -> torch.Tensor:
        # Under sequence parallelism each rank keeps its slice of the text and of the image tokens
        # (and of their RoPE rows); attention is the only place tokens meet.
        seq, n_img, n_txt = self.seq, hidden_states.shape[1], encoder_hidden_states.shape[1]
        seq.joint(n_txt, n_img)
        img = self.x_embedder(seq.split(hidden_states, 1))  # [B, Li, D]
        dtype = img.dtype
        # Same casts as diffusers: timestep rounds to the model dtype before the x1000.
        t_emb = timestep_embedding(timestep.to(dtype) * 1000).to(pooled_projections.dtype)
        temb = self.time_in(t_emb)
        if self.guidance_in is not None:
            if guidance is None:
                raise EngineError("this FLUX transformer embeds guidance (FLUX.1-dev): pass `guidance`")
            g_emb = timestep_embedding(guidance.to(dtype) * 1000).to(pooled_projections.dtype)
            temb = temb + self.guidance_in(g_emb)
        elif guidance is not None:
            raise EngineError("this FLUX transformer has no guidance embedding (FLUX.1-schnell): pass guidance=None")
        temb = temb + self.pooled_in(pooled_projections)
        vec = F.silu(temb).to(dtype)  # [B, D], shared by every modulation
        txt = self.context_embedder(seq.split(encoder_hidden_states, 1))  # [B, Lt, D]
        lt = txt.shape[1]

        ids = torch.cat([seq.split(txt_ids, 0), seq.split(img_ids, 0)])
        cos, sin = rope_tables(ids, self.config.axes_dims_rope, self.config.rope_theta)

        mods = modulations(self, vec) or [None] * (len(self.double_blocks) + len(self.single_blocks) + 1)
        nd = len(self.double_blocks)
        for block, mod in zip(self.double_blocks, mods):
            img, txt = block(img, txt, vec, cos, sin, mod)
        x = torch.cat([txt, img], dim=1)  # [B, Lt + Li, D]
        for block, mod in zip(self.single_blocks, mods[nd:]):
            x = block(x, vec, cos, sin, mod)
        img = x[:, lt:]

        scale, shift = (self.norm_out(vec) if mods[-1] is None else mods[-1])[:, None].chunk(2, dim=-1)
        return seq.gather(self.proj_out(self.ops.modulate(img, shift, scale)), 1, n_img)  # [B, Li, out_channels]

    def modulation_groups(self) -> list[list[nn.Linear]]:
        """The adaLN Linears of vec, per consumer in forward order (see base.pack_modulation)."""
        return [[b.img_mod, b.txt_mod] for b in self.double_blocks] + [[b.mod] for b in self.single_blocks] + [[self.norm_out]]


def tensor_plan(cfg: FluxConfig) -> TensorPlan:
    """Tensor parallel (engine/parallel/tensor.py): each block's Linears split by output features
    (column: its heads of q, k and v; its share of the MLP hidden units) or by input features (row:
    the output projections, one all-reduce each). The single block's proj_out takes [attention |
    MLP]: both parts split alike. The adaLN modulations (3.2 B of FLUX.1-dev's 11.9 B parameters)
    split by output and all-gathered, one all-gather per forward when packed; embedders and the
    final projection stay whole."""
    d, m = cfg.hidden_size, cfg.mlp_hidden_dim
    double = {}
    for s in ("img", "txt"):
        double |= {f"{s}_qkv": column(d, d, d), f"{s}_mlp_in": column(m), f"{s}_proj": row(d), f"{s}_mlp_out": row(m),
                   f"{s}_mod": gather(*[d] * 6)}
    single = {"qkv": column(d, d, d), "mlp_in": column(m), "proj_out": row(d, m, seam="tp"), "mod": gather(d, d, d)}
    return TensorPlan(cfg.heads, {"double_blocks": double, "single_blocks": single, "": {"norm_out": gather(d, d)}})


# ---------------------------------------------------------------------------------------------
# Family glue


def _linear(ours: str, *theirs: str) -> list[tuple[str, tuple[str, ...]]]:
    return [(f"{ours}.{p}", tuple(f"{t}.{p}" for t in theirs)) for p in ("weight", "bias")]


# ours -> diffusers names, concatenated along dim 0 when several (fused projections).
_TOP_KEYS = [
    *_linear("x_embedder", "x_embedder"),
    *_linear("context_embedder", "context_embedder"),
    *_linear("time_in.linear_1", "time_text_embed.timestep_embedder.linear_1"),
    *_linear("time_in.linear_2", "time_text_embed.timestep_embedder.linear_2"),
    *_linear("guidance_in.linear_1", "time_text_embed.guidance_embedder.linear_1"),
    *_linear("guidance_in.linear_2", "time_text_embed.guidance_embedder.linear_2"),
    *_linear("pooled_in.linear_1", "time_text_embed.text_embedder.linear_1"),
    *_linear("pooled_in.linear_2", "time_text_embed.text_embedder.linear_2"),
    *_linear("norm_out", "norm_out.linear"),
    *_linear("proj_out", "proj_out"),
]
_DOUBLE_KEYS = [
    *_linear("img_mod", "norm1.linear"),
    *_linear("txt_mod", "norm1_context.linear"),
    *_linear("img_qkv", "attn.to_q", "attn.to_k", "attn.to_v"),
    *_linear("txt_qkv", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    ("img_norm_q", ("attn.norm_q.weight",)),
    ("img_norm_k", ("attn.norm_k.weight",)),
    ("txt_norm_q", ("attn.norm_added_q.weight",)),
    ("txt_norm_k", ("attn.norm_added_k.weight",)),
    *_linear("img_proj", "attn.to_out.0"),
    *_linear("txt_proj", "attn.to_add_out"),
    *_linear("img_mlp_in", "ff.net.0.proj"),
    *_linear("img_mlp_out", "ff.net.2"),
    *_linear("txt_mlp_in", "ff_context.net.0.proj"),
    *_linear("txt_mlp_out", "ff_context.net.2"),
]
_SINGLE_KEYS = [
    *_linear("mod", "norm.linear"),
    *_linear("qkv", "attn.to_q", "attn.to_k", "attn.to_v"),
    *_linear("mlp_in", "proj_mlp"),
    ("norm_q", ("attn.norm_q.weight",)),
    ("norm_k", ("attn.norm_k.weight",)),
    *_linear("proj_out", "proj_out"),
]


def _block_count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    idx = {int(k[len(prefix) :].split(".", 1)[0]) for k in sd if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


class FluxFamily(Family):
    transformer_cls = FluxTransformer

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        self._img_ids: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def convert_diffusers_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # schnell has no guidance embedder; a dev model built from it then fails load_state_dict.
        plan = [(o, t) for o, t in _TOP_KEYS if t[0] in sd or not o.startswith("guidance_in.")]
        for ours, theirs, keys in (
            ("double_blocks", "transformer_blocks", _DOUBLE_KEYS),
            ("single_blocks", "single_transformer_blocks", _SINGLE_KEYS),
        ):
            for i in range(_block_count(sd, f"{theirs}.")):
                plan += [(f"{ours}.{i}.{o}", tuple(f"{theirs}.{i}.{x}" for x in t)) for o, t in keys]
        missing = sorted(t for _, ts in plan for t in ts if t not in sd)
        if missing:
            raise EngineError(f"not a diffusers FluxTransformer2DModel state dict: missing {missing[:8]}")
        used = {t for _, ts in plan for t in ts}
        unexpected = sorted(k for k in sd if k not in used)
        if unexpected:
            raise EngineError(f"FLUX state dict has keys this engine does not know: {unexpected[:8]}")
        return {o: sd[t[0]] if len(t) == 1 else torch.cat([sd[x] for x in t]) for o, t in plan}

    def encode_prompt(
        self, encoders: Mapping[str, nn.Module], tokens: Mapping[str, TokenBatch]
    ) -> dict[str, torch.Tensor]:
        # As FluxPipeline: CLIP pooled output + T5 last hidden state. No attention masks: neither
        # diffusers nor the reference code masks T5 padding, and the model expects it unmasked.
        clip, t5 = encoders["text_encoder"], encoders["text_encoder_2"]
        clip_ids = tokens["text_encoder"].input_ids
        t5_ids = tokens["text_encoder_2"].input_ids
        pooled = clip(clip_ids.to(_input_device(clip)), output_hidden_states=False).pooler_output  # [B, 768]
        embeds = t5(t5_ids.to(_input_device(t5)), output_hidden_states=False)[0]  # [B, Lt, 4096]
        txt_ids = torch.zeros(embeds.shape[1], 3, device=embeds.device)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "txt_ids": txt_ids}

    def _latent_hw(self, height: int, width: int) -> tuple[int, int]:
        m = self.spec.size_multiple
        if height % m or width % m or height <= 0 or width <= 0:
            raise EngineError(
                f"{self.spec.name}: height and width must be positive multiples of {m}, got {height}x{width}"
            )
        return height // self.spec.vae_scale, width // self.spec.vae_scale

    def prepare_latents(
        self, batch: int, height: int, width: int, generator: torch.Generator, device, dtype
    ) -> torch.Tensor:
        h, w = self._latent_hw(height, width)
        c = self.spec.dit_config.in_channels // (self.spec.patch**2)
        # Drawn on the generator's device like diffusers' randn_tensor, so seeds match the pipeline.
        noise = torch.randn((batch, c, h, w), generator=generator, device=generator.device, dtype=dtype)
        return _pack(noise.to(device))

    def predict(
        self,
        dit: nn.Module,
        latents: torch.Tensor,  # [B, L, C]
        sigma: torch.Tensor,  # [B] in [0, 1]
        cond: Mapping[str, torch.Tensor],
        guidance: float,
        height: int,
        width: int,
        step_cache: dict | None = None,  # unused: nothing here depends on the timestep alone
    ) -> torch.Tensor:
        b, dtype, device = latents.shape[0], latents.dtype, latents.device
        img_ids = self._image_ids(height, width, device)
        if img_ids.shape[0] != latents.shape[1]:
            raise EngineError(f"{latents.shape[1]} latent tokens do not match a {height}x{width} image")
        # FluxPipeline passes t = 1000 * sigma in the latent dtype, divided by 1000 again.
        timestep = (sigma.reshape(-1).expand(b) * 1000).to(dtype) / 1000
        g = torch.full((b,), guidance, device=device, dtype=torch.float32) if dit.config.guidance_embeds else None
        return dit(
            latents,
            cond["prompt_embeds"].to(device, dtype),
            cond["pooled_prompt_embeds"].to(device, dtype),
            timestep,
            img_ids,
            cond["txt_ids"].to(device),
            g,
        )

    def unpack_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        h, w = self._latent_hw(height, width)
        vae = self.spec.vae.config
        return _unpack(latents, h, w) / vae["scaling_factor"] + vae["shift_factor"]  # [B, 16, h, w]

    def _image_ids(self, height: int, width: int, device) -> torch.Tensor:
        key = (height, width, str(device))
        if key not in self._img_ids:
            h, w = self._latent_hw(height, width)
            rows = torch.arange(h // 2, device=device).repeat_interleave(w // 2)
            cols = torch.arange(w // 2, device=device).repeat(h // 2)
            self._img_ids[key] = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).float()  # [L, 3]
        return self._img_ids[key]


def _pack(z: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C], 2x2 patches flattened as (c, dy, dx)."""
    b, c, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def _unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, c4 = x.shape
    x = x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def _input_device(encoder: nn.Module) -> torch.device:
    return encoder.get_input_embeddings().weight.device


# ---------------------------------------------------------------------------------------------
# Specs


def _load(name: str) -> dict[str, Any]:
    return json.loads((_CONFIGS / name).read_text())


def _text_encoders(clip: Mapping, t5: Mapping, t5_length: int) -> tuple[TextEncoderSpec, ...]:
    return (
        TextEncoderSpec(name="text_encoder", arch="clip", config=clip, max_length=77, tokenizer="tokenizer"),
        TextEncoderSpec(name="text_encoder_2", arch="t5", config=t5, max_length=t5_length, tokenizer="tokenizer_2"),
    )


_TINY_CLIP = {
    "model_type": "clip_text_model",
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "max_position_embeddings": 77,
    "vocab_size": 1000,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 32,
    "bos_token_id": 0,
    "eos_token_id": 2,  # as the real config: pooling takes the argmax token (EOT has the highest id)
    "pad_token_id": 1,
}
_TINY_T5 = {
    "model_type": "t5",
    "d_model": 32,
    "d_kv": 16,
    "d_ff": 37,
    "num_heads": 2,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "vocab_size": 1000,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "is_gated_act": True,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 16,
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.0,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
    "tie_word_embeddings": False,
}
_TINY_VAE = {  # 4 levels like the real VAE so the 8x stride and 16 latent channels are real
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 8, 16, 16],
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 4,
    "sample_size": 128,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
_TINY_DIT = FluxConfig(
    num_layers=1,
    num_single_layers=1,
    num_attention_heads=2,
    attention_head_dim=16,
    joint_attention_dim=_TINY_T5["d_model"],
    pooled_projection_dim=_TINY_CLIP["hidden_size"],
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)

_CLIP, _T5, _VAE = _load("text_encoder.json"), _load("text_encoder_2.json"), _load("vae.json")
_DEV_SCHEDULER = SchedulerSpec.from_config(_load("scheduler_dev.json"))

SPECS: dict[str, ModelSpec] = {
    "flux-dev": ModelSpec(
        name="flux-dev",
        family="flux",
        hf_repo="black-forest-labs/FLUX.1-dev",
        dit_config=FluxConfig.from_diffusers(_load("transformer_dev.json")),
        text_encoders=_text_encoders(_CLIP, _T5, 512),
        vae=VaeSpec(cls="AutoencoderKL", config=_VAE),
        scheduler=_DEV_SCHEDULER,
        steps=28,
        guidance=3.5,
        notes="guidance-distilled: guidance is an embedding input, one DiT pass per step",
    ),
    "flux-schnell": ModelSpec(
        name="flux-schnell",
        family="flux",
        hf_repo="black-forest-labs/FLUX.1-schnell",
        dit_config=FluxConfig.from_diffusers(_load("transformer_schnell.json")),
        text_encoders=_text_encoders(_CLIP, _T5, 256),
        vae=VaeSpec(cls="AutoencoderKL", config=_VAE),
        scheduler=SchedulerSpec.from_config(_load("scheduler_schnell.json")),
        steps=4,
        guidance=0.0,
        notes="timestep-distilled, no guidance input",
    ),
    "flux-dev-tiny": ModelSpec(
        name="flux-dev-tiny",
        family="flux",
        hf_repo=None,
        dit_config=_TINY_DIT,
        text_encoders=_text_encoders(_TINY_CLIP, _TINY_T5, 32),
        vae=VaeSpec(cls="AutoencoderKL", config=_TINY_VAE),
        scheduler=_DEV_SCHEDULER,
        width=128,
        height=128,
        steps=4,
        guidance=3.5,
        tiny=True,
        notes="random-weight CPU test variant of flux-dev",
    ),
}

FAMILY = FluxFamily
