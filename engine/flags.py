"""The flag registry: every engine flag declared once.

Everything else is generated from FLAGS and CONSTRAINTS: the `dittune generate` options, config
validation, the tuner's search space, the emitted command line (non-default flags only, in
registry order) and the SGLang translation. `registry_hash()` is stored with every study so that
results measured under another registry are recognised as stale.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from .attention import BACKENDS, LOSSY_BACKENDS, NO_LSE_BACKENDS
from .errors import FlagError


@dataclass(frozen=True)
class Flag:
    name: str  # CLI name without the dashes: "attention-backend"
    type: type  # bool, str, int or float
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None  # for str flags
    minimum: float | None = None  # for numeric flags
    lossy_values: frozenset = frozenset()  # values that change the output beyond bf16 noise
    requires: str | None = None  # this flag is active only when that bool flag is on
    multi_gpu: bool = False
    sglang: str | None = None  # SGLang Diffusion's name for the same flag, if it has one
    sglang_values: Mapping[Any, Any] | None = None  # value translation where names differ

    @functools.cached_property
    def attr(self) -> str:  # read millions of times when the tuner sizes a space
        return self.name.replace("-", "_")

    @property
    def option(self) -> str:
        return "--" + self.name

    def parse(self, text: str | Any) -> Any:
        """A value from its command-line text (or an already-typed value) -> checked value."""
        value = self._coerce(text)
        if self.choices is not None and value not in self.choices:
            raise FlagError(f"{self.option}: {value!r} is not one of {', '.join(map(str, self.choices))}")
        if self.minimum is not None and value < self.minimum:
            raise FlagError(f"{self.option}: {value!r} is below the minimum {self.minimum}")
        return value

    def _coerce(self, text: Any) -> Any:
        if isinstance(text, self.type) and not (self.type is int and isinstance(text, bool)):
            return text
        if self.type is float and isinstance(text, int) and not isinstance(text, bool):
            return float(text)
        if not isinstance(text, str):
            raise FlagError(f"{self.option}: expected {self.type.__name__}, got {text!r}")
        s = text.strip()
        if self.type is bool:
            low = s.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise FlagError(f"{self.option}: {text!r} is not a boolean (use true or false)")
        try:
            value = self.type(s)
        except ValueError:
            raise FlagError(f"{self.option}: {text!r} is not a valid {self.type.__name__}") from None
        if self.type is float and not math.isfinite(value):
            raise FlagError(f"{self.option}: {text!r} is not a finite number")
        return value

    def render(self, value: Any) -> list[str]:
        """argv tokens for a non-default value."""
        if self.type is bool:
            return [self.option] if value else ["--no-" + self.name]
        if self.type is float and float(value).is_integer():
            return [self.option, str(int(value))]
        return [self.option, str(value)]


FLAGS: tuple[Flag, ...] = (
    # Parallel layout over the GPUs of one host (SGLang's names): num_gpus = cfg x ulysses x ring x tp.
    Flag("num-gpus", int, 1,
         "Processes, one per GPU, started by dittune itself; must equal the product of the layout's "
         "degrees (2 with --enable-cfg-parallel, x --ulysses-degree x --ring-degree x --tp-size).",
         minimum=1, multi_gpu=True, sglang="num-gpus"),
    Flag("ulysses-degree", int, 1,
         "Ulysses sequence parallel: an all-to-all turns each GPU's token shard into a head shard "
         "around attention; the model's attention heads must divide by it.",
         minimum=1, multi_gpu=True, sglang="ulysses-degree"),
    Flag("ring-degree", int, 1,
         "Ring sequence parallel: each GPU attends to every GPU's keys and values and merges the "
         "partial results by log-sum-exp; combines with --ulysses-degree.",
         minimum=1, multi_gpu=True, sglang="ring-degree"),
    Flag("tp-size", int, 1,
         "Tensor parallel: each GPU holds its share of every block's attention heads and MLP width "
         "(the weights split, so the per-GPU memory falls), one all-reduce after attention and one "
         "after the MLP; heads and MLP widths must divide by it; combines with --ulysses-degree.",
         minimum=1, multi_gpu=True, sglang="tp-size"),
    Flag("enable-cfg-parallel", bool, False,
         "True-CFG workloads: half of the GPUs run the conditional pass, half the negative one; one "
         "gather of the prediction per step.",
         multi_gpu=True, sglang="enable-cfg-parallel"),
    Flag("attention-backend", str, "torch_sdpa",
         "Attention kernel: torch_sdpa lets PyTorch pick; the torch_*_sdpa ones force one SDPA kernel "
         "(error if it cannot run); fa = flash-attn 3/4 (dittune[fa4]); flashinfer = flashinfer's prefill "
         "(dittune[flashinfer]); sage_attn = SageAttention (lossy).",
         choices=BACKENDS, lossy_values=LOSSY_BACKENDS, sglang="attention-backend",
         sglang_values={"torch_sdpa": "torch_sdpa", "fa": "fa", "sage_attn": "sage_attn"}),
    Flag("enable-torch-compile", bool, False, "Compile the DiT with torch.compile.",
         sglang="enable-torch-compile"),
    Flag("compile-scope", str, "regional",
         "regional: compile each repeated block once and reuse it (fast to compile); full: the whole DiT.",
         choices=("regional", "full"), requires="enable-torch-compile"),
    Flag("compile-mode", str, "default", "torch.compile mode.",
         choices=("default", "max-autotune-no-cudagraphs"), requires="enable-torch-compile"),
    Flag("fused-kernels", bool, False,
         "Use dittune's fused kernels (Triton: modulation, gated residual, RMSNorm, QK-norm+RoPE; "
         "cuBLASLt epilogues: GEMM+GELU, split output projection)."),
    Flag("enable-cuda-graph", bool, False,
         "Capture each denoise step's DiT passes as one CUDA graph and replay it (no launch gaps). "
         "The DiT must stay resident: excludes --dit-cpu-offload and --dit-layerwise-offload."),
    Flag("dit-cpu-offload", bool, False,
         "Keep the DiT in CPU memory; move it to the GPU for the denoise stage only.",
         sglang="dit-cpu-offload"),
    Flag("text-encoder-cpu-offload", bool, False,
         "Keep the text encoders in CPU memory; move them to the GPU for encoding only.",
         sglang="text-encoder-cpu-offload"),
    Flag("vae-cpu-offload", bool, False,
         "Keep the VAE in CPU memory; move it to the GPU for decoding only.", sglang="vae-cpu-offload"),
    Flag("dit-layerwise-offload", bool, False,
         "Stream the DiT's blocks from pinned CPU memory on a copy stream, overlapped with compute.",
         sglang="dit-layerwise-offload"),
    Flag("dit-offload-prefetch-size", float, 1.0,
         "Blocks prefetched ahead under layerwise offload: < 1 is a fraction of the blocks, >= 1 a count.",
         minimum=0.0, requires="dit-layerwise-offload", sglang="dit-offload-prefetch-size"),
    Flag("dit-resident-layers", int, 0,
         "DiT blocks kept resident on the GPU under layerwise offload, spread evenly over the stack so "
         "streamed copies overlap resident compute (partial residency).",
         minimum=0, requires="dit-layerwise-offload"),
    Flag("dit-idle-offload", bool, False,
         "Under layerwise offload, take the resident blocks and the GPU slots off the GPU outside "
         "the denoise loop too (while the text encoders and the VAE run) and copy them back before "
         "it: more blocks fit a VRAM budget, for one copy of the resident bytes per request.",
         requires="dit-layerwise-offload"),
    Flag("pin-cpu-memory", bool, True, "Pin the CPU copies of offloaded weights (faster transfers).",
         sglang="pin-cpu-memory"),
    Flag("vae-precision", str, "fp32", "VAE decode precision (bf16 is lossy).",
         choices=("fp32", "bf16"), lossy_values=frozenset({"bf16"})),
)

FLAG_BY_NAME: dict[str, Flag] = {f.name: f for f in FLAGS}

EngineConfig = dataclasses.make_dataclass(
    "EngineConfig",
    [(f.attr, f.type, dataclasses.field(default=f.default)) for f in FLAGS],
    frozen=True,
)
EngineConfig.__module__ = __name__
EngineConfig.__doc__ = "Engine flags, one field per registry flag (generated from FLAGS)."


@dataclass(frozen=True)
class Constraint:
    name: str
    violated: Callable[[Any], bool]  # EngineConfig -> True when the combination is bad
    message: str | Callable[[Any], str]  # or EngineConfig -> the message, naming the values


def layout_product(c: Any) -> int:
    return (2 if c.enable_cfg_parallel else 1) * c.ulysses_degree * c.ring_degree * c.tp_size


CONSTRAINTS: tuple[Constraint, ...] = (
    Constraint("num-gpus-is-layout-product",
               lambda c: c.num_gpus != layout_product(c),
               lambda c: f"--num-gpus {c.num_gpus} must equal the product of the layout's degrees, here "
                         f"{'2 (cfg parallel) x ' if c.enable_cfg_parallel else ''}{c.ulysses_degree} (ulysses) x "
                         f"{c.ring_degree} (ring) x {c.tp_size} (tp) = {layout_product(c)}; "
                         "e.g. --num-gpus 2 --ulysses-degree 2"),
    Constraint("ring-needs-torch-attention",
               lambda c: c.ring_degree > 1 and c.attention_backend in NO_LSE_BACKENDS,
               "--ring-degree merges partial attention by log-sum-exp, which only the torch_* attention "
               "backends return here; use --attention-backend torch_cudnn_sdpa (or another torch_*)"),
    Constraint("multi-gpu-excludes-dit-offload",
               lambda c: c.num_gpus > 1 and (c.dit_cpu_offload or c.dit_layerwise_offload),
               "--dit-cpu-offload and --dit-layerwise-offload run on one GPU only; drop them or use --num-gpus 1"),
    Constraint("layerwise-excludes-dit-cpu-offload",
               lambda c: c.dit_layerwise_offload and c.dit_cpu_offload,
               "--dit-layerwise-offload and --dit-cpu-offload both move the DiT; use one of them"),
    Constraint("full-compile-excludes-layerwise",
               lambda c: c.enable_torch_compile and c.compile_scope == "full" and c.dit_layerwise_offload,
               "--compile-scope full cannot trace through layerwise offload hooks; use --compile-scope regional"),
    Constraint("cuda-graph-needs-resident-dit",
               lambda c: c.enable_cuda_graph and (c.dit_cpu_offload or c.dit_layerwise_offload),
               "--enable-cuda-graph replays fixed weight addresses; --dit-cpu-offload and --dit-layerwise-offload "
               "move the DiT's weights"),
    Constraint("unpinned-needs-offload",
               lambda c: not c.pin_cpu_memory and not (c.dit_cpu_offload or c.text_encoder_cpu_offload
                                                       or c.vae_cpu_offload or c.dit_layerwise_offload),
               "--no-pin-cpu-memory has no effect without an offload flag (--dit-cpu-offload, "
               "--text-encoder-cpu-offload, --vae-cpu-offload or --dit-layerwise-offload)"),
)


@dataclass(frozen=True)
class ModelConstraint:
    """A rule that reads the model spec and the workload's guidance as well as the flags."""

    name: str
    message: Callable[[Any, Any, float], str | None]  # (config, ModelSpec, guidance) -> why not, or None


