"""Token sharding for sequence parallelism: the seam a DiT calls where its token sequence may be
split across GPUs (after the embeddings) and gathered again (before the output projection).

On one process `NO_SHARDS` makes every call the identity, so a model stays readable and exact
on one GPU. Under sequence parallelism each rank keeps a contiguous slice of every token group
(`torch.tensor_split` sizes: the first `L % n` ranks hold one token more), and a joint sequence
is the concatenation of each rank's slices, e.g. [text_r, image_r]. Attention across GPUs
(parallel/attention.py) needs every rank's length of the sequence it attends over; a model
declares them with `joint(...)`, keyed by this rank's local length.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import EngineError


def settled(t: torch.Tensor) -> torch.Tensor:
    """A functional collective's result, ready to read. Run eagerly, a functional collective
    returns an AsyncCollectiveTensor, a wrapper that waits for the collective only when a torch
    op reads it, and passes views through unwaited; a Triton kernel of dittune.kernels takes the
    data pointer of what it is given (the wrapper's), so it would read too early (on 2 x H200,
    eager TP-2 with --fused-kernels: an illegal memory access in the gated residual after the
    MLP's all-reduce). Outside compile, wait here and return the plain tensor; traced,
    torch.compile places the wait itself."""
    if torch.compiler.is_compiling():
        return t
    import torch.distributed._functional_collectives as fc

    return t.wait() if isinstance(t, fc.AsyncCollectiveTensor) else t


def all_gather(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    """Functional all-gather (traceable by torch.compile) along `dim`."""
    import torch.distributed._functional_collectives as fc

    return settled(getattr(fc, "all_gather_single", fc.all_gather_tensor)(x, dim, group))


def shard_sizes(n_tokens: int, degree: int) -> tuple[int, ...]:
    base, extra = divmod(n_tokens, degree)
    return tuple(base + (1 if r < extra else 0) for r in range(degree))


class TokenShards:
    """Identity on one process (degree 1); `parallel.sequence_parallel` installs a sharding one."""

    degree = 1
    index = 0
    bytes_sent = 0

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x

    def gather(self, x: torch.Tensor, dim: int, n_tokens: int) -> torch.Tensor:
        return x

    def joint(self, *n_tokens: int) -> None:
        """Declare a sequence made of these token groups, each split across the ranks."""

    def rank_order(self, parts: list[torch.Tensor], dim: int) -> torch.Tensor:
        """Whole token groups (e.g. a key mask's text and image parts) -> the joint sequence in the
        order attention sees its keys: every rank's slices, rank after rank."""
        return torch.cat(parts, dim=dim)

    def sizes(self, local_len: int) -> tuple[int, ...]:
        return (local_len,)


NO_SHARDS = TokenShards()


class SequenceShards(TokenShards):
    """This rank's slice of every token group of a DiT pass, across the sequence-parallel group."""

    def __init__(self, group: Any, degree: int, index: int):
        self.group, self.degree, self.index = group, degree, index
        self._sizes: dict[int, tuple[int, ...]] = {}  # local length -> every rank's length
        self.bytes_sent = 0  # eager gathers only (the pipeline's accounting pass)

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        sizes = shard_sizes(x.shape[dim], self.degree)
        if min(sizes) == 0:
            raise EngineError(f"{x.shape[dim]} tokens cannot be split over {self.degree} GPUs (fewer than one each)")
        start = sum(sizes[: self.index])
        # A copy, not a view: compiled blocks would otherwise guard on each rank's storage offset
        # (Z-Image's blocks hit the recompile limit on the H200).
        return x.narrow(dim, start, sizes[self.index]).clone()

    def gather(self, x: torch.Tensor, dim: int, n_tokens: int) -> torch.Tensor:
        """Every rank's slice of a group of `n_tokens` tokens -> the whole group, on every rank."""
        sizes = shard_sizes(n_tokens, self.degree)
        if x.shape[dim] != sizes[self.index]:
            raise EngineError(f"gather: this rank holds {x.shape[dim]} tokens, expected {sizes[self.index]}")
        top = max(sizes)
        if x.shape[dim] < top:  # all_gather wants equal shapes: pad, then drop the padding
            pad = list(x.shape)
            pad[dim] = top - x.shape[dim]
            x = torch.cat([x, x.new_zeros(pad)], dim=dim)
        x = x.movedim(dim, 0).contiguous()
        if not torch.compiler.is_compiling():
            self.bytes_sent += x.numel() * x.element_size() * (self.degree - 1)
        full = all_gather(x, 0, self.group)  # [degree * top, ...]
        if min(sizes) != top:
            full = torch.cat([full[r * top : r * top + s] for r, s in enumerate(sizes)])
        return full.movedim(0, dim)

    def joint(self, *n_tokens: int) -> None:
        per_rank = [shard_sizes(n, self.degree) for n in n_tokens]
        sizes = tuple(sum(s[r] for s in per_rank) for r in range(self.degree))
        local = sizes[self.index]
        known = self._sizes.get(local)
        if known is None:
            self._sizes[local] = sizes  # a new length only: steady-state passes read, never write
        elif known != sizes:
            raise EngineError(
                f"two sequences of {local} local tokens are split differently ({known} vs {sizes}); "
                "sequence parallel cannot tell them apart"
            )

    def rank_order(self, parts: list[torch.Tensor], dim: int) -> torch.Tensor:
        slices = [p.tensor_split(self.degree, dim=dim) for p in parts]  # tensor_split: the sizes of shard_sizes
        return torch.cat([s[r] for r in range(self.degree) for s in slices], dim=dim)

    def sizes(self, local_len: int) -> tuple[int, ...]:
        try:
            return self._sizes[local_len]
        except KeyError:
            raise EngineError(
                f"attention over {local_len} local tokens that the model did not declare with joint(); "
                "sequence parallel needs every rank's share"
            ) from None
