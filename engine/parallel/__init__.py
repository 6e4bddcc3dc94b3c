"""Several GPUs of one host: the layout (layout.py), launching one process per GPU (launch.py,
rank.py), the rank's collectives for the pipeline (context.py), token sharding (sequence.py) and
attention across GPUs (attention.py).

Parallelism is applied to an unchanged model from outside: `sequence_parallel` gives the DiT a
sharding `seq` seam and every `Attention` module its sequence-parallel runner. The model files
only call their seams; the pipeline keeps CFG (and CFG parallel) in one place.
"""

from __future__ import annotations

from torch import nn

from ..attention import Attention
from ..errors import EngineError
from .layout import Groups, Layout, build_groups
from .sequence import NO_SHARDS, SequenceShards, TokenShards

__all__ = ["Groups", "Layout", "NO_SHARDS", "TokenShards", "build_groups", "sequence_parallel"]


def sequence_parallel(dit: nn.Module, groups: Groups) -> int:
    """Shard `dit`'s tokens over the sequence-parallel group of `groups`; returns the Attention
    modules switched to Ulysses / ring attention (0 when the layout has no sequence parallelism)."""
    from .attention import SequenceParallelAttention

    layout = groups.layout
    if layout.sp == 1:
        return 0
    if not hasattr(dit, "seq"):
        raise EngineError(f"{type(dit).__name__} has no token-sharding seam (`seq`) for sequence parallelism")
    c = groups.coords
    dit.seq = SequenceShards(groups.sp, layout.sp, c["sp"])
    n = 0
    for m in dit.modules():
        if isinstance(m, Attention):
            m.sp = SequenceParallelAttention(dit.seq, layout.ulysses, layout.ring, groups.ulysses, groups.ring,
                                             c["ulysses"], c["ring"])
            n += 1
    if n == 0:
        raise EngineError(f"{type(dit).__name__} has no dittune Attention modules")
    return n
