"""Flow-matching Euler: the sigma schedule of diffusers' FlowMatchEulerDiscreteScheduler (with
each family's shift settings) and the Euler update, in float32 as diffusers does it."""

from __future__ import annotations

import math

import numpy as np
import torch

from .models.base import SchedulerSpec


def calculate_shift(image_seq_len: int, spec: SchedulerSpec) -> float:
    m = (spec.max_shift - spec.base_shift) / (spec.max_image_seq_len - spec.base_image_seq_len)
    b = spec.base_shift - m * spec.base_image_seq_len
    return image_seq_len * m + b


def sigmas(spec: SchedulerSpec, steps: int, image_seq_len: int) -> torch.Tensor:
    """[steps + 1] float32, from 1 (noise) down to the terminal 0."""
    s = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
    if spec.use_dynamic_shifting:
        mu = calculate_shift(image_seq_len, spec)
        with np.errstate(divide="ignore"):
            if spec.time_shift_type == "linear":
                s = mu / (mu + (1 / s - 1))
            else:
                s = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    else:
        s = spec.shift * s / (1 + (spec.shift - 1) * s)
    if spec.shift_terminal:
        s = 1 - (1 - s) * (1 - spec.shift_terminal) / (1 - s[-1])
    t = torch.from_numpy(np.asarray(s, dtype=np.float32))
    return torch.cat([t, torch.zeros(1)])


def euler_step(sample: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    return (sample.float() + (sigma_next - sigma) * velocity.float()).to(velocity.dtype)
