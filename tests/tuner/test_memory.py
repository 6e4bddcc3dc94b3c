"""The memory model's layerwise terms against the engine's LayerwiseOffload placement."""

import dataclasses

import pytest
import torch

from dittune.engine import flags as F
from dittune.engine.offload import LayerwiseOffload, PinnedArena, prefetch_window, resident_set
from dittune.tuner import memory


def _bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@pytest.mark.parametrize("prefetch", [0.25, 1, 2, 4])
@pytest.mark.parametrize("resident", [0, 1, 4, 8, 9])
def test_layerwise_terms_match_the_engine_placement(prefetch, resident):
    """Resident bytes are those of resident_set's blocks (spread, not leading); the visiting bytes
    are the engine's slots: window + 1 of them, each the size of the largest streamed block."""
    from dittune.engine.components import randomize_
    from dittune.engine.models import flux, get_family

    cfg = dataclasses.replace(get_family("flux-dev-tiny").spec.dit_config, num_layers=3, num_single_layers=6)
    dit = flux.FluxTransformer(cfg)
    randomize_(dit, seed=5)
    blocks = [b for name in dit.repeated_blocks for b in getattr(dit, name)]
    sizes = tuple(_bytes(b) for b in blocks)
    assert len(set(sizes)) == 2  # double and single blocks differ
    fp = memory.Footprint(dit_other_bytes=_bytes(dit) - sum(sizes), dit_block_bytes=sizes, text_encoder_bytes=0,
                          vae_bytes=0, hidden=cfg.num_attention_heads * cfg.attention_head_dim, text_tokens=8)
    kept, visiting = memory.layerwise_bytes(fp, resident, prefetch)
    assert kept == fp.dit_other_bytes + sum(sizes[i] for i in resident_set(9, resident))

    lw = LayerwiseOffload(dit, torch.device("cpu"), prefetch, resident, pin=False)
    m = lw.manifest()
    streamed = [sizes[i] for i in lw.streamed]
    assert m["gpu_slots"] == min(prefetch_window(len(streamed), prefetch) + 1, len(streamed))
    assert visiting == m["gpu_slots"] * max(streamed, default=0)
    # the engine's slots also hold buffers and alignment padding: a few hundred bytes per tensor
    tensors = max((len(lw._tensors(blocks[i])) for i in lw.streamed), default=0)
    assert max(streamed, default=0) <= m["slot_bytes"] <= max(streamed, default=0) + tensors * PinnedArena.ALIGN


@pytest.mark.parametrize("model", ["flux-dev", "qwen-image", "z-image-turbo"])
@pytest.mark.parametrize("prefetch", [1, 2, 4])
def test_predicted_peak_grows_with_resident_layers(model, prefetch):
    """The resident sets are nested and the largest block stays streamed until the end, so
    predicted VRAM never falls as --dit-resident-layers grows (the tuner's monotone rule: if k
    resident layers do not fit, k + 1 do not either) -- except within the last few counts, where
    fewer blocks stream than the prefetch window holds and the engine allocates fewer slots (the
    model follows it: the slots count in every stage, as measured)."""
    n = len(memory.footprint(model).dit_block_bytes)
    base = F.config_from_dict({"dit-layerwise-offload": True, "dit-offload-prefetch-size": prefetch})
    top = n - (prefetch_window(n, prefetch) + 1)  # from here on, fewer streamed blocks than slots
    peaks = [memory.predict_peak_bytes(model, dataclasses.replace(base, dit_resident_layers=k), 1024, 1024)
             for k in range(top + 1)]
    assert peaks == sorted(peaks)
    assert peaks[-1] > peaks[0]


@pytest.mark.parametrize("model", ["flux-dev-tiny", "qwen-image-tiny", "z-image-turbo-tiny"])
def test_text_encoder_terms_match_the_engine_placement(model):
    """Under --text-encoder-cpu-offload the encode stage holds, per encoder, its non-layer weights
    and TextEncoderOffload's slots (window + 1 of them, each the size of its largest layer):
    the footprint's per-encoder terms (meta device) against the real placement of the encoders."""
    from dittune.engine.components import build_text_encoder
    from dittune.engine.models import get_family
    from dittune.engine.offload import TextEncoderOffload

    fp = memory.footprint(model, "fp32")
    fam = get_family(model)
    want = 0
    assert len(fp.text_encoder_layer_bytes) == len(fp.text_encoder_other_bytes) == len(fam.spec.text_encoders)
    for te, other, layers in zip(fam.spec.text_encoders, fp.text_encoder_other_bytes, fp.text_encoder_layer_bytes):
        enc = build_text_encoder(te, torch.device("cpu"), torch.float32, None)
        o = TextEncoderOffload(enc, torch.device("cpu"), pin=False)
        m = o.manifest()
        assert layers == tuple(_bytes(b) for b in o.layers.blocks)
        assert other == sum(t.numel() * t.element_size() for _, t in o.rest._tensors() if isinstance(t, torch.nn.Parameter))
        assert other + sum(layers) == _bytes(enc)
        tensors = max(len(o.layers._tensors(b)) for b in o.layers.blocks)
        assert max(layers) <= m["slot_bytes"] <= max(layers) + tensors * PinnedArena.ALIGN
        want += other + m["gpu_slots"] * max(layers)
    assert memory.text_encoder_stream_bytes(fp) == want
    assert fp.text_encoder_bytes == sum(fp.text_encoder_other_bytes) + sum(map(sum, fp.text_encoder_layer_bytes))


def test_text_encoder_offload_frees_the_encode_stage():
    """FLUX.1-dev: streaming T5-XXL's 24 blocks keeps about 1 GiB of text encoders on the GPU
    during encode instead of the whole 9 GiB, so at the measured H100 placement (24 GiB cap, 32 of
    57 blocks resident) the predicted peak is below the resident DiT plus the whole encoders."""
    fp = memory.footprint("flux-dev")
    assert [len(l) for l in fp.text_encoder_layer_bytes] == [12, 24]
    assert memory.text_encoder_stream_bytes(fp) < 1.2 * 2**30 < 8.5 * 2**30 < fp.text_encoder_bytes
    cfg = F.config_from_dict({"dit-layerwise-offload": True, "dit-resident-layers": 32,
                              "text-encoder-cpu-offload": True, "vae-cpu-offload": True})
    peak = memory.predict_peak_bytes("flux-dev", cfg, 1024, 1024)
    dit_resident, _ = memory.layerwise_bytes(fp, 32, cfg.dit_offload_prefetch_size)
    assert peak < (dit_resident + fp.text_encoder_bytes) * memory.ALLOCATOR_OVERHEAD
