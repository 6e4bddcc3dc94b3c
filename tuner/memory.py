"""Memory model: predicted peak VRAM of a configuration from component sizes, their placement and
an activation term, so that configurations far over budget are pruned without GPU time.

Peak = max over the stages (load, encode, denoise, decode) of what is on the GPU then: the
resident set (under layerwise streaming the DiT's resident blocks *and* its fixed GPU slots, which
live for the whole run), what visits for that stage (an offloaded VAE or DiT whole, a text encoder
streamed layer by layer), and that stage's activations. The coefficients are calibrated against
the per-stage allocated peaks that every trial's perf dump carries (H100, FLUX.1-dev 1024x1024,
26 trials of 2026-11-24: see docs/PERFORMANCE.md); the tuner stores prediction and measurement
side by side for every trial so the error is always visible."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import torch

from dittune.engine import budget, components, offload
from dittune.engine.models import get_family, tensor_plan

# Live activations per (token x hidden) element during one DiT forward (q/k/v, attention output,
# the MLP intermediate, modulated inputs). Measured on the H100 (FLUX, 4608 tokens x 3072): 0.12 to
# 0.58 GB above the weights in the denoise stage, the most for eager attention; 20 covers it.
DIT_ACT_ELEMENTS_PER_TOKEN_HIDDEN = 20
# VAE decode at full resolution: measured 5.16 GB above the weights at 1024x1024 in fp32 (every
# placement: resident, offloaded, beside a streamed DiT), i.e. 1230 fp32 elements per pixel.
VAE_ACT_ELEMENTS_PER_PIXEL = 1230
SP_BUFFER_ELEMENTS_PER_TOKEN_HIDDEN = 8  # q, k, v, out of one shard, sent and received (not yet measured)
# Tensor parallel: the share of those activations that has a split width (q, k, v, attention
# output, MLP hidden: divided by tp); the rest (residual stream, modulated inputs, the row-parallel
# outputs) is whole on every rank. The all-reduce adds an output-sized buffer. Not yet measured.
TP_SPLIT_ACTIVATION_SHARE = 0.6
TP_BUFFER_ELEMENTS_PER_TOKEN_HIDDEN = 2
ALLOCATOR_OVERHEAD = 1.05  # reserved / allocated peak: measured 1.00 to 1.09, median 1.05 (expandable segments)
PRUNE_MARGIN = 1.15  # prune only configurations predicted over budget by more than 15%


@dataclass(frozen=True)
class Footprint:
    dit_other_bytes: int  # embedders, final layer: always where the DiT is
    dit_block_bytes: tuple[int, ...]  # repeated blocks, in execution order
    text_encoder_bytes: int
    vae_bytes: int
    hidden: int
    text_tokens: int
    # per text encoder: the weights outside its repeated layers, and each layer's (execution order)
    text_encoder_other_bytes: tuple[int, ...] = ()
    text_encoder_layer_bytes: tuple[tuple[int, ...], ...] = ()
    dit_split_bytes: int = 0  # what tensor parallelism splits (the plan's weights, but row-parallel biases)

    @property
    def dit_bytes(self) -> int:
        return self.dit_other_bytes + sum(self.dit_block_bytes)


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@lru_cache(maxsize=16)
def footprint(model: str, dtype_name: str = "bf16") -> Footprint:
    """Parameter bytes per component, from a build on the meta device (no memory, no time)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    family = get_family(model)
    spec = family.spec
    meta = torch.device("meta")
    with meta, components.default_dtype(dtype):
        dit = family.transformer_cls(spec.dit_config)
    blocks = [b for name in dit.repeated_blocks for b in getattr(dit, name)]
    block_bytes = tuple(_bytes(b) for b in blocks)
    te_bytes = 0
    te_other: list[int] = []
    te_layers: list[tuple[int, ...]] = []
    for te in spec.text_encoders:
        config_cls, model_cls = components._text_classes(te.arch)
        with meta, components.default_dtype(dtype):
            enc = model_cls(config_cls(**te.config))
        layers = tuple(_bytes(b) for b in offload.repeated_layers(enc))
        te_bytes += _bytes(enc)
        te_other.append(_bytes(enc) - sum(layers))
        te_layers.append(layers)
    import diffusers

    with meta:
        vae = getattr(diffusers, spec.vae.cls)(**{k: v for k, v in spec.vae.config.items() if not k.startswith("_")})
    vae_params = sum(p.numel() for p in vae.parameters())
    # the hidden size is the most common input width of a block's matrices
    hidden = Counter(p.shape[-1] for p in blocks[0].parameters() if p.ndim == 2).most_common(1)[0][0]
    text_tokens = max(te.max_length for te in spec.text_encoders)
    split = 0
    for list_name, linears in tensor_plan(spec).blocks.items():
        for block in getattr(dit, list_name) if list_name else [dit]:
            for path, s in linears.items():
                lin = block.get_submodule(path)  # a row-parallel bias stays whole
                split += lin.weight.numel() * lin.weight.element_size() if s.kind == "row" else _bytes(lin)
    return Footprint(
        dit_other_bytes=_bytes(dit) - sum(block_bytes), dit_block_bytes=block_bytes, text_encoder_bytes=te_bytes,
        vae_bytes=vae_params * 4, hidden=hidden, text_tokens=text_tokens,
        text_encoder_other_bytes=tuple(te_other), text_encoder_layer_bytes=tuple(te_layers), dit_split_bytes=split,
    )


