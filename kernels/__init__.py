"""Fused Triton kernels (and cuBLASLt GEMM epilogues, epilogue.py), each beside its pure-torch
reference (the fallback off CUDA).

Every op is a torch custom op `dittune::<name>` (one node under torch.compile, no graph break):
Triton for CUDA tensors, the torch reference otherwise (and on CUDA without triton). Inference
only: no autograd formulas. Importing this package is cheap; the op modules (and triton) load on
first use of a name.
"""

import importlib
import sys
import types

_WHERE = {
    "modulate": "modulation",
    "rms_norm_modulate": "modulation",
    "gated_residual": "residual",
    "gated_residual_modulate": "residual",
    "gated_norm_residual": "residual",
    "rms_norm": "rmsnorm",
    "qk_norm_rope": "qk_norm_rope",
    "joint_qk_norm_rope": "qk_norm_rope",
    "linear_gelu": "epilogue",
    "linear_concat": "epilogue",
}

KERNELS: tuple[str, ...] = tuple(n for n, where in _WHERE.items() if where != "epilogue")  # Triton
EPILOGUES: tuple[str, ...] = tuple(n for n, where in _WHERE.items() if where == "epilogue")  # cuBLASLt

__all__ = [*KERNELS, *EPILOGUES, "KERNELS", "EPILOGUES", "triton_available"]


def triton_available(device=None) -> bool:
    """Whether the ops run their Triton kernels (not the torch references) for tensors on `device`
    (default: CUDA when present, else the CPU; the CPU only under TRITON_INTERPRET=1 at import)."""
    from ._common import triton_available

    return triton_available(device)


def __getattr__(name: str):
    if name in _WHERE:
        module = importlib.import_module(f".{_WHERE[name]}", __name__)
        for op, where in _WHERE.items():
            if where == _WHERE[name]:
                globals()[op] = getattr(module, op)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    """Importing the submodule qk_norm_rope sets the package attribute of that name to the module;
    keep the op of the same name there instead (the module stays in sys.modules)."""

    def __setattr__(self, name, value):
        if name in _WHERE and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__():
    return sorted(__all__)