def _heads_rule(c: Any, spec: Any, guidance: float) -> str | None:
    heads = spec.attention_heads
    if heads % c.ulysses_degree:
        return (f"--ulysses-degree {c.ulysses_degree} does not divide {spec.name}'s {heads} attention heads; "
                f"use a divisor of {heads} or --ring-degree for the rest")
    if c.tp_size > 1 and heads % c.tp_size == 0 and (heads // c.tp_size) % c.ulysses_degree:
        return (f"--ulysses-degree {c.ulysses_degree} does not divide the {heads // c.tp_size} attention heads "
                f"each of --tp-size {c.tp_size} GPUs holds of {spec.name}; use --ring-degree for the rest")
    return None


def _tp_rule(c: Any, spec: Any, guidance: float) -> str | None:
    """Heads and every split width (fused Q/K/V sections, MLP hidden, FLUX's [attention | MLP]
    output projection) divisible by --tp-size: the model file's tensor plan lists them."""
    if c.tp_size == 1:
        return None
    from .models import tensor_plan

    return tensor_plan(spec).refusal(c.tp_size, spec.name)


def _cfg_rule(c: Any, spec: Any, guidance: float) -> str | None:
    if not c.enable_cfg_parallel or spec.uses_cfg(guidance):
        return None
    if not spec.true_cfg:
        return (f"--enable-cfg-parallel needs true CFG; {spec.name} has none (one DiT pass per step: "
                "its guidance is distilled or absent); use --ulysses-degree or --ring-degree")
    threshold = "> 0" if spec.cfg_style == "zimage" else "> 1"
    return (f"--enable-cfg-parallel needs true CFG; {spec.name} runs it only with --guidance {threshold} "
            f"(got {guidance:g})")


MODEL_CONSTRAINTS: tuple[ModelConstraint, ...] = (
    ModelConstraint("ulysses-divides-heads", _heads_rule),
    ModelConstraint("cfg-parallel-needs-true-cfg", _cfg_rule),
    ModelConstraint("tp-divides-heads-and-widths", _tp_rule),
)


def validate_for_model(cfg: Any, spec: Any, guidance: float) -> Any:
    """`validate`, then the rules that depend on the model and the workload."""
    validate(cfg)
    for c in MODEL_CONSTRAINTS:
        why = c.message(cfg, spec, guidance)
        if why:
            raise FlagError(why)
    return cfg


def _flag(name: str) -> Flag:
    key = name[2:] if name.startswith("--") else name
    try:
        return FLAG_BY_NAME[key.replace("_", "-")]
    except KeyError:
        raise FlagError(f"unknown flag {name!r}; known flags: {', '.join(f.name for f in FLAGS)}") from None


def is_active(flag: Flag, cfg: Any) -> bool:
    """A flag is active when its parent flag (recursively) is on."""
    while flag.requires is not None:
        parent = FLAG_BY_NAME[flag.requires]
        if not getattr(cfg, parent.attr):
            return False
        flag = parent
    return True


def validate(cfg: Any) -> Any:
    for f in FLAGS:
        f.parse(getattr(cfg, f.attr))
        if not is_active(f, cfg) and getattr(cfg, f.attr) != f.default:
            raise FlagError(f"{f.option} has no effect without --{f.requires}; add --{f.requires} or drop it")
    return check_constraints(cfg)


def check_constraints(cfg: Any) -> Any:
    """The registry's constraints alone, for a configuration whose values are known valid (the
    tuner's enumeration builds them from checked values, inactive flags at their defaults)."""
    for c in CONSTRAINTS:
        if c.violated(cfg):
            raise FlagError(c.message(cfg) if callable(c.message) else c.message)
    return cfg


def config_from_dict(values: Mapping[str, Any]) -> Any:
    """{'attention-backend': 'torch_cudnn_sdpa', ...} (names with - or _, values typed or text)."""
    kwargs = {}
    for name, value in values.items():
        f = _flag(name)
        kwargs[f.attr] = f.parse(value)
    return validate(EngineConfig(**kwargs))


def config_to_dict(cfg: Any, non_default: bool = False) -> dict[str, Any]:
    out = {}
    for f in FLAGS:
        v = getattr(cfg, f.attr)
        if not non_default or v != f.default:
            out[f.name] = v
    return out


def config_to_argv(cfg: Any) -> list[str]:
    """Non-default flags only, registry order: stable and diffable."""
    argv: list[str] = []
    for f in FLAGS:
        v = getattr(cfg, f.attr)
        if v != f.default:
            argv += f.render(v)
    return argv


def config_from_argv(argv: Iterable[str]) -> Any:
    """Parse engine flags (`--flag value`, `--flag=value`, `--bool-flag`, `--no-bool-flag`)."""
    tokens = list(argv)
    values: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            raise FlagError(f"unexpected argument {tok!r}")
        name, eq, inline = tok[2:].partition("=")
        if name.startswith("no-") and name[3:] in FLAG_BY_NAME and FLAG_BY_NAME[name[3:]].type is bool:
            if eq:
                raise FlagError(f"{tok!r}: --no-{name[3:]} takes no value")
            values[name[3:]] = False
            i += 1
            continue
        f = _flag(name)
        if eq:
            values[f.name] = f.parse(inline)
            i += 1
        elif f.type is bool:
            values[f.name] = True
            i += 1
        else:
            if i + 1 >= len(tokens):
                raise FlagError(f"{f.option} needs a value")
            values[f.name] = f.parse(tokens[i + 1])
            i += 2
    return config_from_dict(values)


def parse_fix(items: Iterable[str]) -> dict[str, Any]:
    """`--fix flag=value` items of `dittune tune` -> {flag name: typed value}."""
    out: dict[str, Any] = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise FlagError(f"--fix {item!r}: expected flag=value, e.g. attention-backend=torch_cudnn_sdpa")
        f = _flag(name.strip())
        out[f.name] = f.parse(value)
    return out


def is_lossless(cfg: Any) -> bool:
    return all(getattr(cfg, f.attr) not in f.lossy_values for f in FLAGS if is_active(f, cfg))


# Bump when what a flag does changes without its declaration changing, so stored measurements of
# the old meaning stop answering for the new one. 2: --dit-resident-layers spreads its blocks;
# 3: the engine reserves through expandable segments (peaks measured before are not comparable);
# 4: --text-encoder-cpu-offload streams the encoders' layers during encode.
SEMANTICS_VERSION = 4


def registry_hash() -> str:
    """Short hash of everything that defines the flag space and its semantics."""
    desc: list = [{"semantics": SEMANTICS_VERSION}] + [
        {
            "name": f.name, "type": f.type.__name__, "default": f.default,
            "choices": list(f.choices) if f.choices else None, "minimum": f.minimum,
            "lossy": sorted(map(str, f.lossy_values)), "requires": f.requires, "multi_gpu": f.multi_gpu,
        }
        for f in FLAGS
    ] + [c.name for c in CONSTRAINTS] + [c.name for c in MODEL_CONSTRAINTS]
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def to_sglang_argv(cfg: Any) -> tuple[list[str], list[str]]:
    """SGLang Diffusion flags for the non-default flags of `cfg`, and the flags it has no equivalent for."""
    argv: list[str] = []
    missing: list[str] = []
    for f in FLAGS:
        v = getattr(cfg, f.attr)
        if v == f.default:
            continue
        if f.sglang is None or (f.sglang_values is not None and v not in f.sglang_values):
            missing += f.render(v)
            continue
        sv = f.sglang_values[v] if f.sglang_values is not None else v
        argv += dataclasses.replace(f, name=f.sglang).render(sv)
    return argv, missing
