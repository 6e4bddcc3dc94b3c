"""Tensor parallelism: the DiT's block Linears split across the GPUs of a tp group (Megatron style).

A column-parallel Linear keeps its share of the output features: rank r keeps part r of every
section (a fused Q/K/V projection has three sections, so each rank gets its own heads of q, k
and v; Z-Image's w1|w3 has two). Its output is local: the heads of attention, the hidden units
of the MLP. A row-parallel Linear keeps the same share of its input features and sums the partial
outputs with one all-reduce: one per attention (the output projection) and one per MLP. Its bias
is added once, by tp rank 0 (the others hold zeros). QK-norm is per head, so it stays local.
A gathered Linear (the adaLN modulations: a quarter of FLUX's weights, read for a [B, D] vector)
is split like a column-parallel one and its small output all-gathered back whole; packed
(models/base.pack_modulation), every modulation of a forward is one GEMV and one all-gather.

The plan is data, per model file (`tensor_plan(cfg)`: block list -> {Linear path: Split}); this
module applies it to an unchanged model built on the meta device, so each rank materialises only
its share: synthetic weights are the slice of the single-process tensor (same seed, same
values; `fill_slice`), and a checkpoint is read slice by slice (`read_sharded`). The model calls
row-parallel Linears as modules (RowLinear adds the reduce) except where it passes their weights
to a fused op: there it calls the block's `tp` seam (FLUX's single-block output projection).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EngineError
from .sequence import settled


@dataclass(frozen=True)
class Split:
    kind: str  # "column" / "gather" (output features, weight dim 0) or "row" (input features, weight dim 1)
    sections: tuple[int, ...]  # full widths of the split dimension's sections (each split evenly)
    seam: str | None = None  # row only: the block attribute the model reduces through, not the module


def column(*widths: int) -> Split:
    return Split("column", tuple(widths))


def row(*widths: int, seam: str | None = None) -> Split:
    return Split("row", tuple(widths), seam)


def gather(*widths: int) -> Split:
    """Split by output features in equal sections, the output all-gathered whole on every rank."""
    if len(set(widths)) != 1:
        raise ValueError(f"a gathered Linear needs equal sections, got {widths}")
    return Split("gather", tuple(widths))


@dataclass(frozen=True)
class TensorPlan:
    heads: int  # the blocks' attention heads (each rank runs heads / tp)
    # repeated block list -> {Linear path in the block: split}; "" is the DiT itself (its own Linears)
    blocks: Mapping[str, Mapping[str, Split]]

    def refusal(self, tp: int, model: str) -> str | None:
        """Why `tp` cannot split this model (one line), or None."""
        if tp == 1:
            return None
        if self.heads % tp:
            return f"--tp-size {tp} does not divide {model}'s {self.heads} attention heads; use a divisor of {self.heads}"
        for blocks, linears in self.blocks.items():
            for path, s in linears.items():
                bad = [w for w in s.sections if w % tp]
                if bad:
                    where = f"{blocks}.{path}" if blocks else path
                    return (f"--tp-size {tp} does not divide the width {bad[0]} of {model}'s {where} "
                            f"({s.kind}-parallel); use a divisor of {math.gcd(*s.sections)}")
        return None


@dataclass(frozen=True)
class Shard:
    """One parameter's share: the concatenation along `dim` of these (start, length) ranges of the
    full tensor; `zero`: held as zeros (a row-parallel bias off tp rank 0)."""

    full_shape: tuple[int, ...]
    dim: int
    ranges: tuple[tuple[int, int], ...]
    zero: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        s = list(self.full_shape)
        s[self.dim] = sum(n for _, n in self.ranges)
        return tuple(s)


def _ranges(sections: tuple[int, ...], tp: int, index: int) -> tuple[tuple[int, int], ...]:
    out, start = [], 0
    for w in sections:
        out.append((start + index * (w // tp), w // tp))
        start += w
    return tuple(out)


def shards_of(linear: nn.Linear, split: Split, tp: int, index: int, prefix: str) -> dict[str, Shard]:
    full = sum(split.sections)
    dim = 1 if split.kind == "row" else 0
    if linear.weight.shape[dim] != full:
        raise EngineError(f"tensor plan: {prefix} has {linear.weight.shape[dim]} features, the plan {full}")
    rng = _ranges(split.sections, tp, index)
    out = {f"{prefix}.weight": Shard(tuple(linear.weight.shape), dim, rng)}
    if linear.bias is not None:
        b = tuple(linear.bias.shape)
        out[f"{prefix}.bias"] = Shard(b, 0, rng) if dim == 0 else Shard(b, 0, ((0, b[0]),), zero=index != 0)
    return out


# --- the collective ------------------------------------------------------------------------------


class TensorShards:
    """The row-parallel reduce seam: identity on one process; `tensor_parallel` installs AllReduce."""

    degree = 1
    index = 0
    bytes_sent = 0

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x


NO_TP = TensorShards()


class AllReduce(TensorShards):
    """Sum of the tp group's partial outputs: a functional all-reduce (traced by torch.compile)."""

    def __init__(self, group: Any, degree: int, index: int):
        self.group, self.degree, self.index = group, degree, index
        self.bytes_sent = 0  # eager calls only (the pipeline's accounting pass)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed._functional_collectives as fc

        if not torch.compiler.is_compiling():  # a ring all-reduce sends 2 (n - 1) / n of the tensor
            self.bytes_sent += 2 * (self.degree - 1) * x.numel() * x.element_size() // self.degree
        return settled(fc.all_reduce(x, "sum", self.group))

    def gather(self, y: torch.Tensor, sections: int) -> torch.Tensor:
        """[..., n * w / tp] (this rank's part of each of n sections) -> [..., n * w], every rank's
        parts in place: one all-gather."""
        from .sequence import all_gather

        if not torch.compiler.is_compiling():  # each rank's part to every other rank
            self.bytes_sent += (self.degree - 1) * y.numel() * y.element_size()
        parts = all_gather(y.unsqueeze(0).contiguous(), 0, self.group)  # [tp, ..., n * w / tp]
        parts = parts.unflatten(-1, (sections, -1)).movedim(0, -2)  # [..., n, tp, w / tp]
        return parts.flatten(-3)