def layerwise_bytes(fp: Footprint, resident: int, prefetch: float) -> tuple[int, int]:
    """(resident, visiting) DiT bytes under layerwise offload, as LayerwiseOffload places them: the
    blocks of resident_set and the rest of the DiT stay; window + 1 fixed slots, each the size of
    the largest streamed block, hold the running block and the prefetched ones."""
    n = len(fp.dit_block_bytes)
    kept = offload.resident_set(n, min(resident, n))
    streamed = [b for i, b in enumerate(fp.dit_block_bytes) if i not in kept]
    slots = min(offload.prefetch_window(len(streamed), prefetch) + 1, len(streamed))
    dit_resident = fp.dit_other_bytes + sum(b for i, b in enumerate(fp.dit_block_bytes) if i in kept)
    return dit_resident, slots * max(streamed, default=0)


def text_encoder_stream_bytes(fp: Footprint) -> int:
    """GPU bytes of the text encoders during encode under --text-encoder-cpu-offload, as
    TextEncoderOffload places them: the pipeline onloads every encoder for the stage, each with
    its non-layer weights and window + 1 slots the size of its largest layer (none resident)."""
    total = 0
    for other, layers in zip(fp.text_encoder_other_bytes, fp.text_encoder_layer_bytes):
        slots = min(offload.prefetch_window(len(layers), offload.TEXT_ENCODER_PREFETCH) + 1, len(layers))
        total += other + slots * max(layers, default=0)
    return total


def predict_peak_bytes(model: str, cfg, width: int, height: int, dtype_name: str = "bf16") -> int:
    """The process's whole footprint on its GPU (the binding rank's under several), as NVML counts it and the
    budget binds it: the allocator's reserved peak plus what lives outside the allocator (CUDA
    context, kernel modules, NCCL buffers), the allowance the worker keeps free of its cap
    (engine/budget.py). The outside term is additive, so differences between two configurations
    (the residency climb's) are the allocator's alone."""
    allocator = max(predict_stage_bytes(model, cfg, width, height, dtype_name).values()) * ALLOCATOR_OVERHEAD
    return int(allocator) + outside_allocator_bytes(max(1, int(getattr(cfg, "num_gpus", 1) or 1)))


def outside_allocator_bytes(num_gpus: int = 1) -> int:
    return budget.outside_allowance(None, num_gpus)


def measured_outside_bytes(peak_vram: dict) -> int | None:
    """A trial's measured bytes outside the allocator: NVML's process peak less torch's reserved peak."""
    nv, reserved = (peak_vram or {}).get("nvml_process_peak_bytes"), (peak_vram or {}).get("torch_max_reserved_bytes")
    return None if nv is None or reserved is None else max(int(nv) - int(reserved), 0)


