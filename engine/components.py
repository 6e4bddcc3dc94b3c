"""Building components: the native DiT, text encoders (transformers), VAE (diffusers), tokenizers.

Synthetic mode builds every component at its real shapes with random weights straight on the
target device in the target dtype (no fp32 detour, no CPU init of a 12B model). Checkpoint mode
reads a diffusers-format directory; the DiT's safetensors are opened directly on the target
device and assigned to the module without another full copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import re
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from .errors import EngineError
from .models.base import Family, TextEncoderSpec, TokenBatch, VaeSpec

if TYPE_CHECKING:
    from .parallel.layout import Groups


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> None:
    """Synthetic weights: N(0, 0.5/sqrt(fan_in)) matrices, zero biases, unit norm scales. Values are
    irrelevant to latency; this scale keeps activations finite through deep stacks in bf16. Large
    tensors repeat a random tile (memcpy speed), so a 12B model fills in seconds even on the CPU.
    A tensor-parallel shard (`module.tp_shards`) gets its slice of the same full tensor."""
    shards = getattr(module, "tp_shards", {})
    for i, (name, p) in enumerate(module.named_parameters()):
        if name in shards and p.ndim >= 2:
            from .parallel.tensor import fill_slice

            full = shards[name].full_shape
            fill_slice(p, shards[name], _tile(math.prod(full), 0.5 / math.sqrt(math.prod(full[1:])), seed + i))
        elif p.ndim >= 2:
            _tile_normal_(p, 0.5 / math.sqrt(math.prod(p.shape[1:])), seed + i)
        elif name.endswith("bias"):
            p.zero_()
        elif "norm" in name or name.endswith("scale") or name.endswith("weight"):
            p.fill_(1.0)
        else:
            _tile_normal_(p, 0.02, seed + i)


def _tile_normal_(p: torch.Tensor, std: float, seed: int, tile: int = 1 << 16) -> None:
    # The tile is drawn on the CPU, so synthetic weights are the same whichever device a
    # component is built on (a CPU-offloaded component must equal the resident one).
    flat = p.view(-1)
    n = flat.numel()
    k = min(n, tile)
    flat[:k].copy_(_tile(n, std, seed, tile))
    while k < n:  # doubling copies: O(log n) launches
        m = min(k, n - k)
        flat[k : k + m].copy_(flat[:m])
        k += m


def _tile(n: int, std: float, seed: int, tile: int = 1 << 16) -> torch.Tensor:
    """The first min(n, tile) elements of a synthetic tensor of n elements (fp32, CPU)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(min(n, tile), generator=gen, dtype=torch.float32).mul_(std)


# --- DiT ------------------------------------------------------------------------------------------


