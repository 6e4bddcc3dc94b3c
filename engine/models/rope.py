"""Rotary position embedding on interleaved pairs, RMSNorm, and the joint QK-norm + RoPE of
dual-stream blocks, shared by the FLUX and Qwen-Image files (the same rotation in both; Z-Image keeps
diffusers' complex-table form in its own file)."""

import torch
import torch.nn.functional as F


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) in fp32.  x [B, L, H, D]; cos, sin [L, D/2] fp32
    -> fp32 [B, L, H, D], a new tensor in that (contiguous) layout."""
    x = x.float().unflatten(-1, (-1, 2))  # [B, L, H, D/2, 2]
    cos, sin = cos[:, None], sin[:, None]  # [L, 1, D/2]: the same angle for every head
    if torch.compiler.is_compiling():
        # Inductor generates no complex code; in real arithmetic it fuses norm and rotation.
        re, im = x.unbind(-1)
        return torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2)
    # Eager: one vectorised complex multiply is the fewest passes (broadcast real ops ran slower).
    freqs = torch.view_as_complex(torch.stack((cos, sin), dim=-1))  # [L, 1, D/2], small
    return torch.view_as_real(torch.view_as_complex(x) * freqs).flatten(-2)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim (FLUX's and Qwen-Image's per-head and text-input norms)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def joint_qk_norm_rope(
    q_txt: torch.Tensor,
    k_txt: torch.Tensor,
    q_img: torch.Tensor,
    k_img: torch.Tensor,
    q_weight_txt: torch.Tensor,
    k_weight_txt: torch.Tensor,
    q_weight_img: torch.Tensor,
    k_weight_img: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual-stream blocks (FLUX double, Qwen-Image): each stream's own per-head RMSNorm, then RoPE
    over the joint positions -> (q, k), each [B, H, Lt + Li, D] with the text first: views of new
    contiguous [B, Lt + Li, H, D] tensors, the layout attention takes without a copy.

    q_txt, k_txt [B, Lt, H, D] and q_img, k_img [B, Li, H, D]: strided views into the packed QKV
    projections. cos, sin [Lt + Li, D/2] fp32, text positions first. Same signature and result as
    dittune.kernels.joint_qk_norm_rope.
    """
    b, lt, h, d = q_txt.shape
    li = q_img.shape[1]

    def one(txt, img, w_txt, w_img):
        joint = txt.new_empty(b, lt + li, h, d)  # written in place: no cat of the two streams
        joint[:, :lt].copy_(rope(rms_norm(txt, w_txt, eps), cos[:lt], sin[:lt]))
        joint[:, lt:].copy_(rope(rms_norm(img, w_img, eps), cos[lt:], sin[lt:]))
        return joint.transpose(1, 2)

    return one(q_txt, q_img, q_weight_txt, q_weight_img), one(k_txt, k_img, k_weight_txt, k_weight_img)
