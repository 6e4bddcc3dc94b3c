"""Checks of a tune request that need no database: the input first (a malformed budget, a device
that is not one, a guidance the model ignores), then the machine (NVML that fails, a CPU study of
a model that cannot fit host memory). Both run before the study touches the database."""

from __future__ import annotations

import torch

from dittune.engine.budget import parse_budget
from dittune.engine.checks import check_guidance, check_host_memory, parse_device
from dittune.engine.gpu import Detection
from dittune.engine.checkpoint import resolve

from .errors import TunerError


def check_options(opt) -> None:
    """`opt` (TuneOptions) on its own: reported before anything about the machine."""
    if opt.vram_budget is not None:
        parse_budget(opt.vram_budget)
    check_guidance(resolve(opt.model, opt.model_path), opt.guidance)
    device = parse_device(opt.device)
    if device is not None and device.type == "cuda" and device.index is not None:
        raise TunerError(f"--device {opt.device}: tune picks the GPU with --gpu {device.index}, and --device cuda")
    if opt.gpu_index is not None and opt.gpu_index < 0:
        raise TunerError(f"--gpu {opt.gpu_index} is not a GPU index")


def check_machine(opt, det: Detection) -> None:
    """`opt` against this machine, as `detect()` saw it."""
    if opt.device == "cpu":
        on_cpu = True
    elif det.failed:
        raise TunerError(f"{det.reason}: cannot read the GPUs' memory for the study; fix NVML, or pass --device cpu")
    elif not det and torch.cuda.is_available():
        raise TunerError(f"PyTorch sees a CUDA GPU but NVML does not ({det.reason}); fix NVML, or pass --device cpu")
    else:
        on_cpu = not det or not torch.cuda.is_available()
    if not on_cpu:
        return
    if opt.gpu_index not in (None, 0):
        raise TunerError(f"--gpu {opt.gpu_index}: the study runs on the CPU here ({det.reason or '--device cpu'})")
    if opt.gpus is not None:
        raise TunerError(f"--gpus: the study runs on the CPU here ({det.reason or '--device cpu'})")
    if opt.vram_budget is not None:
        raise TunerError(f"--vram-budget needs an NVIDIA GPU ({det.reason or 'running on the CPU'})")
    check_host_memory(resolve(opt.model, opt.model_path), torch.float32)  # CPU trials run in fp32
