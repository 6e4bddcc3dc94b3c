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
