"""The parallel layout of one run: degrees from the flags, ranks as named coordinates, and the
process groups of each dimension. Ranks are ordered (cfg, ring, ulysses), ulysses innermost, so a
Ulysses group is contiguous ranks (the all-to-all stays between neighbours) and the tokens of
sequence-parallel index `sp = ring * ulysses_degree + ulysses` follow rank order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class Layout:
    cfg: int = 1  # 2 with --enable-cfg-parallel
    ulysses: int = 1
    ring: int = 1

    @classmethod
    def from_flags(cls, flags: Any) -> "Layout":
        return cls(cfg=2 if flags.enable_cfg_parallel else 1, ulysses=flags.ulysses_degree, ring=flags.ring_degree)

    @property
    def world(self) -> int:
        return self.cfg * self.ring * self.ulysses

    @property
    def sp(self) -> int:
        """Sequence-parallel degree: the GPUs that share one DiT pass's tokens."""
        return self.ring * self.ulysses

    def coords(self, rank: int) -> dict[str, int]:
        sp = rank % self.sp
        return {"cfg": rank // self.sp, "ring": sp // self.ulysses, "ulysses": sp % self.ulysses, "sp": sp}

    def rank_of(self, cfg: int, ring: int, ulysses: int) -> int:
        return (cfg * self.ring + ring) * self.ulysses + ulysses

    def group_ranks(self) -> dict[str, list[list[int]]]:
        """Every group of each dimension, as rank lists (all ranks create all groups, same order)."""
        c, r, u = self.cfg, self.ring, self.ulysses
        return {
            "sp": [[self.rank_of(i, j, k) for j in range(r) for k in range(u)] for i in range(c)],
            "ulysses": [[self.rank_of(i, j, k) for k in range(u)] for i in range(c) for j in range(r)],
            "ring": [[self.rank_of(i, j, k) for j in range(r)] for i in range(c) for k in range(u)],
            "cfg": [[self.rank_of(i, j, k) for i in range(c)] for j in range(r) for k in range(u)],
        }

    def describe(self) -> str:
        parts = [f"cfg {self.cfg}"] if self.cfg > 1 else []
        parts += [f"ulysses {self.ulysses}"] if self.ulysses > 1 else []
        parts += [f"ring {self.ring}"] if self.ring > 1 else []
        return " x ".join(parts) or "single GPU"


@dataclass(frozen=True)
class Groups:
    """This rank's place in the layout and the process group of each dimension it belongs to
    (None where the dimension has degree 1)."""

    layout: Layout
    rank: int
    sp: Any
    ulysses: Any
    ring: Any
    cfg: Any

    @property
    def coords(self) -> dict[str, int]:
        return self.layout.coords(self.rank)


def build_groups(layout: Layout, rank: int) -> Groups:
    """Create the layout's process groups (collective: every rank calls it)."""
    mine: dict[str, Any] = {}
    sizes = {"sp": layout.sp, "ulysses": layout.ulysses, "ring": layout.ring, "cfg": layout.cfg}
    for dim, groups in layout.group_ranks().items():
        for ranks in groups:
            if sizes[dim] == 1:
                continue
            if sizes[dim] == layout.world:
                g = dist.group.WORLD
            else:
                g = dist.new_group(ranks)
            if rank in ranks:
                mine[dim] = g
    return Groups(layout, rank, mine.get("sp"), mine.get("ulysses"), mine.get("ring"), mine.get("cfg"))
