"""What every kernel file shares: the optional Triton import, the Triton-or-reference decision,
input checks that raise a readable ValueError, and row-kernel launch sizes.

The Triton path runs for CUDA tensors, and for CPU tensors when the kernels were built by the
Triton interpreter (TRITON_INTERPRET=1 in the environment *before* triton is imported: triton's
own library functions such as tl.sum are decorated at its import, so setting the variable later
in a process does not give a working interpreter; the tests run it in a fresh process).
"""

import functools

import torch
from torch._subclasses.fake_tensor import is_fake

try:
    import triton
    import triton.language as tl
    from torch.library import wrap_triton
    from triton.runtime.interpreter import InterpretedFunction

    HAS_TRITON = True
except ImportError:  # macOS / Windows: the ops still register and run their torch references

    class _NoTriton:
        """Lets the kernel definitions parse where triton is not installed; they are never launched."""

        constexpr = float32 = bfloat16 = float16 = int64 = None

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()
    wrap_triton = InterpretedFunction = None
    HAS_TRITON = False

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_ROW = 16384  # widest normalised row a program holds in registers


def is_interpreted(kernel) -> bool:
    return HAS_TRITON and isinstance(kernel, InterpretedFunction)


def use_triton(x: torch.Tensor, kernel) -> bool:
    """Triton for CUDA tensors; for CPU tensors only when `kernel` was built by the interpreter."""
    if not HAS_TRITON:
        return False
    if x.device.type == "cuda":
        return True
    # The interpreter cannot run under torch.compile's tracing (fake tensors): trace the reference.
    return x.device.type == "cpu" and is_interpreted(kernel) and not tracing(x)


def tracing(x: torch.Tensor) -> bool:
    """Whether a launch now is being traced (torch.compile's fake tensors, functionalisation,
    make_fx): then it must go through wrap_triton. In eager the raw kernel launches: the
    wrapper's higher-order-op dispatch costs far more than these kernels run."""
    return torch._C._len_torch_dispatch_stack() > 0 or is_fake(x)


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


def row_config(width: int, min_rows: int = 1) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_C columns, num_warps) for a kernel holding whole rows of `width`.
    min_rows 2 suits the kernels that reduce over a row before they write it (norms): on the H200
    at the DiTs' widths (3072, 3840) two rows a program ran 1-7% faster than one, and the plain
    gated residual 1-2% slower (bench/bench_fused_configs.py)."""
    block_c = triton.next_power_of_2(width)
    block_m = max(min_rows, min(16, 2048 // block_c))
    num_warps = min(max(block_m * block_c // 256, 1), 8)
    return block_m, block_c, num_warps


def register(name: str):
    """Register `fn` as the custom op dittune::<name>; returns a function that calls the op while
    torch.compile traces (one node, no graph break) and `fn` itself in eager: the custom-op
    dispatcher costs about 35 us a call on the H100 host, more than most of these kernels run.

    With triton installed the op is a triton_op: Inductor sees the kernels `fn` launches through
    wrap_triton (and hashes their source into its cache key); without triton a plain custom_op
    whose fake implementation is `fn` itself. The op is the function's `.op`."""

    def deco(fn):
        if HAS_TRITON:
            op = torch.library.triton_op(f"dittune::{name}", fn, mutates_args=())
        else:
            op = torch.library.custom_op(f"dittune::{name}", fn, mutates_args=())
            op.register_fake(fn)

        @functools.wraps(fn)
        def call(*args):
            return op(*args) if torch.compiler.is_compiling() else fn(*args)

        call.op = op
        return call

    return deco


def bench(label: str, nbytes: int, reference, triton, op=None) -> None:
    """One line per shape: GPU time (a CUDA graph of 20 ms of calls: no launch overhead) and GB/s
    of the reference and the kernel, the speedup, and with `op` (the public op) the wall time per
    call of back-to-back eager calls of op and reference: the larger of the Python dispatch
    cost and the GPU time. `nbytes`: the least the op must read and write."""
    import time

    from triton.testing import do_bench_cudagraph

    def eager_us(fn, n=200):
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / n * 1e6

    ref_us, tri_us = (do_bench_cudagraph(fn, return_mode="median") * 1e3 for fn in (reference, triton))
    line = " | ".join(f"{name} {us:7.1f} us {nbytes / us / 1e3:5.0f} GB/s"
                      for name, us in (("reference", ref_us), ("triton", tri_us)))  # fmt: skip
    line += f" | x{ref_us / tri_us:.2f}"
    if op is not None:
        line += f" | eager per call: op {eager_us(op):.1f} us, reference {eager_us(reference):.1f} us"
    print(f"{label:<50} {line}", flush=True)
