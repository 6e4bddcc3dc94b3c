"""Offload: weights that live in (pinned) CPU memory and visit the GPU when needed.

ComponentOffload moves a whole component for its stage; LayerwiseOffload streams a DiT's blocks;
TextEncoderOffload streams a text encoder's layers and moves the rest of it for the encode stage.
Weights are frozen, so the CPU copy stays valid: moving to the GPU copies each tensor once, and
moving back just points the parameters at the CPU copies again (no device-to-host copy)."""

from __future__ import annotations

import math

import torch
from torch import nn


class PinnedArena:
    """CPU copies of many tensors packed into one buffer, page-locked with a single
    cudaHostRegister (pinning tensor by tensor goes through the caching host allocator, which
    rounds every block up to a power of two: 24 GB of FLUX blocks would pin ~35 GB)."""

    ALIGN = 512

    def __init__(self, tensors: list[torch.Tensor], pin: bool):
        sizes = [t.numel() * t.element_size() for t in tensors]
        offsets, total = [], 0
        for n in sizes:
            offsets.append(total)
            total += -(-n // self.ALIGN) * self.ALIGN
        self.nbytes = sum(sizes)
        self.buf = torch.empty(max(total, 1), dtype=torch.uint8)
        self.views: list[torch.Tensor] = []
        for t, off, n in zip(tensors, offsets, sizes):
            v = self.buf[off : off + n].view(t.dtype).view(t.shape)
            v.copy_(t.detach())
            self.views.append(v)
        self.pinned = False
        if pin and total:
            err = torch.cuda.cudart().cudaHostRegister(self.buf.data_ptr(), self.buf.numel(), 0)
            if int(err) != 0:
                from .errors import EngineError

                raise EngineError(f"cannot pin {total / 2**30:.1f} GiB of CPU memory (cudaHostRegister error {int(err)})")
            self.pinned = True

    def __del__(self):
        if getattr(self, "pinned", False):
            try:
                torch.cuda.cudart().cudaHostUnregister(self.buf.data_ptr())
            except Exception:  # interpreter shutdown: CUDA may already be gone, and so is the memory
                pass


class ComponentOffload:
    """A component's weights (all of them, or all but the tensors in `skip`, by identity) live in
    a pinned arena and visit the GPU for its stage: onload copies them, offload points them back."""

    def __init__(self, module: nn.Module, device: torch.device, pin: bool, skip: frozenset[int] = frozenset()):
        self.module, self.device, self.pin, self.skip = module, device, pin, skip
        names, tensors = zip(*self._tensors())
        self.arena = PinnedArena(list(tensors), pin)
        self.cpu: dict[str, torch.Tensor] = dict(zip(names, self.arena.views))
        self.offload()
        self.bytes = self.arena.nbytes

    def _tensors(self):
        for name, t in (*self.module.named_parameters(), *self.module.named_buffers()):
            if id(t) not in self.skip:
                yield name, t

    def onload(self) -> None:
        for name, t in self._tensors():
            t.data = self.cpu[name].to(self.device, non_blocking=self.pin)

    def offload(self) -> None:
        for name, t in self._tensors():
            t.data = self.cpu[name]


def _bit_reversal_order(n: int) -> list[int]:
    """0..n-1 in van der Corput order: bit-reversed j = 0..m-1 (m the power of two >= n) scaled
    onto n indices, duplicates skipped. The first 2**p entries of bit-reversal order are the
    multiples of m / 2**p, whose images floor(c * n / 2**p) lie at most ceil(n / 2**p) apart
    (cyclically), so every prefix of length k has cyclic gaps <= ceil(n / P), P the largest power
    of two <= k: at most about twice the even spacing n / k, for every k at once."""
    if n <= 0:
        return []
    bits = (n - 1).bit_length()
    m = 1 << bits
    seen: set[int] = set()
    out: list[int] = []
    for j in range(m):
        rev = int(format(j, f"0{bits}b")[::-1], 2) if bits else 0
        i = rev * n // m
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


def resident_order(n: int) -> list[int]:
    """The order in which a DiT's n blocks become resident as --dit-resident-layers grows: the
    even blocks first, in bit-reversal order, then the odd ones in reverse bit-reversal order.

    Every resident set is a prefix of this one order, so the sets are nested and the memory kept
    on the GPU grows with k. Both the resident set and its complement, the streamed blocks, are
    spread over the stack, so the copy of each streamed block overlaps the compute of the resident
    blocks before it. With half = ceil(n/2), P(x) the largest power of two <= x, and runs counted
    cyclically (the last block of a step is followed by the first of the next):
    - k <= half: the resident blocks are even, so no two are neighbours, and they are 2x the
      k-prefix of _bit_reversal_order(half), whose gaps are <= ceil(half / P(k)): every run of
      streamed blocks is at most 2 * ceil(half / P(k)) - 1 long.
    - k >= half: the streamed blocks are odd, 2x + 1 for the (n - k)-prefix of
      _bit_reversal_order(n // 2): no two are neighbours and every run of resident blocks is at
      most 2 * ceil((n // 2) / P(n - k)) long.
    As P(k) > k / 2, these give streamed runs <= 2 * ceil((n - k) / k) + 1 and resident runs
    <= 2 * ceil(k / (n - k)) + 2: about twice the even spacing at worst (no nested family of sets
    can be even for every k at once)."""
    half = (n + 1) // 2
    evens = [2 * i for i in _bit_reversal_order(half)]
    odds = [2 * i + 1 for i in _bit_reversal_order(n - half)]
    return evens + odds[::-1]


def resident_set(n: int, k: int) -> frozenset[int]:
    """The k of n blocks kept resident: resident_set(n, k) is a subset of resident_set(n, k + 1)."""
    if not 0 <= k <= n:
        raise ValueError(f"{k} resident blocks of {n}")
    return frozenset(resident_order(n)[:k])


def prefetch_window(streamed: int, prefetch: float) -> int:
    """Streamed blocks loaded ahead of the running one (--dit-offload-prefetch-size: < 1 a fraction
    of the streamed blocks, >= 1 a count); the GPU holds window + 1 slots (at most `streamed`)."""
    if streamed == 0:
        return 0
    return min(streamed - 1, math.ceil(prefetch * streamed) if prefetch < 1 else int(prefetch))


class LayerwiseOffload:
    """Stream a DiT's repeated blocks from (pinned) CPU memory, overlapping the copy of the next
    blocks (on a copy stream) with the compute of the current one.

    `resident` blocks stay on the GPU for good (partial residency): resident_set(n, resident),
    spread evenly over the stack, so that the copy of each streamed block overlaps the compute of
    the resident blocks before it (kept leading, the resident blocks would leave the copy stream
    idle once `window` blocks are prefetched, and the streamed tail copy-bound with nothing to
    overlap). The streamed blocks are packed block by block into one pinned arena; the GPU holds
    `window + 1` fixed slots, each the size of the largest streamed block. Loading a block is one
    copy of its byte range into the next slot (round robin in load order), after the compute stream
    has finished with that slot's previous block (a GPU-side event wait: the CPU never blocks and
    the caching allocator is not involved, so reserved memory stays at what is really used). Before
    streamed block i runs, its copy is waited for (done synchronously on a miss), its parameters
    are pointed at views of its slot, and the next `window` streamed blocks in execution order are
    prefetched, wrapping around to the first streamed blocks of the next step. After it runs, its
    parameters point back at their CPU copies.

    On a CPU device the same bookkeeping runs with plain copies (used by the tests).

    `blocks=None` (a DiT): the blocks are the DiT's `repeated_blocks`, everything else moves to the
    GPU for good, the slots are allocated here and kept, and the prefetch wraps around into the
    next step. Given `blocks` (a text encoder's layers, TextEncoderOffload), only they are handled:
    the rest of the module is the caller's, the slots exist between `begin()` and `end()` (one
    stage: an encode), the first streamed block is prefetched by `begin()` and the prefetch stops
    at the last block (there is no next step to wrap into).

    `idle=True` (--dit-idle-offload, a DiT only): the resident blocks also get a pinned CPU copy
    (a second arena) and, like the slots, hold GPU memory only between `begin()` and `end()` (the
    denoise loop): `begin()` copies the resident arena into one GPU buffer and points the resident
    blocks at views of it, `end()` points them back and frees it. The encode and decode stages
    then run beside no DiT memory at all (FLUX, 1024x1024: the VAE decode's 5.2 GB of activations
    no longer sit on top of the resident blocks), for one copy of the resident bytes per request."""

    def __init__(self, dit: nn.Module, device: torch.device, prefetch: float, resident: int, pin: bool,
                 blocks: list[nn.Module] | None = None, idle: bool = False):
        if idle and blocks is not None:
            raise ValueError("idle offload is for a DiT's own blocks")
        self.idle = idle
        self.per_stage = blocks is not None
        if blocks is None:
            names = getattr(dit, "repeated_blocks", ())
            blocks = [b for n in names for b in getattr(dit, n)]
        self.blocks: list[nn.Module] = list(blocks)
        n = len(self.blocks)
        if not 0 <= resident <= n:
            from .errors import EngineError

            raise EngineError(f"--dit-resident-layers {resident}: this DiT has {n} blocks")
        self.device, self.pin, self.resident = device, pin, resident
        self.cuda = device.type == "cuda"
        kept = resident_set(n, resident)
        self.resident_blocks: list[int] = sorted(kept)
        self.streamed: list[int] = [i for i in range(n) if i not in kept]  # block indices, execution order
        self.position = {i: p for p, i in enumerate(self.streamed)}  # block index -> index in self.streamed
        self.window = prefetch_window(len(self.streamed), prefetch)
        if not self.per_stage:
            block_ids = {id(b) for b in self.blocks}
            # Everything but the streamed blocks lives on the GPU.
            for name, child in dit.named_children():
                if not isinstance(child, nn.ModuleList) or not any(id(b) in block_ids for b in child):
                    child.to(device)
            for p in dit.parameters(recurse=False):
                p.data = p.data.to(device)
        self.resident_arena: PinnedArena | None = None
        self.resident_buf: torch.Tensor | None = None
        self.resident_cpu: list[torch.Tensor] = []  # idle: the resident blocks' tensors' CPU views, in order
        if idle:
            tensors = self._resident_tensors()
            self.resident_arena = PinnedArena(tensors, pin)
            self.resident_cpu = list(self.resident_arena.views)
            for t, c in zip(tensors, self.resident_cpu):
                t.data = c
        else:
            for i in self.resident_blocks:
                self.blocks[i].to(device)
        self.resident_bytes = sum(t.numel() * t.element_size() for t in self._resident_tensors())
        self.restores = 0  # idle: times the resident blocks were copied back (once per denoise loop)

        per_block = [self._tensors(self.blocks[i]) for i in self.streamed]
        self.arena = PinnedArena([t for ts in per_block for t in ts], pin)
        self.streamed_bytes = self.arena.nbytes
        base = self.arena.buf.data_ptr()
        views = iter(self.arena.views)
        self.cpu: list[list[torch.Tensor]] = []  # per streamed block: its tensors' CPU views
        self.ranges: list[tuple[int, int]] = []  # per streamed block: byte range in the arena
        for ts in per_block:
            copies = [next(views) for _ in ts]
            for t, c in zip(ts, copies):
                t.data = c
            self.cpu.append(copies)
            if copies:
                lo = min(c.data_ptr() - base for c in copies)
                hi = max(c.data_ptr() - base + c.numel() * c.element_size() for c in copies)
            else:
                lo = hi = 0
            self.ranges.append((lo, hi))

        self.nslots = min(self.window + 1, len(self.streamed))
        self.slot_bytes = max((hi - lo for lo, hi in self.ranges), default=0)
        self.slots: list[torch.Tensor] = []
        self._reset_slots()
        if not self.per_stage and not idle:
            self._allocate_slots()
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.hits = self.misses = 0
        for i in self.streamed:
            self.blocks[i].register_forward_pre_hook(self._pre_hook(i))
            self.blocks[i].register_forward_hook(self._post_hook(i))

    @staticmethod
    def _tensors(block: nn.Module) -> list[torch.Tensor]:
        return [*block.parameters(), *block.buffers()]

    def _allocate_slots(self) -> None:
        self.slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(self.nslots)]

    def _reset_slots(self) -> None:
        self.slot_free: list = [None] * self.nslots  # compute-stream event: the slot's last user is done
        self.slot_owner: list[int | None] = [None] * self.nslots
        self.next_slot = 0
        self.slot_of: dict[int, int] = {}
        self.ready: dict[int, object] = {}  # block index -> copy-done event (None on the CPU)

    def _resident_tensors(self) -> list[torch.Tensor]:
        return [t for i in self.resident_blocks for t in self._tensors(self.blocks[i])]

    def begin(self) -> None:
        """Per-stage streaming (and idle offload): allocate the slots and prefetch the first
        streamed block; under idle offload, first copy the resident blocks back (one copy of the
        resident arena, on the compute stream: the denoise loop cannot start before it). The
        allocator hands the slots out ordered on the compute stream only (their memory may still be
        read by kernels queued before); the copy stream waits for those before its first copies."""
        if self.idle and self.resident_arena is not None and self.resident_bytes:
            arena = self.resident_arena
            self.resident_buf = torch.empty(arena.buf.numel(), dtype=torch.uint8, device=self.device)
            self.resident_buf.copy_(arena.buf, non_blocking=arena.pinned)
            base = arena.buf.data_ptr()
            for t, c in zip(self._resident_tensors(), self.resident_cpu):
                off = c.data_ptr() - base
                t.data = self.resident_buf[off : off + c.numel() * c.element_size()].view(c.dtype).view(c.shape)
            self.restores += 1
        self._allocate_slots()
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self.slot_free = [ev] * self.nslots
        if self.streamed:
            self._load(self.streamed[0])

    def end(self) -> None:
        """Per-stage streaming: free the slots. Every streamed block points back at its CPU copy
        (also after a forward that raised between a block's hooks), and the compute stream waits
        for the copy stream first, so no copy still in flight can write into freed memory."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        for p, i in enumerate(self.streamed):
            for t, c in zip(self._tensors(self.blocks[i]), self.cpu[p]):
                t.data = c
        if self.idle:
            for t, c in zip(self._resident_tensors(), self.resident_cpu):
                t.data = c
            self.resident_buf = None
        self.slots = []
        self._reset_slots()

    def _load(self, i: int) -> None:
        if not self.slots:
            from .errors import EngineError

            raise EngineError("a streamed layer ran outside its stage (no GPU slots: onload the component first)")
        s = self.next_slot
        self.next_slot = (s + 1) % len(self.slots)
        owner = self.slot_owner[s]
        if owner is not None and owner in self.ready:  # prefetched but never run: evict it
            del self.ready[owner]
            del self.slot_of[owner]
        lo, hi = self.ranges[self.position[i]]
        dst, src = self.slots[s][: hi - lo], self.arena.buf[lo:hi]
        ev = None
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                if self.slot_free[s] is not None:
                    self.copy_stream.wait_event(self.slot_free[s])
                dst.copy_(src, non_blocking=self.pin)
                ev = torch.cuda.Event()
                ev.record(self.copy_stream)
        else:
            dst.copy_(src)
        self.ready[i] = ev
        self.slot_of[i] = s
        self.slot_owner[s] = i

    def _next_streamed(self, i: int, k: int) -> int:
        """The streamed block k places after streamed block i in execution order, across steps;
        None past the last block when streaming per stage (nothing follows)."""
        q = self.position[i] + k
        if self.per_stage and q >= len(self.streamed):
            return None
        return self.streamed[q % len(self.streamed)]

    def _pre_hook(self, i: int):
        p = self.position[i]

        def hook(module, args):
            if i in self.ready:
                self.hits += 1
            else:
                self.misses += 1
                self._load(i)
            ev = self.ready.pop(i)
            if ev is not None:
                torch.cuda.current_stream(self.device).wait_event(ev)
            buf = self.slots[self.slot_of[i]]
            base = self.arena.buf.data_ptr() + self.ranges[p][0]
            for t, c in zip(self._tensors(module), self.cpu[p]):
                off = c.data_ptr() - base
                t.data = buf[off : off + c.numel() * c.element_size()].view(c.dtype).view(c.shape)
            for k in range(1, self.window + 1):
                j = self._next_streamed(i, k)
                if j is None:
                    break
                if j not in self.ready and j != i:
                    self._load(j)

        return hook

    def _post_hook(self, i: int):
        p = self.position[i]

        def hook(module, args, output):
            s = self.slot_of.pop(i)
            if self.cuda:
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(self.device))
                self.slot_free[s] = ev
            for t, c in zip(self._tensors(module), self.cpu[p]):
                t.data = c

        return hook

    def manifest(self) -> dict:
        return {
            "blocks": len(self.blocks), "resident": self.resident, "streamed": len(self.streamed),
            "resident_blocks": list(self.resident_blocks),
            "prefetch_window": self.window, "gpu_slots": self.nslots,
            "slot_bytes": self.slot_bytes if self.nslots else 0, "streamed_bytes": self.streamed_bytes,
            "pinned": self.arena.pinned, "prefetch_hits": self.hits, "misses": self.misses,
            "resident_bytes": self.resident_bytes, "idle_offload": self.idle, "resident_restores": self.restores,
        }


TEXT_ENCODER_PREFETCH = 1  # streamed text-encoder layers loaded ahead of the running one


def repeated_layers(module: nn.Module) -> list[nn.Module]:
    """A model's repeated layers: the largest nn.ModuleList (most entries, then most parameters)
    whose entries are all of one class. T5: `encoder.block`; CLIP: `encoder.layers`; Qwen: `layers`.
    A ModuleList inside a layer (T5Block.layer: attention, then MLP) mixes classes and never wins."""
    best: list[nn.Module] = []
    key = (0, 0)
    for m in module.modules():
        if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1:
            k = (len(m), sum(p.numel() for p in m.parameters()))
            if k > key:
                best, key = list(m), k
    return best


class TextEncoderOffload:
    """--text-encoder-cpu-offload: the encoder's repeated layers (repeated_layers) stream during
    the encode stage as a DiT's blocks do (pinned arena, window + 1 GPU slots, copy stream, events,
    prefetch of the next layer; none resident), and the rest of it (embeddings, final norm, rotary
    tables) visits the GPU for the stage as ComponentOffload moves a component. Between stages the
    encoder holds no GPU memory: the slots are freed after each encode. Same bytes copied per
    encode as moving the whole encoder, but only the non-layer weights and two layers at a time on
    the GPU (T5-XXL: 0.3 + 2 x 0.4 GB instead of 9.5 GB)."""

    def __init__(self, encoder: nn.Module, device: torch.device, pin: bool):
        layers = repeated_layers(encoder)
        if not layers:
            from .errors import EngineError

            raise EngineError(f"{type(encoder).__name__} has no repeated layers to stream")
        in_layers = frozenset(id(t) for b in layers for t in LayerwiseOffload._tensors(b))
        self.rest = ComponentOffload(encoder, device, pin, skip=in_layers)
        self.layers = LayerwiseOffload(encoder, device, TEXT_ENCODER_PREFETCH, 0, pin, blocks=layers)
        self.bytes = self.rest.bytes + self.layers.streamed_bytes

    def onload(self) -> None:
        self.rest.onload()
        self.layers.begin()

    def offload(self) -> None:
        self.layers.end()
        self.rest.offload()

    def manifest(self) -> dict:
        return {**self.layers.manifest(), "other_bytes": self.rest.bytes}
