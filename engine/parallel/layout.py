"""The parallel layout of one run: degrees from the flags, ranks as named coordinates, and the
process groups of each dimension. Ranks are ordered (cfg, ring, ulysses, tp), tp innermost: a
tensor-parallel group is contiguous ranks (its two all-reduces per block, the most frequent
collective, stay between neighbours, on one NVLink pair), then a Ulysses group is ranks `tp`
apart, and the tokens of sequence-parallel index `sp = ring * ulysses_degree + ulysses` follow
rank order. The ranks of one tp group hold the same tokens and split the heads and MLP widths."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class Layout:
    cfg: int = 1  # 2 with --enable-cfg-parallel
    ulysses: int = 1
    ring: int = 1
    tp: int = 1  # --tp-size

    @classmethod
    def from_flags(cls, flags: Any) -> "Layout":
        return cls(cfg=2 if flags.enable_cfg_parallel else 1, ulysses=flags.ulysses_degree, ring=flags.ring_degree,
                   tp=flags.tp_size)

    @property
    def world(self) -> int:
        return self.cfg * self.ring * self.ulysses * self.tp

    @property
    def sp(self) -> int:
        """Sequence-parallel degree: the GPUs that share one DiT pass's tokens."""
        return self.ring * self.ulysses

    def coords(self, rank: int) -> dict[str, int]:
        rest = rank // self.tp
        sp = rest % self.sp
        return {"cfg": rest // self.sp, "ring": sp // self.ulysses, "ulysses": sp % self.ulysses, "sp": sp,
                "tp": rank % self.tp}

    def rank_of(self, cfg: int, ring: int, ulysses: int, tp: int = 0) -> int:
        return ((cfg * self.ring + ring) * self.ulysses + ulysses) * self.tp + tp

    def group_ranks(self) -> dict[str, list[list[int]]]:
        """Every group of each dimension, as rank lists (all ranks create all groups, same order)."""
        c, r, u, t = self.cfg, self.ring, self.ulysses, self.tp
        at = self.rank_of
        return {
            "sp": [[at(i, j, k, m) for j in range(r) for k in range(u)] for i in range(c) for m in range(t)],
            "ulysses": [[at(i, j, k, m) for k in range(u)] for i in range(c) for j in range(r) for m in range(t)],
            "ring": [[at(i, j, k, m) for j in range(r)] for i in range(c) for k in range(u) for m in range(t)],
            "cfg": [[at(i, j, k, m) for i in range(c)] for j in range(r) for k in range(u) for m in range(t)],
            "tp": [[at(i, j, k, m) for m in range(t)] for i in range(c) for j in range(r) for k in range(u)],
        }

    def describe(self) -> str:
        parts = [f"cfg {self.cfg}"] if self.cfg > 1 else []
        parts += [f"ulysses {self.ulysses}"] if self.ulysses > 1 else []
        parts += [f"ring {self.ring}"] if self.ring > 1 else []
        parts += [f"tp {self.tp}"] if self.tp > 1 else []
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
    tp: Any = None

    @property
    def coords(self) -> dict[str, int]:
        return self.layout.coords(self.rank)


def build_groups(layout: Layout, rank: int) -> Groups:
    """Create the layout's process groups (collective: every rank calls it)."""
    mine: dict[str, Any] = {}
    sizes = {"sp": layout.sp, "ulysses": layout.ulysses, "ring": layout.ring, "cfg": layout.cfg, "tp": layout.tp}
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
    return Groups(layout, rank, mine.get("sp"), mine.get("ulysses"), mine.get("ring"), mine.get("cfg"), mine.get("tp"))
