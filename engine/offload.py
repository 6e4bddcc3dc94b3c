"""Offload: weights that live in (pinned) CPU memory and visit the GPU when needed.

ComponentOffload moves a whole component for its stage; LayerwiseOffload streams a DiT's blocks.
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
    def __init__(self, module: nn.Module, device: torch.device, pin: bool):
        self.module, self.device, self.pin = module, device, pin
        names, tensors = zip(*self._tensors())
        self.arena = PinnedArena(list(tensors), pin)
        self.cpu: dict[str, torch.Tensor] = dict(zip(names, self.arena.views))
        self.offload()
        self.bytes = self.arena.nbytes

    def _tensors(self):
        yield from self.module.named_parameters()
        yield from self.module.named_buffers()

    def onload(self) -> None:
        for name, t in self._tensors():
            t.data = self.cpu[name].to(self.device, non_blocking=self.pin)

    def offload(self) -> None:
        for name, t in self._tensors():
            t.data = self.cpu[name]


class LayerwiseOffload:
    """Stream a DiT's repeated blocks from (pinned) CPU memory, overlapping the copy of the next
    blocks (on a copy stream) with the compute of the current one.

    The first `resident` blocks stay on the GPU for good (partial residency). The streamed blocks
    are packed block by block into one pinned arena; the GPU holds `window + 1` fixed slots, each
    the size of the largest block. Loading a block is one copy of its byte range into the next
    slot (round robin in load order), after the compute stream has finished with that slot's
    previous block (a GPU-side event wait: the CPU never blocks and the caching allocator is not
    involved, so reserved memory stays at what is really used). Before block i runs, its copy is
    waited for (done synchronously on a miss), its parameters are pointed at views of its slot, and
    the next `window` streamed blocks are prefetched, wrapping around to the first streamed blocks
    of the next step. After it runs, its parameters point back at their CPU copies.

    On a CPU device the same bookkeeping runs with plain copies (used by the tests)."""

    def __init__(self, dit: nn.Module, device: torch.device, prefetch: float, resident: int, pin: bool):
        names = getattr(dit, "repeated_blocks", ())
        self.blocks: list[nn.Module] = [b for n in names for b in getattr(dit, n)]
        n = len(self.blocks)
        if not 0 <= resident <= n:
            from .errors import EngineError

            raise EngineError(f"--dit-resident-layers {resident}: this DiT has {n} blocks")
        self.device, self.pin, self.resident = device, pin, resident
        self.cuda = device.type == "cuda"
        streamed = n - resident
        self.window = 0 if streamed == 0 else min(streamed - 1, math.ceil(prefetch * streamed) if prefetch < 1 else int(prefetch))
        block_ids = {id(b) for b in self.blocks}
        # Everything but the streamed blocks lives on the GPU.
        for name, child in dit.named_children():
            if not isinstance(child, nn.ModuleList) or not any(id(b) in block_ids for b in child):
                child.to(device)
        for p in dit.parameters(recurse=False):
            p.data = p.data.to(device)
        for b in self.blocks[:resident]:
            b.to(device)

        per_block = [self._tensors(b) for b in self.blocks[resident:]]
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

        nslots = min(self.window + 1, streamed)
        slot_bytes = max((hi - lo for lo, hi in self.ranges), default=0)
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(nslots)]
        self.slot_free: list = [None] * nslots  # compute-stream event: the slot's last user is done
        self.slot_owner: list[int | None] = [None] * nslots
        self.next_slot = 0
        self.slot_of: dict[int, int] = {}
        self.ready: dict[int, object] = {}  # block index -> copy-done event (None on the CPU)
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.hits = self.misses = 0
        for i in range(resident, n):
            self.blocks[i].register_forward_pre_hook(self._pre_hook(i))
            self.blocks[i].register_forward_hook(self._post_hook(i))

    @staticmethod
    def _tensors(block: nn.Module) -> list[torch.Tensor]:
        return [*block.parameters(), *block.buffers()]

    def _load(self, i: int) -> None:
        s = self.next_slot
        self.next_slot = (s + 1) % len(self.slots)
        owner = self.slot_owner[s]
        if owner is not None and owner in self.ready:  # prefetched but never run: evict it
            del self.ready[owner]
            del self.slot_of[owner]
        lo, hi = self.ranges[i - self.resident]
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
        n, r = len(self.blocks), self.resident
        return r + (i - r + k) % (n - r)

    def _pre_hook(self, i: int):
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
            base = self.arena.buf.data_ptr() + self.ranges[i - self.resident][0]
            for t, c in zip(self._tensors(module), self.cpu[i - self.resident]):
                off = c.data_ptr() - base
                t.data = buf[off : off + c.numel() * c.element_size()].view(c.dtype).view(c.shape)
            for k in range(1, self.window + 1):
                j = self._next_streamed(i, k)
                if j not in self.ready and j != i:
                    self._load(j)

        return hook

    def _post_hook(self, i: int):
        def hook(module, args, output):
            s = self.slot_of.pop(i)
            if self.cuda:
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(self.device))
                self.slot_free[s] = ev
            for t, c in zip(self._tensors(module), self.cpu[i - self.resident]):
                t.data = c

        return hook

    def manifest(self) -> dict:
        return {
            "blocks": len(self.blocks), "resident": self.resident, "streamed": len(self.blocks) - self.resident,
            "prefetch_window": self.window, "gpu_slots": len(self.slots),
            "slot_bytes": self.slots[0].numel() if self.slots else 0, "streamed_bytes": self.streamed_bytes,
            "pinned": self.arena.pinned, "prefetch_hits": self.hits, "misses": self.misses,
        }
