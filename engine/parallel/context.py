"""What a rank's pipeline needs of the other ranks: who it is, its device, and the few
collectives outside the DiT (prompt embeddings from rank 0, the CFG gather, per-rank reports)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .layout import Groups, Layout, build_groups

_CURRENT: "RankContext | None" = None


@dataclass
class RankContext:
    rank: int
    world: int
    device: torch.device
    groups: Groups

    @property
    def layout(self) -> Layout:
        return self.groups.layout

    @property
    def is_main(self) -> bool:
        """Rank 0: runs the VAE, writes the image and the perf dump."""
        return self.rank == 0

    @property
    def encoder_rank(self) -> int:
        """The rank that holds and runs the text encoders: the last, so that the VAE (rank 0) and
        the encoders do not pile up on one GPU. On 2 x H200 with both on rank 0, FLUX.1-dev TP-2's
        ranks peaked at 30.96 and 13.18 GiB (NVML): the binding GPU held 0.78x of one GPU's
        pipeline while the other held 0.33x."""
        return self.world - 1

    @property
    def encodes(self) -> bool:
        return self.rank == self.encoder_rank

    @property
    def cfg_index(self) -> int:
        """0: this rank runs the conditional pass; 1: the negative one (CFG parallel)."""
        return self.groups.coords["cfg"]

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s `obj` on every rank (tensors come back on this rank's device)."""
        box = [_to(obj, torch.device("cpu")) if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self.device if self.device.type == "cuda" else None)
        return _to(box[0], self.device)

    def gather_cfg(self, v: torch.Tensor) -> list[torch.Tensor]:
        """This rank's CFG branch prediction -> [conditional, negative] on every rank of its CFG group."""
        from .sequence import all_gather

        both = all_gather(v.contiguous(), 0, self.groups.cfg)  # [2B, ...]
        return list(both.chunk(2, dim=0))

    def all_ranks(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def enter(layout: Layout, rank: int, world: int, device: torch.device) -> RankContext:
    """This process's rank context (process group already initialised): builds the layout's groups."""
    global _CURRENT
    if layout.world != world:
        raise ValueError(f"layout {layout} needs {layout.world} ranks, the group has {world}")
    _CURRENT = RankContext(rank, world, device, build_groups(layout, rank))
    return _CURRENT


def current() -> "RankContext | None":
    """The rank context when this process is one rank of several, else None."""
    return _CURRENT
