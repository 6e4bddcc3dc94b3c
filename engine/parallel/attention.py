"""Attention across GPUs, plugged into the one attention seam (engine/attention.py).

Ulysses: one all-to-all turns every rank's token shard of Q, K and V (all heads) into all tokens
of a head shard, local attention runs on it, and a second all-to-all brings the output back to
token shards. Ring: every rank gathers the K/V shards of its ring group (one all-gather) and
attends to each in turn, merging the partial outputs by their log-sum-exp. Both combined (USP):
Ulysses inside, ring across. Token shards may differ in length by one (see sequence.py); the
all-to-alls then use uneven split sizes and the ring pads its gather.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.distributed._functional_collectives as fc

from ..attention import merge_heads
from ..errors import EngineError
from .sequence import TokenShards, all_gather, settled


# --- attention that also returns the log-sum-exp, per backend -----------------------------------


def _lse_math(q, k, v, mask):
    """Reference (CPU, and any backend's check): fp32 scores."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, H, Lq, Lk]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, H, Lq]
    out = torch.matmul(torch.softmax(s, dim=-1), v.float()).to(q.dtype)
    return out, lse


def _lse_cudnn(q, k, v, mask):
    if mask is not None:
        raise EngineError("ring attention with torch_cudnn_sdpa takes no attention mask; use torch_efficient_sdpa")
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)[:2]
    return out, lse


def _lse_flash(q, k, v, mask):
    if mask is not None:
        raise EngineError("ring attention with torch_flash_sdpa takes no attention mask; use torch_efficient_sdpa")
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[:2]
    return out, lse


def _lse_efficient(q, k, v, mask):
    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, False)[:2]
    return out, lse


def lse_kernel(backend: str, device: torch.device) -> Callable:
    """The attention kernel ring attention uses for `backend`: one that returns the log-sum-exp."""
    if device.type != "cuda":
        return _lse_math
    table = {"torch_cudnn_sdpa": _lse_cudnn, "torch_flash_sdpa": _lse_flash, "torch_efficient_sdpa": _lse_efficient,
             "torch_sdpa": _lse_flash}
    if backend not in table:
        raise EngineError(f"ring attention needs a torch_* attention backend, not {backend!r}")
    return table[backend]


