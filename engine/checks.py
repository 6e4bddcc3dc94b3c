"""Checks of a request before anything loads: the device, the workload against what the model
uses, and whether a CPU run fits the host's memory. `generate` and `tune` share them, so both
refuse the same input with the same line."""

from __future__ import annotations

import os

import torch

from .errors import EngineError
from .models.base import Family


def parse_device(text: str | None) -> torch.device | None:
    """--device: cuda, cuda:N or cpu (None: the caller's default). Anything else is refused."""
    if text is None:
        return None
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise EngineError(f"--device {text!r} is not a device (use cuda, cuda:N or cpu)") from None
    if device.type not in ("cuda", "cpu"):
        raise EngineError(f"--device {text!r}: only cuda and cpu are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"--device {text}: no CUDA device is available to PyTorch here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise EngineError(f"--device {text}: this machine has CUDA devices 0..{torch.cuda.device_count() - 1}")
    return device


def check_guidance(family: Family, guidance: float | None, negative_prompt: str = "") -> None:
    """Refuse what the model would silently ignore: a negative prompt without a CFG pass, a
    guidance value for a model with neither a guidance input nor CFG; and negative guidance."""
    spec = family.spec
    if guidance is not None and guidance < 0:
        raise EngineError(f"--guidance {guidance:g} must be >= 0")
    g = spec.guidance if guidance is None else guidance
    guided = bool(getattr(spec.dit_config, "guidance_embeds", False))
    if guidance and not spec.true_cfg and not guided:
        raise EngineError(f"--guidance {guidance:g}: {spec.name} has no guidance input (timestep-distilled); leave --guidance out")
    if negative_prompt and not spec.uses_cfg(g):
        if not spec.true_cfg:
            why = f"{spec.name} has no classifier-free guidance pass"
        else:
            above = "0" if spec.cfg_style == "zimage" else "1"
            why = f"{spec.name} makes the negative pass only with --guidance above {above} (here {g:g})"
        raise EngineError(f"--negative-prompt would be ignored: {why}")


def weights_bytes(family: Family, dtype: torch.dtype) -> int:
    """Parameter bytes of every component in `dtype` (the VAE in fp32), from a build on the meta
    device: no memory, no time."""
    import diffusers

    from . import components

    spec = family.spec
    total = 0
    with torch.device("meta"), components.default_dtype(dtype):
        total += _bytes(family.transformer_cls(spec.dit_config))
        for te in spec.text_encoders:
            config_cls, model_cls = components._text_classes(te.arch)
            total += _bytes(model_cls(config_cls(**te.config)))
    with torch.device("meta"):
        vae = getattr(diffusers, spec.vae.cls)(**{k: v for k, v in spec.vae.config.items() if not k.startswith("_")})
    return total + sum(p.numel() for p in vae.parameters()) * 4


def available_host_bytes() -> int | None:
    """Memory the kernel says a new process can take (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_host_memory(family: Family, dtype: torch.dtype) -> None:
    """A CPU run holds every weight in host memory: refuse up front what cannot fit, instead of
    growing until the kernel kills the process."""
    from .budget import format_bytes

    need = weights_bytes(family, dtype)
    have = available_host_bytes()
    if have is not None and need > have:
        raise EngineError(
            f"{family.spec.name} on the CPU needs at least {format_bytes(need)} of host memory for its weights "
            f"({str(dtype).removeprefix('torch.')}); {format_bytes(have)} is available. Run it on a GPU, "
            "or use a -tiny model (`dittune models`)"
        )


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