class RowLinear(nn.Linear):
    """A row-parallel nn.Linear (same parameters, so state dicts and seeds are unchanged): the
    partial product, then the tp group's sum."""

    tp: TensorShards = NO_TP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.reduce(F.linear(x, self.weight, self.bias))


class GatherLinear(nn.Linear):
    """A gathered nn.Linear: this rank's part of each output section, then every rank's."""

    tp: AllReduce
    sections: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.gather(F.linear(x, self.weight, self.bias), self.sections)


# --- applying a plan -----------------------------------------------------------------------------


def tensor_parallel(dit: nn.Module, plan: TensorPlan, group: Any, tp: int, index: int) -> dict[str, Shard]:
    """Shard `dit` (built on the meta device) for tp rank `index` of `tp`: the split Linears take
    their shard shapes, the blocks their local head count, the row-parallel ones the reduce.
    Records `dit.tp` (the reducer, for byte accounting) and `dit.tp_shards` (parameter name ->
    Shard, for filling or loading), and returns the latter."""
    if any(p.device.type != "meta" for p in dit.parameters()):
        raise EngineError("tensor_parallel shards a DiT built on the meta device (materialise only the shard)")
    why = plan.refusal(tp, type(dit).__name__)
    if why:
        raise EngineError(why)
    reducer = AllReduce(group, tp, index)
    shards: dict[str, Shard] = {}
    for list_name, linears in plan.blocks.items():
        for i, block in enumerate(getattr(dit, list_name) if list_name else [dit]):
            for path, split in linears.items():
                lin = block.get_submodule(path)
                prefix = f"{list_name}.{i}.{path}" if list_name else path
                mine = shards_of(lin, split, tp, index, prefix)
                shards.update(mine)
                for pname in ("weight", "bias"):
                    p = getattr(lin, pname)
                    if p is not None:
                        setattr(lin, pname, nn.Parameter(torch.empty(mine[f"{prefix}.{pname}"].shape, device="meta",
                                                                     dtype=p.dtype), requires_grad=False))
                if split.kind == "gather":
                    lin.out_features = lin.weight.shape[0]
                    lin.__class__ = GatherLinear
                    lin.tp, lin.sections = reducer, len(split.sections)
                elif split.kind == "column":
                    lin.out_features = lin.weight.shape[0]
                else:
                    lin.in_features = lin.weight.shape[1]
                    if split.seam is not None:
                        setattr(block, split.seam, reducer)
                    else:
                        lin.__class__ = RowLinear
                        lin.tp = reducer
            if list_name:
                block.heads = plan.heads // tp
    dit.tp, dit.tp_shards = reducer, shards
    return shards


# --- synthetic weights: the slice of the single-process tensor -----------------------------------


