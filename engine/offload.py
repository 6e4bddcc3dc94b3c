"""Component CPU offload: a component lives in (pinned) CPU memory and visits the GPU for its stage.

Weights are frozen, so the CPU copy stays valid: moving to the GPU copies each tensor once, and
moving back just points the parameters at the CPU copies again (no device-to-host copy)."""

from __future__ import annotations

import torch
from torch import nn


class ComponentOffload:
    def __init__(self, module: nn.Module, device: torch.device, pin: bool):
        self.module, self.device, self.pin = module, device, pin
        self.cpu: dict[str, torch.Tensor] = {}
        for name, t in self._tensors():
            c = t.detach().to("cpu")
            if pin:
                c = c.pin_memory()
            self.cpu[name] = c
        self.offload()
        self.bytes = sum(t.numel() * t.element_size() for t in self.cpu.values())

    def _tensors(self):
        yield from self.module.named_parameters()
        yield from self.module.named_buffers()

    def onload(self) -> None:
        for name, t in self._tensors():
            t.data = self.cpu[name].to(self.device, non_blocking=self.pin)

    def offload(self) -> None:
        for name, t in self._tensors():
            t.data = self.cpu[name]
