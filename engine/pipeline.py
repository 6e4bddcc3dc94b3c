"""The pipeline: load components with the placement the flags ask for, then run requests:
encode text -> prepare latents -> denoise loop (CFG in one place) -> decode.

Every flag either applies here or raises; `manifest()` reports what actually ran."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from . import attention, components, perf, scheduler
from .errors import EngineError
from .flags import config_to_dict
from .cudagraph import GraphedPasses
from .models.base import Family, pack_modulation
from .offload import ComponentOffload, LayerwiseOffload, TextEncoderOffload
from .ops import use_fused_kernels
from .perf import StagePeaks, StepTimer, sync

if TYPE_CHECKING:
    from .parallel.context import RankContext

CUDA_ONLY_FLAGS = ("dit_cpu_offload", "text_encoder_cpu_offload", "vae_cpu_offload", "dit_layerwise_offload",
                   "enable_cuda_graph")


def supported_values(device: torch.device) -> dict[str, tuple]:
    """Flags whose values are restricted on `device`: flag name -> the values that can run there.
    Flags not listed run with any value of their registry domain."""
    from dittune import kernels

    out: dict[str, tuple] = {"attention-backend": tuple(attention.available_backends(device))}
    if not kernels.triton_available(device):
        out["fused-kernels"] = (False,)
    if device.type != "cuda":
        for attr in CUDA_ONLY_FLAGS:
            out[attr.replace("_", "-")] = (False,)
        out["pin-cpu-memory"] = (True,)
    return out


@dataclass
class RequestTimes:
    stages: dict[str, float] = field(default_factory=dict)  # seconds, device-synchronised
    steps: list[float] = field(default_factory=list)  # seconds per denoise step (all DiT passes of it)


class Pipeline:
    def __init__(self, family: Family, flags: Any, device: torch.device, dtype: torch.dtype, model_path: Path | None = None,
                 parallel: "RankContext | None" = None):
        self.family, self.spec, self.flags = family, family.spec, flags
        self.device, self.dtype, self.model_path = device, dtype, model_path
        # One rank of several (engine/parallel): rank 0 alone holds the VAE, the last rank the text
        # encoders (parallel/context.py encoder_rank); one process holds both.
        self.par = parallel
        self.main = parallel is None or parallel.is_main
        self.encodes = parallel is None or parallel.encodes
        self._check_supported()
        if model_path is not None:
            components.check_checkpoint_dir(model_path, family)
        self._offloads: dict[str, ComponentOffload | TextEncoderOffload] = {}
        self.peaks = StagePeaks(device)  # peak VRAM per stage (load: what is held before the first)
        self._compiled: list[str] = []

        t0 = time.perf_counter()
        self.load_parts: dict[str, float] = {}  # seconds per part of the load (device-synchronised)
        mark = [t0]

        def part(name: str) -> None:
            sync(device)
            now = time.perf_counter()
            self.load_parts[name] = now - mark[0]
            mark[0] = now

        # The DiT first: a checkpoint whose DiT does not match fails before ~9 GiB of T5-XXL load.
        # Under tensor parallelism each rank builds or reads only its share of the DiT.
        self.dit = components.build_dit(family, self._home(flags.dit_cpu_offload or flags.dit_layerwise_offload), dtype,
                                        model_path, tensor=parallel.groups if parallel is not None else None)
        part("dit_s")
        encoders = self.spec.text_encoders if self.encodes else ()
        self.tokenizers = {te.name: components.build_tokenizer(te, model_path) for te in encoders}
        self.text_encoders = {
            te.name: components.build_text_encoder(te, self._home(flags.text_encoder_cpu_offload), dtype, model_path, seed=i + 1)
            for i, te in enumerate(encoders)
        }
        part("text_encoders_s")
        self.vae_dtype = torch.float32 if flags.vae_precision == "fp32" else torch.bfloat16
        self.vae = None
        if self.main:
            self.vae = components.build_vae(self.spec.vae, self._home(flags.vae_cpu_offload), self.vae_dtype, model_path)
        part("vae_s")

        pin = flags.pin_cpu_memory
        if flags.text_encoder_cpu_offload:
            # Layers streamed during encode, the rest visiting for it: never the whole encoder on the GPU.
            for name, enc in self.text_encoders.items():
                self._offloads[name] = TextEncoderOffload(enc, device, pin)
        if flags.vae_cpu_offload and self.vae is not None:
            self._offloads["vae"] = ComponentOffload(self.vae, device, pin)
        if flags.dit_cpu_offload:
            self._offloads["dit"] = ComponentOffload(self.dit, device, pin)
        self.layerwise = None
        if flags.dit_layerwise_offload:
            self.layerwise = LayerwiseOffload(self.dit, device, flags.dit_offload_prefetch_size,
                                              flags.dit_resident_layers, pin, idle=flags.dit_idle_offload)
        part("offload_setup_s")

        # One GEMV for every block's modulation, when the DiT stays whole on the device.
        self.packed_modulation = self.layerwise is None and not flags.dit_cpu_offload and pack_modulation(self.dit)
        if self.packed_modulation and device.type == "cuda":
            torch.cuda.empty_cache()  # the per-block weights it replaced would stay reserved (6 GiB for FLUX)
        attention.set_backend(self.dit, flags.attention_backend)
        self.fused = use_fused_kernels(self.dit, device) if flags.fused_kernels else []
        self.sp_attention = 0
        if parallel is not None:  # before compile, so compiled blocks trace the collectives
            from .parallel import sequence_parallel

            self.sp_attention = sequence_parallel(self.dit, parallel.groups)
        self._apply_compile()
        self.graphed = GraphedPasses(self._passes, device) if flags.enable_cuda_graph else None
        part("dit_setup_s")  # packing, backends, kernels, compile wrappers (compiling happens at the first call)
        self.load_s = time.perf_counter() - t0

    # --- flags ------------------------------------------------------------------------------------

    def _home(self, offloaded: bool) -> torch.device:
        return torch.device("cpu") if offloaded else self.device

    def _check_supported(self) -> None:
        f = self.flags
        if self.device.type != "cuda":
            on = [name for name in CUDA_ONLY_FLAGS if getattr(f, name)]
            if on:
                raise EngineError(f"--{on[0].replace('_', '-')} needs a CUDA device (running on {self.device})")
        avail = attention.available_backends(self.device)
        if f.attention_backend not in avail:
            raise EngineError(
                f"attention backend {f.attention_backend!r} is not available on {self.device}; available: {', '.join(avail)}"
            )

    def _apply_compile(self) -> None:
        f = self.flags
        if f.enable_torch_compile:
            self._compiled = compile_dit(self.dit, f.compile_scope, f.compile_mode)

    # --- stages -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _visit(self, names: list[str]):
        """A stage: onload the offloaded components it uses, offload them after (a streamed text
        encoder: its non-layer weights and its layer slots)."""
        visiting = [self._offloads[n] for n in names if n in self._offloads]
        for o in visiting:
            o.onload()
        try:
            yield
        finally:
            for o in visiting:
                o.offload()

    @contextlib.contextmanager
    def _denoising(self):
        """The denoise loop: the DiT's offloaded parts visit (whole, --dit-cpu-offload; the resident
        blocks and slots of --dit-idle-offload), and leave after."""
        idle = self.layerwise is not None and self.layerwise.idle
        with self._visit(["dit"]):
            if idle:
                self.layerwise.begin()
            try:
                yield
            finally:
                if idle:
                    self.layerwise.end()

    @torch.inference_mode()
    def encode(self, prompt: str) -> dict[str, torch.Tensor]:
        tokens = {}
        for te in self.spec.text_encoders:
            batch = self.tokenizers[te.name](self.family.prompt_text(te.name, prompt))
            batch.input_ids = batch.input_ids.to(self.device)
            batch.attention_mask = batch.attention_mask.to(self.device)
            tokens[te.name] = batch
        with self._visit(list(self.text_encoders)):
            cond = self.family.encode_prompt(self.text_encoders, tokens)
        return {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in cond.items()}

    @torch.inference_mode()
    def __call__(
        self, prompt: str, negative_prompt: str, width: int, height: int, steps: int, guidance: float, seed: int,
        on_step: Callable[[int], None] | None = None,
    ) -> tuple[torch.Tensor, RequestTimes]:
        times = RequestTimes()
        dev = self.device
        do_cfg = self.spec.uses_cfg(guidance)

        sync(dev)
        t = time.perf_counter()
        with self.peaks.stage("encode"):
            if self.encodes:
                cond = self.encode(prompt)
                neg = self.encode(negative_prompt) if do_cfg else None
            if self.par is not None:  # the encoder rank encodes, every rank gets the embeddings
                cond, neg = self.par.broadcast((cond, neg) if self.encodes else None, src=self.par.encoder_rank)
            sync(dev)
        times.stages["encode_s"] = time.perf_counter() - t

        t = time.perf_counter()
        # A CPU generator on every device: the noise of diffusers' pipelines called with
        # generator=torch.Generator("cpu").manual_seed(seed) (drawn on the CPU in the pipeline's dtype, moved).
        gen = torch.Generator("cpu").manual_seed(seed)
        latents = self.family.prepare_latents(1, height, width, gen, dev, self.dtype)
        sig = scheduler.sigmas(self.spec.scheduler, steps, self.family.image_seq_len(height, width)).tolist()
        sync(dev)
        times.stages["prepare_s"] = time.perf_counter() - t

        t = time.perf_counter()
        timer = StepTimer(dev)
        cfg_parallel = self.flags.enable_cfg_parallel
        with self.peaks.stage("denoise"), self._denoising():
            for i in range(steps):
                timer.start()
                sigma = torch.full((1,), sig[i], device=dev, dtype=torch.float32)
                conds = [cond, neg] if do_cfg else [cond]
                if cfg_parallel:  # this rank's branch only
                    conds = [conds[self.par.cfg_index]]
                run = self._passes if self.graphed is None else self.graphed
                vs = run(latents, sigma, conds, (guidance, height, width))
                if cfg_parallel:  # one gather of the prediction per step
                    vs = self.par.gather_cfg(vs[0])
                v = cfg_combine(vs[0], vs[1], guidance, self.spec.cfg_style, self.spec.cfg_renorm) if do_cfg else vs[0]
                latents = scheduler.euler_step(latents, v, sig[i], sig[i + 1])
                timer.stop()
                if on_step is not None:
                    on_step(i)
            sync(dev)
        times.stages["denoise_s"] = time.perf_counter() - t
        times.steps = timer.seconds()
        self.last_latents = latents  # [B, L, C], for checks of parallel layouts against one process

        t = time.perf_counter()
        if not self.main:  # the VAE lives on rank 0
            times.stages["decode_s"] = 0.0
            return None, times
        with self.peaks.stage("decode"):
            with self._visit(["vae"]):
                z = self.family.unpack_latents(latents, height, width).to(self.vae_dtype)
                image = self.vae.decode(z, return_dict=False)[0]
            if image.ndim == 5:  # video VAE (Qwen-Image): [B, C, T, H, W], one frame
                image = image[:, :, 0]
            image = ((image.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu()  # [B, 3, H, W]
            sync(dev)
        times.stages["decode_s"] = time.perf_counter() - t
        return image, times

    def account_collectives(self, prompt: str, negative_prompt: str, width: int, height: int, guidance: float) -> dict[str, Any]:
        """Bytes this rank sends to other ranks in one denoise step, counted on one eager step
        (compiled and graphed steps run the same collectives but cannot count them). Run it after
        the measured request: it is not timed, and its peak memory is not the configuration's."""
        from .parallel.attention import SequenceParallelAttention

        sps = {id(m.sp): m.sp for m in self.dit.modules()
               if isinstance(m, attention.Attention) and isinstance(m.sp, SequenceParallelAttention)}
        tp = getattr(self.dit, "tp", None)  # the tensor-parallel all-reduce (engine/parallel/tensor.py)
        for sp in [*sps.values(), self.dit.seq, *([tp] if tp is not None else [])]:
            sp.bytes_sent = 0
        do_cfg = self.spec.uses_cfg(guidance)
        with torch.inference_mode(), torch.compiler.set_stance("force_eager"):
            cond = neg = None
            if self.encodes:
                cond = self.encode(prompt)
                neg = self.encode(negative_prompt) if do_cfg else None
            cond, neg = self.par.broadcast((cond, neg) if self.encodes else None, src=self.par.encoder_rank)
            latents = self.family.prepare_latents(1, height, width, torch.Generator("cpu").manual_seed(0), self.device, self.dtype)
            sigma = torch.ones(1, device=self.device)
            conds = [cond, neg] if do_cfg else [cond]
            if self.flags.enable_cfg_parallel:
                conds = [conds[self.par.cfg_index]]
            with self._denoising():
                vs = self._passes(latents, sigma, conds, (guidance, height, width))
            sync(self.device)
        attn = sum(sp.bytes_sent for sp in sps.values())
        out = self.dit.seq.bytes_sent if sps else 0
        cfg = vs[0].numel() * vs[0].element_size() if self.flags.enable_cfg_parallel else 0
        tp_bytes = tp.bytes_sent if tp is not None else 0  # its all-reduces and modulation all-gathers
        return {"attention_bytes": attn, "output_gather_bytes": out, "cfg_gather_bytes": cfg,
                "tensor_parallel_bytes": tp_bytes, "total_bytes": attn + out + cfg + tp_bytes}

    def _passes(self, latents: torch.Tensor, sigma: torch.Tensor, conds: list, static: tuple) -> list[torch.Tensor]:
        """The DiT passes of one denoise step (conditional, then negative under true CFG); they
        share one step cache. What --enable-cuda-graph captures."""
        guidance, height, width = static
        step_cache: dict = {}
        return [self.family.predict(self.dit, latents, sigma, c, guidance, height, width, step_cache) for c in conds]

    # --- manifest ---------------------------------------------------------------------------------

    def manifest(self) -> dict[str, Any]:
        f = self.flags

        def place(name: str) -> str:
            if name == "dit" and self.layerwise is not None:
                return "layerwise_offload"
            if isinstance(self._offloads.get(name), TextEncoderOffload):
                return "layerwise_offload"
            return "cpu_offload" if name in self._offloads else "resident"

        return {
            "model": self.spec.name,
            "family": self.spec.family,
            "weights": "synthetic" if self.model_path is None else f"checkpoint:{self.model_path}",
            "device": str(self.device) + (f" ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda" else ""),
            "dtype": str(self.dtype).removeprefix("torch."),
            "host": perf.host(),
            "flags": config_to_dict(f),
            "attention": {"backend": f.attention_backend, "calls": attention.calls(self.dit)},
            "compile": {
                "enabled": f.enable_torch_compile,
                "scope": f.compile_scope if f.enable_torch_compile else None,
                "mode": f.compile_mode if f.enable_torch_compile else None,
                "compiled": list(self._compiled),
            },
            "fused_kernels": {"enabled": bool(self.fused), "kernels": self.fused},
            "modulation": "packed" if self.packed_modulation else "per_block",
            "cuda_graph": self.graphed.manifest() if self.graphed is not None else {"enabled": False},
            "placement": {
                "dit": place("dit"),
                **{name: place(name) for name in self.text_encoders},
                **({"vae": place("vae")} if self.vae is not None else {}),
            },
            "offloaded_bytes": {n: o.bytes for n, o in self._offloads.items()},
            "pinned": bool(self._offloads) and f.pin_cpu_memory,
            "layerwise": self.layerwise.manifest() if self.layerwise else None,
            "text_encoder_layerwise": {
                n: o.manifest() for n, o in self._offloads.items() if isinstance(o, TextEncoderOffload)
            } or None,
            "vae_dtype": str(self.vae_dtype).removeprefix("torch."),
            "parameters": {
                "dit": _count(self.dit),
                **{name: _count(m) for name, m in self.text_encoders.items()},
                **({"vae": _count(self.vae)} if self.vae is not None else {}),
            },
            "sequence_parallel_attention": self.sp_attention,
            "tensor_parallel_linears": len({k.rsplit(".", 1)[0] for k in getattr(self.dit, "tp_shards", {})}),
        }


