"""Rotary position embedding on interleaved pairs, shared by the FLUX and Qwen-Image files (the
same rotation in both; Z-Image keeps diffusers' complex-table form in its own file)."""

import torch


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) in fp32.  x [B, H, L, D]; cos, sin [L, D/2] fp32 -> fp32."""
    x = x.float().unflatten(-1, (-1, 2))  # [B, H, L, D/2, 2]
    if torch.compiler.is_compiling():
        # Inductor generates no complex code; in real arithmetic it fuses norm and rotation.
        re, im = x.unbind(-1)
        return torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2)
    # Eager: one vectorised complex multiply is the fewest passes (broadcast real ops ran slower).
    freqs = torch.view_as_complex(torch.stack((cos, sin), dim=-1))  # [L, D/2], small
    return torch.view_as_real(torch.view_as_complex(x) * freqs).flatten(-2)
