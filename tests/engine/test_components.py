import torch


def test_synthetic_tokenizer_counts_like_a_real_one():
    from dittune.engine.components import SyntheticTokenizer
    from dittune.engine.models import qwen_image as qi

    tok = SyntheticTokenizer(vocab_size=152064, max_length=546)
    prefix, suffix = qi.PROMPT_TEMPLATE.split("{}")
    assert int(tok(prefix).attention_mask.sum()) == qi.DROP_IDX == 34  # the Qwen2.5 tokenizer's count
    assert int(tok(suffix).attention_mask.sum()) == 5
    a, b = tok("A photo of a cat"), tok("A photo of a cat")
    assert torch.equal(a.input_ids, b.input_ids) and int(a.attention_mask.sum()) == 5
    assert int(tok("").attention_mask.sum()) == 0 and tok("x " * 1000).input_ids.shape == (1, 546)


def test_synthetic_t5_ties_its_embedding_as_a_checkpoint_does():
    """T5EncoderModel ties `shared` to `encoder.embed_tokens` (a checkpoint load does, and so does a
    plain build, as the memory model's meta build); the synthetic build under no_init_weights must
    too, or it holds an unused embedding copy (0.25 GB for FLUX's T5-XXL) on the GPU."""
    from dittune.engine.components import _text_classes, build_text_encoder, default_dtype
    from dittune.engine.models import get_family

    te = get_family("flux-dev-tiny").spec.text_encoders[1]
    enc = build_text_encoder(te, torch.device("cpu"), torch.float32, None, seed=2)
    assert enc.shared.weight is enc.encoder.embed_tokens.weight
    config_cls, model_cls = _text_classes(te.arch)
    with torch.device("meta"), default_dtype(torch.float32):
        plain = model_cls(config_cls(**te.config))
    assert sum(p.numel() for p in enc.parameters()) == sum(p.numel() for p in plain.parameters())