def compile_dit(dit: nn.Module, scope: str, mode: str) -> list[str]:
    """torch.compile the DiT: `regional` compiles each repeated block's forward (one graph per
    block class, reused), `full` the whole module. Returns what was compiled (for the manifest)."""
    mode_arg = None if mode == "default" else mode
    if scope == "full":
        dit.compile(mode=mode_arg, fullgraph=True)
        return [type(dit).__name__]
    names = getattr(dit, "repeated_blocks", ())
    if not names:
        raise EngineError(f"{type(dit).__name__} declares no repeated blocks for regional compile")
    for name in names:
        # Compile forward, not the module: Module.compile would trace its hooks too, and
        # layerwise offload's hooks (stream waits, weight swaps) must stay eager.
        for block in getattr(dit, name):
            block.forward = torch.compile(block.forward, mode=mode_arg, fullgraph=True)
    return list(names)


def cfg_combine(v: torch.Tensor, v_neg: torch.Tensor, scale: float, style: str, renorm: bool) -> torch.Tensor:
    if style == "zimage":
        out = v + scale * (v - v_neg)
    else:
        out = v_neg + scale * (v - v_neg)
    if renorm:  # Qwen-Image: keep the norm of the conditional prediction
        cond_norm = torch.norm(v, dim=-1, keepdim=True)
        out_norm = torch.norm(out, dim=-1, keepdim=True)
        out = out * (cond_norm / out_norm)
    return out


def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())