def build_dit(family: Family, device: torch.device, dtype: torch.dtype, model_path: Path | None, seed: int = 0,
              tensor: "Groups | None" = None) -> nn.Module:
    """The DiT on `device`; with `tensor` (the layout's groups, tp > 1) only this rank's tensor-
    parallel share of it, built and filled or read as such (engine/parallel/tensor.py)."""
    with torch.device("meta"), default_dtype(dtype):
        model = family.transformer_cls(family.spec.dit_config)
    shards = {}
    if tensor is not None and tensor.layout.tp > 1:
        from .models import tensor_plan
        from .parallel.tensor import tensor_parallel

        shards = tensor_parallel(model, tensor_plan(family.spec), tensor.tp, tensor.layout.tp, tensor.coords["tp"])
    if model_path is None:
        model.to_empty(device=device)
        randomize_(model, seed)
    else:
        if shards:
            from .parallel.tensor import read_sharded

            files = _safetensors_files(model_path / "transformer")
            try:
                sd = read_sharded(files, family.convert_diffusers_state_dict, shards, device, dtype)
            except Exception as e:
                if type(e).__name__ == "SafetensorError" or isinstance(e, (OSError, ValueError)):
                    raise EngineError(f"cannot read {model_path / 'transformer'}: {e}") from None
                raise
        else:
            sd = family.convert_diffusers_state_dict(_read_safetensors(model_path / "transformer", device, dtype))
        try:
            model.load_state_dict(sd, strict=True, assign=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise EngineError(
                f"{model_path / 'transformer'} does not match model {family.spec.name}: {' '.join(first[:3])[:400]}"
            ) from None
    return model.eval().requires_grad_(False)


def _read_safetensors(folder: Path, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(folder):
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as sf:
                for k in sf.keys():
                    out[k] = sf.get_tensor(k).to(dtype)
        except (OSError, RuntimeError, ValueError) as e:  # safetensors raises SafetensorError(Exception)
            raise EngineError(f"cannot read {f}: {e}") from None
        except Exception as e:
            if type(e).__name__ == "SafetensorError":
                raise EngineError(f"cannot read {f}: {e}") from None
            raise
    return out


def _safetensors_files(folder: Path) -> list[Path]:
    """The DiT's weight files (every shard of an index), checked present."""
    if not folder.is_dir():
        raise EngineError(f"checkpoint has no {folder.name}/ folder: {folder}")
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        try:
            weight_map = json.loads(index[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise EngineError(f"malformed shard index {index[0]}: {e}") from None
        files = sorted({folder / f for f in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise EngineError(f"no .safetensors weights in {folder}")
    for f in files:
        if not f.exists():
            raise EngineError(f"shard {f.name} named in the index is missing from {folder}")
    return files


def check_checkpoint_dir(path: Path, family: Family) -> None:
    from .checkpoint import check_components, read_index

    check_components(path, read_index(path), family.spec)


# --- text encoders --------------------------------------------------------------------------------


def _text_classes(arch: str):
    import transformers as T

    table = {
        "clip": (T.CLIPTextConfig, T.CLIPTextModel),
        "t5": (T.T5Config, T.T5EncoderModel),
        "qwen2_5_vl": (T.Qwen2_5_VLTextConfig, T.Qwen2_5_VLTextModel),
        "qwen3": (T.Qwen3Config, T.Qwen3Model),
    }
    if arch not in table:
        raise EngineError(f"unknown text encoder architecture {arch!r}")
    return table[arch]


def build_text_encoder(spec: TextEncoderSpec, device: torch.device, dtype: torch.dtype, model_path: Path | None, seed: int = 0) -> nn.Module:
    config_cls, model_cls = _text_classes(spec.arch)
    if model_path is None:
        try:
            from transformers.initialization import no_init_weights
        except ImportError:
            from transformers.modeling_utils import no_init_weights

        config = config_cls(**spec.config)
        config._attn_implementation = "sdpa"
        # Buffers (position ids, rotary tables) are computed in __init__; weights are filled below.
        with torch.device(device), default_dtype(dtype), no_init_weights():
            model = model_cls(config)
        randomize_(model, seed)
        if spec.arch == "t5" and model.shared.weight is not model.encoder.embed_tokens.weight:
            # no_init_weights skips the tie a checkpoint load (and a plain build) makes: one
            # embedding, not an unused 0.25 GB copy in `shared`. Tied to the weight the encoder
            # reads, so its outputs stay those of the untied build.
            model.shared.weight = model.encoder.embed_tokens.weight
    else:
        folder = model_path / spec.name
        kw: dict = {"dtype": dtype}
        if device.type != "cpu" and importlib.util.find_spec("accelerate") is not None:
            # transformers needs accelerate to put the weights straight onto the device
            kw["device_map"] = str(device)
        try:
            if spec.arch == "qwen2_5_vl":
                import transformers as T

                full = T.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, **kw)
                model = full.model.language_model
                del full
            else:
                model = model_cls.from_pretrained(folder, **kw)
        except (OSError, ValueError) as e:
            raise EngineError(f"cannot load text encoder from {folder}: {str(e).splitlines()[0]}") from None
        model = model.to(device)
    return model.eval().requires_grad_(False)


class SyntheticTokenizer:
    """Deterministic stand-in for synthetic runs (no tokenizer download): one id per chat-template
    special token (`<|im_start|>`), word, punctuation mark or newline, hashed into the vocabulary
    and padded to max_length. Text lengths, and so latency, come out as a real tokenizer's: Qwen's
    template prefix is 34 tokens and its suffix 5, exactly what the Qwen2.5 tokenizer gives."""

    _PIECES = re.compile(r"<\|[^|]+\|>|\w+|[^\w\s]|\n")

    def __init__(self, vocab_size: int, max_length: int, pad_id: int = 0):
        self.vocab_size, self.max_length, self.pad_id = vocab_size, max_length, pad_id

    def __call__(self, text: str) -> TokenBatch:
        pieces = self._PIECES.findall(text)
        ids = [1 + int.from_bytes(hashlib.blake2b(p.encode(), digest_size=4).digest(), "little") % (self.vocab_size - 1) for p in pieces]
        ids = ids[: self.max_length]
        n = len(ids)
        input_ids = torch.full((1, self.max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((1, self.max_length), dtype=torch.long)
        input_ids[0, :n] = torch.tensor(ids, dtype=torch.long)
        mask[0, :n] = 1
        return TokenBatch(input_ids, mask)


class HFTokenizer:
    """The checkpoint's tokenizer. When the class its tokenizer_config.json declares cannot load
    here (transformers 5 raised a TypeError for FLUX's `T5Tokenizer`), the fast tokenizer in its
    tokenizer.json gives the same ids: use it, and say so on stderr."""

    def __init__(self, folder: Path, max_length: int):
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        try:
            self.tok = AutoTokenizer.from_pretrained(folder)
        except Exception as e:  # any failure of the declared class: TypeError, ImportError, OSError, ...
            why = f"{type(e).__name__}: {_first_line(e)}"
            if not (folder / "tokenizer.json").is_file():
                raise EngineError(f"cannot load tokenizer from {folder}: {why}") from None
            try:
                self.tok = PreTrainedTokenizerFast.from_pretrained(folder)
            except Exception as e2:
                raise EngineError(f"cannot load tokenizer from {folder}: {why}; its tokenizer.json: {_first_line(e2)}") from None
            declared = _declared_tokenizer_class(folder)
            print(f"note: {folder.name}: {declared} cannot load here ({why[:160]}); "
                  "using the fast tokenizer in its tokenizer.json", file=sys.stderr)
        self.max_length = max_length

    def __call__(self, text: str) -> TokenBatch:
        enc = self.tok(text, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt")
        return TokenBatch(enc["input_ids"], enc["attention_mask"])


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _declared_tokenizer_class(folder: Path) -> str:
    try:
        return str(json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class") or "its tokenizer class")
    except (OSError, ValueError):
        return "its tokenizer class"


def build_tokenizer(spec: TextEncoderSpec, model_path: Path | None):
    if model_path is None:
        return SyntheticTokenizer(int(spec.config["vocab_size"]), spec.max_length)
    return HFTokenizer(model_path / spec.tokenizer, spec.max_length)


# --- VAE ------------------------------------------------------------------------------------------


def build_vae(spec: VaeSpec, device: torch.device, dtype: torch.dtype, model_path: Path | None, seed: int = 0) -> nn.Module:
    import diffusers

    cls = getattr(diffusers, spec.cls, None)
    if cls is None:
        raise EngineError(f"diffusers has no VAE class {spec.cls!r}")
    if model_path is None:
        config = {k: v for k, v in spec.config.items() if not k.startswith("_")}
        with torch.device(device), default_dtype(dtype):
            vae = cls(**config)
        randomize_(vae, seed)
    else:
        try:
            vae = cls.from_pretrained(model_path / "vae", torch_dtype=dtype).to(device)
        except (OSError, ValueError, EnvironmentError) as e:
            raise EngineError(f"cannot load VAE from {model_path / 'vae'}: {str(e).splitlines()[0]}") from None
    return vae.eval().requires_grad_(False)