def _lse(lse: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A kernel's log-sum-exp as [B, H, L] fp32: cuDNN returns [B, H, L, 1], the efficient kernel
    may pad L to a multiple of 32."""
    return lse.flatten(2)[..., : out.shape[2]].float()


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Partial attention outputs over disjoint key sets, [B, H, L, D] with their log-sum-exp -> the
    output over all keys (fp32 accumulation)."""
    out, lse = parts[0][0].float(), _lse(parts[0][1], parts[0][0])
    for o, l in parts[1:]:
        l = _lse(l, o)
        new = torch.logaddexp(lse, l)
        out = out * torch.exp(lse - new).unsqueeze(-1) + o.float() * torch.exp(l - new).unsqueeze(-1)
        lse = new
    return out.to(parts[0][0].dtype)


# --- the collectives ---------------------------------------------------------------------------


def ulysses_in(xs: tuple[torch.Tensor, ...], sizes: tuple[int, ...], group: Any) -> torch.Tensor:
    """n tensors [B, H, L_r, D] (token shard) -> [n, B, H/u, sum(sizes), D] (head shard), one all-to-all."""
    u = len(sizes)
    n = len(xs)
    b, h, l, d = xs[0].shape
    send = xs[0].new_empty(u, n, b, h // u, l, d)  # destination-major: one copy of each input, no stack
    for i, x in enumerate(xs):
        send[:, i].copy_(x.view(b, u, h // u, l, d).transpose(0, 1))
    unit = n * b * (h // u) * d
    recv = settled(fc.all_to_all_single(send.flatten(), [unit * s for s in sizes], [unit * l] * u, group))
    parts = recv.split([unit * s for s in sizes])
    return torch.cat([p.view(n, b, h // u, s, d) for p, s in zip(parts, sizes)], dim=3)


def ulysses_out(out: torch.Tensor, sizes: tuple[int, ...], index: int, group: Any) -> torch.Tensor:
    """[B, H/u, sum(sizes), D] head shard -> [B, L_r, H * D] token shard of all heads, one all-to-all."""
    u = len(sizes)
    b, hu, _, d = out.shape
    l = sizes[index]
    send = torch.cat([c.flatten() for c in out.split(list(sizes), dim=2)])  # chunk s: rank s's tokens
    recv = settled(fc.all_to_all_single(send, [b * hu * l * d] * u, [b * hu * s * d for s in sizes], group))
    return recv.view(u, b, hu, l, d).permute(1, 3, 0, 2, 4).reshape(b, l, u * hu * d)


def ring_attention(q, k, v, mask, sizes: tuple[int, ...], group: Any, kernel: Callable) -> torch.Tensor:
    """q [B, H, L, D] against the K/V of every rank of the ring (this rank's are k, v; rank j holds
    sizes[j] tokens) -> [B, H, L, D]. `mask` [B, 1, 1, sum(sizes)] bool in ring order, or None."""
    top = max(sizes)
    kv = torch.stack([k, v])  # [2, B, H, L_j, D]
    if kv.shape[3] < top:
        kv = torch.cat([kv, kv.new_zeros(*kv.shape[:3], top - kv.shape[3], kv.shape[4])], dim=3)
    full = all_gather(kv.contiguous(), 0, group).view(len(sizes), 2, *kv.shape[1:])
    parts, start = [], 0
    for j, s in enumerate(sizes):
        m = None if mask is None else mask[..., start : start + s]
        parts.append(kernel(q, full[j, 0, :, :, :s], full[j, 1, :, :, :s], m))
        start += s
    return merge(parts)


class SequenceParallelAttention:
    """What an `Attention` module runs instead of local attention under sequence parallelism."""

    def __init__(self, shards: TokenShards, ulysses: int, ring: int, ulysses_group: Any, ring_group: Any,
                 ulysses_index: int, ring_index: int):
        self.shards, self.ulysses, self.ring = shards, ulysses, ring
        self.ulysses_group, self.ring_group = ulysses_group, ring_group
        self.ulysses_index, self.ring_index = ulysses_index, ring_index
        self.bytes_sent = 0  # eager calls only (the pipeline's accounting pass)

    def __call__(self, q, k, v, mask, local: Callable, backend: str) -> torch.Tensor:
        """q, k, v [B, H, L_r, D] (this rank's tokens) -> [B, L_r, H * D]."""
        sizes = self.shards.sizes(q.shape[2])  # every sequence-parallel rank's tokens, rank order
        if not torch.compiler.is_compiling():
            self.bytes_sent += self.bytes_per_call(sizes, q.shape, q.element_size())
        u, r = self.ulysses, self.ring
        if q.shape[1] % u:
            raise EngineError(f"{q.shape[1]} attention heads do not divide by --ulysses-degree {u}")
        # Ring chunk j = the tokens of Ulysses group j: ranks j*u .. j*u + u - 1.
        ring_sizes = tuple(sum(sizes[j * u : (j + 1) * u]) for j in range(r))
        mine = self._mine(sizes)
        if u > 1:
            q, k, v = ulysses_in((q, k, v), mine, self.ulysses_group).unbind(0)  # [B, H/u, L_ring, D]
        if r > 1:
            kernel = lse_kernel(backend, q.device)
            out = ring_attention(q, k, v, mask, ring_sizes, self.ring_group, kernel)  # [B, H/u, L_ring, D]
        else:
            out = local(q, k, v, mask)
        if u > 1:
            return ulysses_out(out, mine, self.ulysses_index, self.ulysses_group)
        return merge_heads(out)

    def bytes_per_call(self, sizes: tuple[int, ...], q_shape: tuple[int, ...], element_size: int) -> int:
        """Bytes this rank sends to other ranks in one attention call."""
        b, h, l, d = q_shape
        u, r = self.ulysses, self.ring
        total = 0
        if u > 1:  # Q, K, V out to the other heads' owners, then their outputs back for our tokens
            total += 3 * b * (h // u) * l * d * (u - 1) + b * (h // u) * d * (sum(self._mine(sizes)) - l)
        if r > 1:  # this rank's K/V (padded to the longest chunk) to every ring peer
            ring_sizes = [sum(sizes[j * u : (j + 1) * u]) for j in range(r)]
            total += 2 * b * (h // u) * max(ring_sizes) * d * (r - 1)
        return total * element_size

    def _mine(self, sizes: tuple[int, ...]) -> tuple[int, ...]:
        u = self.ulysses
        return sizes[self.ring_index * u : (self.ring_index + 1) * u]
