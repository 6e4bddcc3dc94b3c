"""What every kernel file shares: the optional Triton import, the Triton-or-reference decision,
input checks that raise a readable ValueError, and row-kernel launch sizes.

The Triton path runs for CUDA tensors, and for CPU tensors when the kernels were built by the
Triton interpreter (TRITON_INTERPRET=1 in the environment *before* triton is imported: triton's
own library functions such as tl.sum are decorated at its import, so setting the variable later
in a process does not give a working interpreter; the tests run it in a fresh process).
"""

import torch

try:
    import triton
    import triton.language as tl
    from torch.library import wrap_triton

    HAS_TRITON = True
except ImportError:  # macOS / Windows: the ops still register and run their torch references

    class _NoTriton:
        """Lets the kernel definitions parse where triton is not installed; they are never launched."""

        constexpr = float32 = bfloat16 = float16 = int64 = None

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()
    wrap_triton = None
    HAS_TRITON = False

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_ROW = 16384  # widest normalised row a program holds in registers


def is_interpreted(kernel) -> bool:
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def use_triton(x: torch.Tensor, kernel) -> bool:
    """Triton for CUDA tensors; for CPU tensors only when `kernel` was built by the interpreter."""
    if not HAS_TRITON:
        return False
    if x.device.type == "cuda":
        return True
    # Under torch.compile tracing the interpreter cannot run on fake tensors: trace the reference.
    from torch._subclasses.fake_tensor import is_fake

    return x.device.type == "cpu" and is_interpreted(kernel) and not is_fake(x)


def launchable(kernel):
    """wrap_triton makes the launch traceable by torch.compile; interpreted kernels launch as they are."""
    return kernel if is_interpreted(kernel) else wrap_triton(kernel)


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether the ops run their Triton kernels (not the torch references) for tensors on `device`.

    Default device: CUDA when present, else the CPU."""
    if not HAS_TRITON:
        return False
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.is_available()
    if device.type != "cpu":
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton.jit(_probe), InterpretedFunction)


def _probe():
    pass


# ---------------------------------------------------------------------------------------------
# Checks: `op` names the op in every message.


def fail(op: str, msg: str):
    raise ValueError(f"dittune::{op}: {msg}")


def shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_dtype(op: str, x: torch.Tensor, **same: torch.Tensor | None) -> None:
    """x is fp32/bf16/fp16 and every tensor in `same` has its dtype and device."""
    if x.dtype not in DTYPES:
        fail(op, f"x has dtype {x.dtype}; supported: float32, bfloat16, float16")
    for name, t in same.items():
        if t is None:
            continue
        if t.dtype != x.dtype:
            fail(op, f"{name} has dtype {t.dtype} but x has {x.dtype}; cast {name} to x.dtype")
        if t.device != x.device:
            fail(op, f"{name} is on {t.device} but x is on {x.device}")


def check_modulation(op: str, name: str, t: torch.Tensor | None, x: torch.Tensor) -> None:
    """t is [B, C] (per sample), [B, 1, C] or [B, L, C] (per token) for x [B, L, C]."""
    if t is None:
        return
    b, l, c = x.shape
    if tuple(t.shape) not in ((b, c), (b, 1, c), (b, l, c)):
        fail(op, f"{name} must be [B, C], [B, 1, C] or [B, L, C] = [{b}, {l}, {c}] for x {shape(x)}, got {shape(t)}")


def check_3d(op: str, x: torch.Tensor) -> None:
    if x.dim() != 3:
        fail(op, f"x must be [B, L, C], got {shape(x)}")


def check_weight(op: str, name: str, w: torch.Tensor | None, n: int) -> None:
    if w is not None and tuple(w.shape) != (n,):
        fail(op, f"{name} must be [{n}] (the normalised width), got {shape(w)}")


def check_launchable(op: str, kernel, x: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """Device and layout checks of the Triton path: last dim contiguous, weights contiguous."""
    if not HAS_TRITON:
        fail(op, "triton is not installed; call the public op, which falls back to the torch reference")
    if x.device.type != "cuda" and not is_interpreted(kernel):
        fail(op, f"the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 at import), x is on {x.device}")
    for name, t in {"x": x, **tensors}.items():
        if t is not None and t.numel() and t.stride(-1) != 1:
            fail(op, f"{name} {shape(t)} has stride {tuple(t.stride())}: its last dim must be contiguous")
    if x.shape[-1] > MAX_ROW:
        fail(op, f"rows of {x.shape[-1]} elements exceed the kernel's maximum {MAX_ROW}")


def modulation_strides(t: torch.Tensor | None, x: torch.Tensor) -> tuple[int, int]:
    """(batch, token) strides of a [B, C] / [B, 1, C] / [B, L, C] tensor; token stride 0 broadcasts."""
    if t is None:
        return 0, 0
    if t.dim() == 2:
        return t.stride(0), 0
    return t.stride(0), (t.stride(1) if t.shape[1] == x.shape[1] and x.shape[1] > 1 else 0)


def per_token(t: torch.Tensor | None) -> torch.Tensor | None:
    """[B, C] -> [B, 1, C] so it broadcasts over L; [B, 1|L, C] unchanged."""
    return t[:, None] if t is not None and t.dim() == 2 else t


def row_config(width: int) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_C columns, num_warps) for a kernel holding whole rows of `width`."""
    block_c = triton.next_power_of_2(width)
    block_m = max(1, min(16, 2048 // block_c))
    num_warps = min(max(block_m * block_c // 256, 1), 8)
    return block_m, block_c, num_warps


def register(name: str):
    """Register `fn` as the custom op dittune::<name> (one node for torch.compile, no graph break).

    With triton installed it is a triton_op: Inductor sees the kernels it launches through
    wrap_triton (and hashes their source into its cache key); without triton a plain custom_op
    whose fake implementation is `fn` itself."""

    def deco(fn):
        if HAS_TRITON:
            return torch.library.triton_op(f"dittune::{name}", fn, mutates_args=())
        op = torch.library.custom_op(f"dittune::{name}", fn, mutates_args=())
        op.register_fake(fn)
        return op

    return deco


def bench(label: str, nbytes: int, **fns) -> None:
    """One line per shape: median time (triton.testing.do_bench) and GB/s of each callable, and the
    speedup of the last over the first. `nbytes`: bytes the op must read and write at least."""
    from triton.testing import do_bench

    times = {name: do_bench(fn, return_mode="median") for name, fn in fns.items()}
    cells = [f"{name} {ms * 1e3:7.1f} us {nbytes / ms / 1e6:6.0f} GB/s" for name, ms in times.items()]
    first, last = list(times.values())[0], list(times.values())[-1]
    print(f"{label:<52} " + " | ".join(cells) + f" | x{first / last:.2f}", flush=True)
