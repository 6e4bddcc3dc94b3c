"""The one attention layer. Every DiT calls attention through `Attention`; backends plug in here,
and so does sequence parallelism (engine/parallel/attention.py). A backend either runs as asked or raises: forced SDPA
backends use `sdpa_kernel` with a single backend, so PyTorch cannot fall back silently.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import EngineError

_FORCED = {
    "torch_cudnn_sdpa": SDPBackend.CUDNN_ATTENTION,
    "torch_flash_sdpa": SDPBackend.FLASH_ATTENTION,
    "torch_efficient_sdpa": SDPBackend.EFFICIENT_ATTENTION,
}

BACKENDS = ("torch_sdpa", *_FORCED, "fa", "flashinfer", "sage_attn")
# Backends that return no log-sum-exp here, so ring attention cannot merge their partial outputs.
NO_LSE_BACKENDS = ("fa", "flashinfer", "sage_attn")
LOSSY_BACKENDS = frozenset({"sage_attn"})


def _sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _forced_sdpa(backend: SDPBackend) -> Callable:
    def run(q, k, v, mask):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return run


# flash-attn, flashinfer and SageAttention take and return [B, L, H, D] ("NHD"): the models' q, k, v
# are [B, H, L, D] views of that storage, so the transposes around these ops are free, and so is
# the output's reshape to [B, L, H * D]. All read any strides with a contiguous head dim.
def _token_major(name: str, op: Callable) -> Callable:
    def run(q, k, v, mask):
        if mask is not None:
            raise EngineError(f"attention backend {name!r} does not take an attention mask")
        return op(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    return run


# Third-party kernels as opaque custom ops: torch.compile keeps them as one node instead of
# tracing into (and breaking on) their Python launchers. q, k, v [B, L, H, D] -> [B, L, H, D].
@torch.library.custom_op("dittune::flash_attention", mutates_args=())
def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = _flash_attn_func()(q, k, v)
    out = out[0] if isinstance(out, tuple) else out
    return out.contiguous()  # already is: the fake below promises it


@torch.library.custom_op("dittune::sage_attention", mutates_args=())
def _sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from sageattention import sageattn

    # The one copy this backend keeps: sageattn 1.x subtracts the mean of K in place by default
    # (smooth_k), and K is the caller's tensor.
    return sageattn(q, k.clone(), v, tensor_layout="NHD", is_causal=False).contiguous()


@torch.library.custom_op("dittune::flashinfer_attention", mutates_args=())
def _flashinfer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # flashinfer's single-request prefill takes one sequence [L, H, D] ("NHD"); a batch of B
    # (true CFG batched) runs B calls into one output.
    prefill = _flashinfer_prefill()
    if q.shape[0] == 1:
        return prefill(q[0], k[0], v[0], causal=False, kv_layout="NHD").unsqueeze(0).contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    for b in range(q.shape[0]):
        out[b] = prefill(q[b], k[b], v[b], causal=False, kv_layout="NHD")
    return out


def _token_major_fake(q, k, v):
    return torch.empty_like(q, memory_format=torch.contiguous_format)  # [B, L, H, D]


for _op in (_flash_attention, _sage_attention, _flashinfer_attention):
    _op.register_fake(_token_major_fake)


def _flash_attn_func():
    try:
        from flash_attn.cute import flash_attn_func  # FA4

        return flash_attn_func
    except ImportError:
        pass
    try:
        from flash_attn_interface import flash_attn_func  # FA3

        return flash_attn_func
    except ImportError as e:
        raise EngineError("attention backend 'fa' needs flash-attn 3 or 4 installed "
                          '(pip install "dittune[fa4]" for flash-attn 4)') from e


def _flashinfer_prefill():
    try:
        from flashinfer import single_prefill_with_kv_cache

        return single_prefill_with_kv_cache
    except ImportError as e:
        raise EngineError("attention backend 'flashinfer' needs flashinfer installed "
                          '(pip install "dittune[flashinfer]")') from e


_IMPLS: dict[str, Callable] = {
    "torch_sdpa": _sdpa,
    **{name: _forced_sdpa(b) for name, b in _FORCED.items()},
    "fa": _token_major("fa", torch.ops.dittune.flash_attention),
    "flashinfer": _token_major("flashinfer", torch.ops.dittune.flashinfer_attention),
    "sage_attn": _token_major("sage_attn", torch.ops.dittune.sage_attention),
}


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on this machine and device (only these enter the tuner's space)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return ["torch_sdpa"]
    out = ["torch_sdpa"]
    major, _ = torch.cuda.get_device_capability(device)
    if torch.backends.cudnn.is_available() and major >= 8:
        out.append("torch_cudnn_sdpa")
    if major >= 8:
        out += ["torch_flash_sdpa", "torch_efficient_sdpa"]
    else:
        out.append("torch_efficient_sdpa")
    try:
        _flash_attn_func()
        if major >= 9:
            out.append("fa")
    except EngineError:
        pass
    try:
        _flashinfer_prefill()
        if major >= 8:
            out.append("flashinfer")
    except EngineError:
        pass
    try:
        import sageattention  # noqa: F401

        out.append("sage_attn")
    except ImportError:
        pass
    return out


def merge_heads(out: torch.Tensor) -> torch.Tensor:
    """Attention output [B, H, L, D] -> contiguous [B, L, H*D]: a view when `out` lies in [B, L, H, D]
    storage (what SDPA's kernels, flash-attn and SageAttention return for q, k, v [B, H, L, D]
    views of [B, L, H, D] storage, the layout every model hands attention), else one copy."""
    b, h, l, d = out.shape
    return out.transpose(1, 2).reshape(b, l, h * d).contiguous()


class Attention(nn.Module):
    """q, k, v: [B, H, L, D] -> [B, L, H*D]. `backend` is set by the engine, never by a model.

    The models pass q, k, v as [B, H, L, D] views of [B, L, H, D] storage (`.transpose(1, 2)` of
    their projections' layout, any stride over L): no copy before attention, and none after."""

    def __init__(self):
        super().__init__()
        self.backend = "torch_sdpa"
        self.calls: Counter[str] = Counter()
        # Sequence parallelism (engine/parallel): q, k, v are this rank's tokens; `mask` covers the
        # keys of every rank, in rank order.
        self.sp = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            self.calls[self.backend] += 1
        if self.sp is not None:
            return self.sp(q, k, v, mask, _IMPLS[self.backend], self.backend)  # [B, L_r, H*D]
        return merge_heads(_IMPLS[self.backend](q, k, v, mask))


def set_backend(model: nn.Module, backend: str) -> int:
    """Point every Attention module of `model` at `backend`; returns how many were set."""
    if backend not in _IMPLS:
        raise EngineError(f"unknown attention backend {backend!r}; choose from {', '.join(BACKENDS)}")
    n = 0
    for m in model.modules():
        if isinstance(m, Attention):
            m.backend = backend
            n += 1
    if n == 0:
        raise EngineError(f"{type(model).__name__} has no dittune Attention modules")
    return n


def calls(model: nn.Module) -> dict[str, int]:
    total: Counter[str] = Counter()
    for m in model.modules():
        if isinstance(m, Attention):
            total.update(m.calls)
    return dict(total)
