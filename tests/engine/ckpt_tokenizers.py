"""Small real tokenizers built locally (nothing can be downloaded), of the classes the diffusers
checkpoints carry: CLIP's BPE (with the </w> word ends), T5's unigram, Qwen2's byte-level BPE
with the chat-template special tokens. Each covers every character, so any prompt tokenizes."""

from __future__ import annotations

from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTokenizer, Qwen2Tokenizer, T5Tokenizer

LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORDS = ("cat", "dog", "of", "photo", "red", "fox", "snow")


def _merges_for(words, suffix: str = "", prefix: str = "") -> list[tuple[str, str]]:
    """Left-to-right merges that build each word from its characters."""
    out: list[tuple[str, str]] = []
    for w in words:
        pieces = ([prefix] if prefix else []) + list(w[:-1]) + [w[-1] + suffix]
        acc = pieces[0]
        for p in pieces[1:]:
            if (acc, p) not in out:
                out.append((acc, p))
            acc += p
    return out


def clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    vocab: dict[str, int] = {}
    for c in LETTERS + "0123456789.,!?'":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = _merges_for(WORDS, suffix="</w>")
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def t5_tokenizer(max_length: int = 512) -> T5Tokenizer:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -2.0 - i / 10) for i, w in enumerate(WORDS + ("a",))]
    pieces += [("\u2581", -5.0)] + [(c, -8.0) for c in LETTERS + "0123456789.,!?'"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


# Qwen3's template with enable_thinking=True and a generation prompt, as ZImagePipeline applies it.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_tokenizer(max_length: int = 1024) -> Qwen2Tokenizer:
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    merges = _merges_for(WORDS, prefix="\u0120")  # byte-level: a word after a space starts with Ġ
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok
