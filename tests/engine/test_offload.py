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


import pytest

from dittune.engine.components import build_dit
from dittune.engine.models import get_family
from dittune.engine.offload import LayerwiseOffload, prefetch_window, resident_order, resident_set


def _inputs(model: str):
    fam = get_family(model)
    torch.manual_seed(0)
    if fam.spec.family == "flux":
        c = fam.spec.dit_config
        ids = torch.zeros(16, 3)
        ids[:, 1], ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
        return lambda m: m(torch.randn(1, 16, c.in_channels, generator=torch.Generator().manual_seed(1)),
                           torch.randn(1, 8, c.joint_attention_dim, generator=torch.Generator().manual_seed(2)),
                           torch.randn(1, c.pooled_projection_dim, generator=torch.Generator().manual_seed(3)),
                           torch.tensor([0.5]), ids, torch.zeros(8, 3), torch.tensor([3.5]))
    from dittune.engine.models import zimage as zi

    c = fam.spec.dit_config
    lat = torch.randn(1, c.in_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    cap = torch.randn(1, 5, c.cap_feat_dim, generator=torch.Generator().manual_seed(2))
    return lambda m: m(zi.pack_latents(lat), cap, torch.tensor([0.3]), 4, 4)


@pytest.mark.parametrize("model", ["flux-dev-tiny", "z-image-turbo-tiny"])
@pytest.mark.parametrize("prefetch, resident", [(1, 0), (2, 0), (0.5, 1), (1, 1), (4, 0), (1, 2), (2, 3)])
def test_layerwise_streaming_reproduces_the_resident_model(model, prefetch, resident):
    """The slot bookkeeping (byte ranges, views, round-robin slots, wrap-around, eviction) on the
    CPU: several forwards through the streamed model equal the resident one exactly."""
    fam = get_family(model)
    fwd = _inputs(model)
    dit = build_dit(fam, torch.device("cpu"), torch.float32, None, seed=3)
    with torch.inference_mode():  # as the pipeline runs
        want = fwd(dit)
        n = sum(len(getattr(dit, name)) for name in dit.repeated_blocks)
        if resident > n:
            pytest.skip(f"{n} blocks")
        lw = LayerwiseOffload(dit, torch.device("cpu"), prefetch, resident, pin=False)
        for _ in range(3):  # steps: prefetch wraps into the next one
            torch.testing.assert_close(fwd(dit), want, rtol=0, atol=0)
    m = lw.manifest()
    assert m["resident"] == resident and m["gpu_slots"] == min(lw.window + 1, n - resident)
    assert m["misses"] >= 1 if resident < n else m["misses"] == m["prefetch_hits"] == 0
    assert m["resident_blocks"] == sorted(resident_set(n, resident)) and m["streamed"] == n - resident
    if n - resident > 1:
        assert m["prefetch_hits"] > 0
    _check_placement(lw)


def _check_placement(lw):
    """Between forwards every streamed weight is back on its CPU copy in the arena; resident
    blocks are not in the arena; the slots fit the largest streamed block."""
    arena = lw.arena.buf.untyped_storage().data_ptr()
    for i, block in enumerate(lw.blocks):
        for t in block.parameters():
            assert (t.untyped_storage().data_ptr() == arena) == (i in lw.streamed)
    widest = max((sum(t.numel() * t.element_size() for t in lw._tensors(lw.blocks[i])) for i in lw.streamed), default=0)
    assert all(widest <= s.numel() < widest + PinnedArena.ALIGN * 64 for s in lw.slots)


@pytest.mark.parametrize("prefetch, resident", [(2, 2), (3, 0), (0.25, 1), (1, 0), (1, 1), (1, 4), (2, 5),
                                               (0.5, 7), (1, 8), (4, 8), (1, 9)])
def test_layerwise_with_many_blocks(prefetch, resident):
    """Double and single blocks of different sizes, resident blocks interleaved with streamed
    ones: bit-identical over several steps, every streamed block prefetched after the very first."""
    import dataclasses

    from dittune.engine.components import randomize_
    from dittune.engine.models import flux

    cfg = dataclasses.replace(get_family("flux-dev-tiny").spec.dit_config, num_layers=3, num_single_layers=6)
    dit = flux.FluxTransformer(cfg)
    randomize_(dit, seed=5)
    fwd = _inputs("flux-dev-tiny")
    with torch.inference_mode():  # as the pipeline runs
        want = fwd(dit)
        lw = LayerwiseOffload(dit, torch.device("cpu"), prefetch, resident, pin=False)
        for _ in range(3):
            torch.testing.assert_close(fwd(dit), want, rtol=0, atol=0)
    streamed = 9 - resident
    m = lw.manifest()
    assert m["resident_blocks"] == sorted(resident_set(9, resident))
    assert lw.streamed == sorted(set(range(9)) - set(m["resident_blocks"]))
    assert m["streamed"] == streamed and m["prefetch_window"] == prefetch_window(streamed, prefetch)
    if streamed == 0:
        assert lw.misses == lw.hits == 0 and lw.slots == [] and m["slot_bytes"] == 0
    elif streamed == 1:  # one slot: the only streamed block cannot be prefetched while it is in use
        assert lw.misses == 3 and lw.hits == 0
    else:
        assert lw.misses == 1 and lw.hits == 3 * streamed - 1
    _check_placement(lw)


def test_layerwise_prefetches_the_next_streamed_block_across_resident_ones():
    """With resident blocks between streamed ones, the prefetch skips them and wraps into the
    next step; a block prefetched but not run is evicted when its slot is reused."""
    import dataclasses

    from dittune.engine.components import randomize_
    from dittune.engine.models import flux

    cfg = dataclasses.replace(get_family("flux-dev-tiny").spec.dit_config, num_layers=2, num_single_layers=4)
    dit = flux.FluxTransformer(cfg)
    randomize_(dit, seed=5)
    lw = LayerwiseOffload(dit, torch.device("cpu"), 1, 3, pin=False)
    assert lw.resident_blocks == sorted(resident_set(6, 3)) == [0, 2, 4] and lw.streamed == [1, 3, 5]
    assert [lw._next_streamed(i, 1) for i in lw.streamed] == [3, 5, 1]
    assert [lw._next_streamed(i, 2) for i in lw.streamed] == [5, 1, 3]
    with torch.inference_mode():
        lw._pre_hook(3)(lw.blocks[3], ())  # a miss: loads 3 into slot 0, prefetches 5 into slot 1
        assert lw.misses == 1 and set(lw.ready) == {5} and lw.slot_of == {3: 0, 5: 1}
        lw._post_hook(3)(lw.blocks[3], (), None)
        lw._pre_hook(1)(lw.blocks[1], ())  # 5 skipped: a miss loads 1 into slot 0, the prefetch of 3
        assert lw.misses == 2 and set(lw.ready) == {3}  # evicts the unused 5 from slot 1
        assert lw.slot_of == {1: 0, 3: 1}
        lw._post_hook(1)(lw.blocks[1], (), None)


def test_layerwise_composes_with_regional_compile():
    """The engine's regional compile compiles each block's forward, so the offload hooks stay
    eager (Module.compile would trace them and fail under fullgraph)."""
    import dataclasses

    from dittune.engine.components import randomize_
    from dittune.engine.models import flux

    cfg = dataclasses.replace(get_family("flux-dev-tiny").spec.dit_config, num_layers=2, num_single_layers=2)
    dit = flux.FluxTransformer(cfg)
    randomize_(dit, seed=5)
    fwd = _inputs("flux-dev-tiny")
    with torch.inference_mode():  # as the pipeline runs
        want = fwd(dit)
        lw = LayerwiseOffload(dit, torch.device("cpu"), 1, 1, pin=False)
        for name in dit.repeated_blocks:
            for b in getattr(dit, name):
                b.forward = torch.compile(b.forward, fullgraph=True)
        for _ in range(2):
            torch.testing.assert_close(fwd(dit), want, rtol=1e-4, atol=1e-4)
    assert lw.misses == 1 and lw.hits > 0



# --- which blocks stay resident -------------------------------------------------------------------


def _cyclic_runs(mask: list[bool], value: bool) -> int:
    """Longest run of `value` in `mask`, read cyclically (the blocks of one step follow those of
    the previous one)."""
    if all(m == value for m in mask):
        return len(mask)
    best = cur = 0
    for m in mask + mask:
        cur = cur + 1 if m == value else 0
        best = max(best, cur)
    return best


def _pow2_floor(x: int) -> int:
    return 1 << (x.bit_length() - 1)


@pytest.mark.parametrize("n", range(0, 81))
def test_resident_order_is_a_permutation_with_nested_evenly_spread_sets(n):
    """Every k: resident_set(n, k) is the k-prefix of one permutation (nested, so VRAM grows with
    k), and both it and the streamed complement are spread over the stack. The bounds, proven in
    resident_order's docstring: up to half = ceil(n/2) resident blocks, no two resident blocks are
    neighbours and every run of streamed blocks is at most 2 * ceil(half / P(k)) - 1 long; from
    half on, no two streamed blocks are neighbours and every run of resident blocks is at most
    2 * ceil(floor(n/2) / P(n - k)) long (P(x) the largest power of two <= x, runs cyclic)."""
    order = resident_order(n)
    assert sorted(order) == list(range(n))
    half = (n + 1) // 2
    prev: frozenset[int] = frozenset()
    for k in range(n + 1):
        s = resident_set(n, k)
        assert len(s) == k and prev <= s and s == frozenset(order[:k])
        prev = s
        mask = [i in s for i in range(n)]
        if 1 <= k <= half:
            assert _cyclic_runs(mask, False) <= 2 * -(-half // _pow2_floor(k)) - 1
            assert not any(mask[i] and mask[i + 1] for i in range(n - 1))
        if half <= k < n:
            assert _cyclic_runs(mask, True) <= 2 * -(-(n // 2) // _pow2_floor(n - k))
            assert all(mask[i] or mask[i + 1] for i in range(n - 1))
        # their corollary in terms of the even spacing alone: runs at most about twice as long
        if 0 < k < n:
            assert _cyclic_runs(mask, False) <= 2 * -(-(n - k) // k) + 1
            assert _cyclic_runs(mask, True) <= 2 * -(-k // (n - k)) + 2
    with pytest.raises(ValueError):
        resident_set(n, n + 1)


def test_resident_order_spreads_flux():
    """FLUX.1-dev's 57 blocks (19 double, then 38 single): a quarter resident keeps blocks from
    both kinds and from the whole stack; no streamed run is longer than 7 blocks."""
    for k in (14, 20, 28, 40, 42):
        s = resident_set(57, k)
        assert min(s) < 10 and max(s) > 47 and any(i < 19 for i in s) and any(i >= 19 for i in s)
    assert _cyclic_runs([i in resident_set(57, 14) for i in range(57)], False) <= 7


# --- text encoders: layers streamed during encode, the rest visiting for it -----------------------

_LAYER_CLASSES = {"clip": "CLIPEncoderLayer", "t5": "T5Block", "qwen2_5_vl": "Qwen2_5_VLDecoderLayer",
                  "qwen3": "Qwen3DecoderLayer"}
_TEXT_MODELS = ["flux-dev-tiny", "qwen-image-tiny", "z-image-turbo-tiny"]


def _encoders(model: str, layers: int | None):
    """The family's tiny text encoders as the pipeline builds them (fp32 on the CPU), with
    `layers` repeated layers instead of the spec's (more than the two slots: slots are reused)."""
    import dataclasses

    from dittune.engine.components import build_text_encoder, build_tokenizer

    fam = get_family(model)
    encoders, tokens = {}, {}
    for i, te in enumerate(fam.spec.text_encoders):
        if layers is not None:
            key = "num_layers" if te.arch == "t5" else "num_hidden_layers"
            te = dataclasses.replace(te, config={**te.config, key: layers})
        encoders[te.name] = build_text_encoder(te, torch.device("cpu"), torch.float32, None, seed=i + 1)
        tokens[te.name] = build_tokenizer(te, None)(fam.prompt_text(te.name, "a red fox, in the snow at dusk"))
    return fam, encoders, tokens


@pytest.mark.parametrize("model", _TEXT_MODELS)
def test_repeated_layers_finds_each_text_encoders_layers(model):
    from dittune.engine.offload import repeated_layers

    fam, encoders, _ = _encoders(model, None)
    for te in fam.spec.text_encoders:
        enc = encoders[te.name]
        want = [m for m in enc.modules() if type(m).__name__ == _LAYER_CLASSES[te.arch]]
        got = repeated_layers(enc)
        assert len(want) == 2 and [id(m) for m in got] == [id(m) for m in want]
    assert repeated_layers(torch.nn.Linear(2, 2)) == []


@pytest.mark.parametrize("model", _TEXT_MODELS)
@pytest.mark.parametrize("layers", [None, 5])
def test_text_encoder_streaming_reproduces_the_resident_encoders(model, layers):
    """Every encoder of the family streamed as the pipeline's _visit runs it (all onloaded, the
    family's encode_prompt, all offloaded), twice: outputs bit-identical to the resident encoders
    (T5's relative-attention bias, computed in block 0 and handed on, included); every layer runs
    from a slot and is prefetched (the first by onload); the non-layer weights are on their CPU
    copies again after the stage and the slots are freed."""
    from dittune.engine.offload import TextEncoderOffload, repeated_layers

    fam, encoders, tokens = _encoders(model, layers)
    with torch.inference_mode():  # as the pipeline runs
        want = fam.encode_prompt(encoders, tokens)
        offs = {n: TextEncoderOffload(enc, torch.device("cpu"), pin=False) for n, enc in encoders.items()}
        in_slot: list[bool] = []
        for o in offs.values():
            for b in o.layers.blocks:  # registered after the streaming hook: sees the block's weights in its slot
                b.register_forward_pre_hook(lambda m, a, o=o: in_slot.append(
                    {p.untyped_storage().data_ptr() for p in m.parameters()}
                    <= {s.untyped_storage().data_ptr() for s in o.layers.slots}))
        for _ in range(2):
            for o in offs.values():
                o.onload()
                assert len(o.layers.slots) == 2
            got = fam.encode_prompt(encoders, tokens)
            for o in offs.values():
                o.offload()
            assert got.keys() == want.keys()
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    assert in_slot and all(in_slot)
    for name, o in offs.items():
        n = len(repeated_layers(encoders[name]))
        m = o.manifest()
        assert m["blocks"] == m["streamed"] == n == (layers or 2) and m["resident"] == 0
        assert m["prefetch_window"] == 1 and m["gpu_slots"] == 2 and m["pinned"] is False
        assert m["prefetch_hits"] == 2 * n and m["misses"] == 0
        assert o.layers.slots == [] and o.layers.ready == {} and o.layers.slot_of == {}
        assert o.bytes == o.rest.bytes + o.layers.streamed_bytes
        # between stages every weight is on a CPU copy: the layers' in their arena, the rest in its own
        layer_ids = {id(t) for b in o.layers.blocks for t in o.layers._tensors(b)}
        arenas = {o.layers.arena.buf.untyped_storage().data_ptr(), o.rest.arena.buf.untyped_storage().data_ptr()}
        for t in (*encoders[name].parameters(), *encoders[name].buffers()):
            home = o.layers.arena if id(t) in layer_ids else o.rest.arena
            assert t.device.type == "cpu" and t.untyped_storage().data_ptr() == home.buf.untyped_storage().data_ptr()
        assert arenas and len(arenas) == 2


def test_text_encoder_stage_end_restores_weights_after_a_failed_forward():
    """A forward that raises inside a layer leaves that layer on its slot (no post hook): offload
    points it back at its CPU copy and frees the slots all the same, and the next stage runs."""
    from dittune.engine.offload import TextEncoderOffload

    fam, encoders, tokens = _encoders("flux-dev-tiny", 4)
    with torch.inference_mode():
        want = fam.encode_prompt(encoders, tokens)
        offs = {n: TextEncoderOffload(enc, torch.device("cpu"), pin=False) for n, enc in encoders.items()}
        t5 = offs["text_encoder_2"].layers
        boom = t5.blocks[2].register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(RuntimeError("boom")))
        for o in offs.values():
            o.onload()
        with pytest.raises(RuntimeError, match="boom"):
            fam.encode_prompt(encoders, tokens)
        for o in offs.values():
            o.offload()
        arena = t5.arena.buf.untyped_storage().data_ptr()
        assert all(p.untyped_storage().data_ptr() == arena for b in t5.blocks for p in b.parameters())
        assert t5.slots == [] and t5.ready == {} and t5.slot_of == {}
        boom.remove()
        for o in offs.values():
            o.onload()
        got = fam.encode_prompt(encoders, tokens)
        for o in offs.values():
            o.offload()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_text_encoder_outside_its_stage_is_refused():
    from dittune.engine.errors import EngineError
    from dittune.engine.offload import TextEncoderOffload

    fam, encoders, tokens = _encoders("z-image-turbo-tiny", None)
    TextEncoderOffload(encoders["text_encoder"], torch.device("cpu"), pin=False)
    with torch.inference_mode(), pytest.raises(EngineError, match="outside its stage"):
        fam.encode_prompt(encoders, tokens)


@pytest.mark.parametrize("prefetch, resident", [(1, 0), (1, 4), (2, 5), (1, 9)])
def test_idle_offload_holds_device_memory_only_while_denoising(prefetch, resident):
    """--dit-idle-offload: between begin() and end() (a denoise loop) the model computes exactly
    what the resident model does; outside, every block (resident ones too) points at its CPU copy
    in an arena, and neither slots nor a resident buffer are held. Several loops in a row."""
    import dataclasses

    from dittune.engine.components import randomize_
    from dittune.engine.models import flux

    cfg = dataclasses.replace(get_family("flux-dev-tiny").spec.dit_config, num_layers=3, num_single_layers=6)
    dit = flux.FluxTransformer(cfg)
    randomize_(dit, seed=5)
    fwd = _inputs("flux-dev-tiny")
    with torch.inference_mode():
        want = fwd(dit)
        lw = LayerwiseOffload(dit, torch.device("cpu"), prefetch, resident, pin=False, idle=True)
        arenas = {lw.arena.buf.untyped_storage().data_ptr(), lw.resident_arena.buf.untyped_storage().data_ptr()}

        def idle_placement():
            assert lw.slots == [] and lw.resident_buf is None
            for block in lw.blocks:
                assert all(t.untyped_storage().data_ptr() in arenas for t in block.parameters())

        idle_placement()
        for loop in range(3):
            lw.begin()
            if resident:
                buf = lw.resident_buf.untyped_storage().data_ptr()
                assert all(t.untyped_storage().data_ptr() == buf
                           for i in lw.resident_blocks for t in lw.blocks[i].parameters())
            for _ in range(2):  # steps
                torch.testing.assert_close(fwd(dit), want, rtol=0, atol=0)
            lw.end()
            idle_placement()
    m = lw.manifest()
    assert m["idle_offload"] and m["resident_restores"] == (3 if resident else 0)
    assert m["resident_bytes"] == sum(t.numel() * t.element_size() for i in lw.resident_blocks
                                      for t in lw._tensors(lw.blocks[i]))
    with pytest.raises(ValueError):
        LayerwiseOffload(dit, torch.device("cpu"), 1, 0, pin=False, blocks=lw.blocks[:2], idle=True)