def fill_slice(p: torch.Tensor, shard: Shard, tile: torch.Tensor, chunk: int = 1 << 24) -> None:
    """Write into `p` (shard shape) the shard of the full tensor whose flat elements repeat `tile`
    (components.randomize_'s synthetic weights): element f of the full tensor is tile[f % len].
    Indices are computed per range in chunks of rows: transient memory of 8 bytes per element of
    a chunk, time ~ one gather per element, no full tensor anywhere."""
    if shard.zero:
        p.zero_()
        return
    k = tile.numel()
    tile = tile.to(p.device, p.dtype)
    full = shard.full_shape
    strides = [math.prod(full[d + 1 :]) for d in range(len(full))]
    at = 0
    for start, length in shard.ranges:
        dst = p.narrow(shard.dim, at, length)
        at += length
        shape = list(full)
        shape[shard.dim] = length
        rows_per = max(1, chunk // max(1, math.prod(shape[1:])))
        for r0 in range(0, shape[0], rows_per):
            r1 = min(shape[0], r0 + rows_per)
            idx = torch.zeros((), dtype=torch.int64, device=p.device)
            for d, n in enumerate(shape):
                lo, hi = (r0, r1) if d == 0 else (0, n)
                off = start if d == shard.dim else 0
                ar = (torch.arange(lo, hi, device=p.device, dtype=torch.int64) + off) * strides[d]
                idx = idx.unsqueeze(-1) + ar if d else idx + ar
            dst.narrow(0, r0, r1 - r0).copy_(tile[idx % k])


def slice_state_dict(sd: Mapping[str, torch.Tensor], shards: Mapping[str, Shard]) -> dict[str, torch.Tensor]:
    """A whole (converted) state dict already in memory -> this rank's: each sharded tensor's slice."""
    out = {}
    for k, v in sd.items():
        s = shards.get(k)
        if s is None:
            out[k] = v
        elif tuple(v.shape) != s.full_shape:
            raise EngineError(f"{k} is {tuple(v.shape)}, the model's is {s.full_shape}")
        else:
            out[k] = torch.zeros_like(v) if s.zero else torch.cat([v.narrow(s.dim, a, n) for a, n in s.ranges], s.dim)
    return out


# --- checkpoints: read only the slices ----------------------------------------------------------


def read_sharded(files: list, convert: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]],
                 shards: Mapping[str, Shard], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A family's converted state dict with only this rank's slice of each sharded tensor read.

    The family's conversion (renames, and Q/K/V concatenations along dim 0) runs once on tags:
    every source tensor replaced by its row numbers, so each converted tensor says which rows of
    which source tensors it is made of; then each rank reads those rows (its range of them, for a
    column-parallel weight) and its columns (a row-parallel one) through safetensors' get_slice."""
    from safetensors import safe_open

    handles, names = {}, []
    opened = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    for h in opened:
        for k in h.keys():
            handles[k] = h
            names.append(k)
    shapes = {k: tuple(handles[k].get_slice(k).get_shape()) for k in names}
    tags = {k: (torch.arange(s[0], dtype=torch.int64) if s else torch.zeros((), dtype=torch.int64)) + (j << 32)
            for j, (k, s) in enumerate(shapes.items())}
    plan = convert(tags)
    out: dict[str, torch.Tensor] = {}
    for ours, tag in plan.items():
        runs = _runs(tag.reshape(-1), names)  # [(source key, first row, end row)] in order
        shard = shards.get(ours)
        whole = (sum(b - a for _, a, b in runs), *shapes[runs[0][0]][1:])
        if shard is not None and whole != shard.full_shape:
            raise EngineError(f"checkpoint tensor {ours} is {whole}, the model's is {shard.full_shape}")
        if not shapes[runs[0][0]]:  # a 0-d tensor: renamed only
            out[ours] = handles[runs[0][0]].get_tensor(runs[0][0]).to(device, dtype)
            continue
        if shard is None or shard.zero or shard.dim == 1:  # whole rows; a row-parallel weight's columns
            cols = list(shard.ranges) if shard is not None and shard.dim == 1 else None
            t = torch.cat([_read(handles[k], k, a, b, cols) for k, a, b in runs], dim=0)
            out[ours] = t.zero_() if shard is not None and shard.zero else t
        else:  # column-parallel: rows of the converted tensor, mapped onto the runs
            out[ours] = torch.cat([p for s, n in shard.ranges for p in _read_rows(handles, runs, s, s + n)], dim=0)
        out[ours] = out[ours].to(device, dtype)
        if shard is not None and tuple(out[ours].shape) != shard.shape:
            raise EngineError(f"checkpoint tensor for {ours}: read {tuple(out[ours].shape)}, the shard is {shard.shape}")
    return out


def _runs(tag: torch.Tensor, names: list[str]) -> list[tuple[str, int, int]]:
    """Tags -> maximal runs of consecutive rows of one source tensor (vectorised: FLUX has millions of rows)."""
    src, rows = tag >> 32, tag & 0xFFFFFFFF
    cut = torch.ones(tag.numel(), dtype=torch.bool)
    cut[1:] = (src[1:] != src[:-1]) | (rows[1:] != rows[:-1] + 1)
    starts = cut.nonzero().flatten().tolist() + [tag.numel()]
    return [(names[int(src[a])], int(rows[a]), int(rows[a]) + b - a) for a, b in zip(starts, starts[1:])]


def _read(h, key: str, a: int, b: int, cols: list[tuple[int, int]] | None) -> torch.Tensor:
    sl = h.get_slice(key)
    if cols is None:
        return sl[a:b]
    return torch.cat([sl[a:b, c : c + n] for c, n in cols], dim=1)


def _read_rows(handles, runs, lo: int, hi: int) -> list[torch.Tensor]:
    """Rows lo..hi of the concatenation of `runs`."""
    out, at = [], 0
    for k, a, b in runs:
        n = b - a
        s, e = max(lo, at), min(hi, at + n)
        if s < e:
            out.append(handles[k].get_slice(k)[a + s - at : a + e - at])
        at += n
    return out


__all__ = ["AllReduce", "GatherLinear", "NO_TP", "RowLinear", "Shard", "Split", "TensorPlan", "TensorShards", "column", "fill_slice",
           "gather", "read_sharded", "row", "slice_state_dict", "tensor_parallel"]