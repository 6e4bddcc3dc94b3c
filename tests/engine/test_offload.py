import torch

from dittune.engine.offload import PinnedArena


def test_arena_packs_copies_with_alignment():
    ts = [torch.randn(3, 5), torch.randn(7, dtype=torch.float64), torch.arange(11, dtype=torch.int64),
          torch.randn(2, 2).bfloat16(), torch.empty(0)]
    a = PinnedArena(ts, pin=False)
    assert not a.pinned and a.nbytes == sum(t.numel() * t.element_size() for t in ts)
    for t, v in zip(ts, a.views):
        assert v.dtype == t.dtype and v.shape == t.shape and torch.equal(v, t)
        assert (v.data_ptr() - a.buf.data_ptr()) % PinnedArena.ALIGN == 0 or v.numel() == 0
        assert v.untyped_storage().data_ptr() == a.buf.untyped_storage().data_ptr()
    ts[0].zero_()
    assert a.views[0].abs().sum() > 0  # copies, not aliases of the originals