def predict_stage_bytes(model: str, cfg, width: int, height: int, dtype_name: str = "bf16") -> dict[str, int]:
    """Allocated bytes on the GPU (on several, the binding rank's: rank 0 with the VAE or the last
    with the text encoders) in each stage: load, encode, denoise, decode."""
    fp = footprint(model, dtype_name)
    family = get_family(model)
    tokens = family.image_seq_len(height, width) + fp.text_tokens
    elem = 2 if dtype_name != "fp32" else 4
    vae_bytes = fp.vae_bytes if cfg.vae_precision == "fp32" else fp.vae_bytes // 2
    vae_elem = 4 if cfg.vae_precision == "fp32" else 2

    if cfg.dit_layerwise_offload:
        dit_resident, slots = layerwise_bytes(fp, cfg.dit_resident_layers, cfg.dit_offload_prefetch_size)
        if cfg.dit_idle_offload:  # resident blocks and slots on the GPU for denoise only
            dit_resident, dit_visiting = fp.dit_other_bytes, dit_resident - fp.dit_other_bytes + slots
        else:  # the slots are allocated at setup and kept: resident in every stage (as measured)
            dit_resident, dit_visiting = dit_resident + slots, 0
    elif cfg.dit_cpu_offload:
        dit_resident, dit_visiting = 0, fp.dit_bytes
    else:
        # --tp-size: each rank holds 1/tp of the Linears the model's tensor plan splits
        tp = getattr(cfg, "tp_size", 1)
        dit_resident, dit_visiting = fp.dit_bytes - fp.dit_split_bytes + fp.dit_split_bytes // tp, 0
    te_resident = 0 if cfg.text_encoder_cpu_offload else fp.text_encoder_bytes
    vae_resident = 0 if cfg.vae_cpu_offload else vae_bytes

    # Several GPUs: every rank holds the whole DiT, or its tensor-parallel share; rank 0 also the
    # VAE, the last rank the text encoders (engine/parallel/context.py encoder_rank): the binding
    # GPU is the one of the two whose peak is higher. Sequence parallelism
    # splits the DiT's activations over ulysses x ring ranks, and its collectives add send/receive
    # buffers for q, k, v and the output of one shard (of this rank's heads under tp). Tensor
    # parallelism splits the activations of split width. CFG parallel runs one branch per rank.
    sp = getattr(cfg, "ulysses_degree", 1) * getattr(cfg, "ring_degree", 1)
    tp = getattr(cfg, "tp_size", 1)
    act_share = 1 - TP_SPLIT_ACTIVATION_SHARE + TP_SPLIT_ACTIVATION_SHARE / tp
    dit_act = int(DIT_ACT_ELEMENTS_PER_TOKEN_HIDDEN * act_share * tokens * fp.hidden * elem) // sp
    if sp > 1:
        dit_act += SP_BUFFER_ELEMENTS_PER_TOKEN_HIDDEN * (tokens // sp + 1) * fp.hidden * elem // tp
    if tp > 1:
        dit_act += TP_BUFFER_ELEMENTS_PER_TOKEN_HIDDEN * (tokens // sp + 1) * fp.hidden * elem
    vae_act = VAE_ACT_ELEMENTS_PER_PIXEL * width * height * vae_elem
    te_act = 64 * fp.text_tokens * 4096 * elem

    def stages(encodes: bool, decodes: bool) -> dict[str, int]:
        resident = dit_resident + (te_resident if encodes else 0) + (vae_resident if decodes else 0)
        return {
            "load": resident,
            "encode": resident + ((text_encoder_stream_bytes(fp) if cfg.text_encoder_cpu_offload else 0) + te_act
                                  if encodes else 0),
            "denoise": resident + dit_visiting + dit_act,
            "decode": resident + ((vae_bytes if cfg.vae_cpu_offload else 0) + vae_act if decodes else 0),
        }

    if int(getattr(cfg, "num_gpus", 1) or 1) == 1:
        return stages(True, True)
    return max(stages(False, True), stages(True, False), key=lambda st: max(st.values()))


def over_budget(predicted: int, budget_bytes: int) -> bool:
    return predicted > budget_bytes * PRUNE_MARGIN
