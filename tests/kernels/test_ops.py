"""The package surface and torch.compile: every op is one custom-op node without graph breaks,
traces through AOT (fake tensors, functionalisation), and exposes its kernel to Inductor."""

import importlib
import subprocess
import sys

import pytest
import torch

import dittune.kernels as K
from kernelcheck import assert_close


def _args(device="cpu", dtype=torch.float32, b=2, l=6, c=64, h=2, d=32):
    torch.manual_seed(0)
    x, y = torch.randn(2, b, l, c, device=device, dtype=dtype).unbind(0)
    gate, shift, scale = torch.randn(3, b, c, device=device, dtype=dtype).unbind(0)
    w = torch.randn(c, device=device, dtype=dtype)
    q, k, _ = torch.randn(b, l, 3, h, d, device=device, dtype=dtype).unbind(2)
    wh = torch.randn(d, device=device, dtype=dtype)
    ang = torch.rand(l, d // 2, device=device) * 10
    return dict(x=x, y=y, gate=gate, shift=shift, scale=scale, w=w, q=q, k=k, wh=wh, cos=ang.cos(), sin=ang.sin())


CALLS = {
    "modulate": lambda a: K.modulate(a["x"], a["shift"], a["scale"]),
    "rms_norm_modulate": lambda a: K.rms_norm_modulate(a["x"], a["w"], a["scale"], 1e-5),
    "gated_residual": lambda a: K.gated_residual(a["x"], a["gate"], a["y"]),
    "gated_residual_modulate": lambda a: K.gated_residual_modulate(a["x"], a["gate"], a["y"], a["shift"], a["scale"]),
    "gated_norm_residual": lambda a: K.gated_norm_residual(a["x"], a["gate"], a["y"], a["w"], 1e-5),
    "rms_norm": lambda a: K.rms_norm(a["q"], a["wh"]),
    "qk_norm_rope": lambda a: K.qk_norm_rope(a["q"], a["k"], a["wh"], a["wh"], a["cos"], a["sin"]),
    "joint_qk_norm_rope": lambda a: K.joint_qk_norm_rope(
        a["q"][:, :2], a["k"][:, :2], a["q"][:, 2:], a["k"][:, 2:], *[a["wh"]] * 4, a["cos"], a["sin"]
    ),
}


def test_kernels_tuple_names_every_public_op():
    assert set(K.KERNELS) == set(CALLS)
    for name in K.KERNELS:
        assert callable(getattr(K, name)), name
    importlib.import_module("dittune.kernels.qk_norm_rope")  # the submodule of the same name
    assert callable(K.qk_norm_rope)


def test_package_import_is_cheap():
    code = "import sys, dittune.kernels; print(sorted(m for m in ('torch', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", CALLS)
def test_dynamo_sees_one_custom_op_and_no_graph_break(name):
    torch._dynamo.reset()
    a = _args()
    explain = torch._dynamo.explain(lambda: CALLS[name](a))()
    assert explain.graph_break_count == 0, explain.break_reasons
    ops = [str(op) for graph in explain.ops_per_graph for op in graph]
    assert f"dittune.{name}.default" in " ".join(ops), ops


def test_fullgraph_aot_trace_of_all_ops_matches_eager():
    """aot_eager runs the fake implementations and the functional decomposition of every op."""
    torch._dynamo.reset()
    a = _args()

    def all_ops():
        return [CALLS[name](a) for name in CALLS]

    compiled = torch.compile(all_ops, backend="aot_eager", fullgraph=True)()
    for name, got, want in zip(CALLS, compiled, all_ops()):
        for g, w in zip(*(t if isinstance(t, tuple) else (t,) for t in (got, want))):
            assert torch.equal(g, w), name


@pytest.mark.parametrize("name", CALLS)
def test_inductor_sees_the_triton_kernel(name):
    """Inductor launches the kernel itself, and hashes its source into the compile cache key."""
    pytest.importorskip("triton")
    getattr(K, name)  # loads the op's module
    kernels = torch._library.triton.get_triton_kernels_for_op(f"dittune::{name}")
    assert [k.fn.__name__ for k in kernels if hasattr(k, "fn")], name


@pytest.mark.gpu
def test_cuda_inductor_launches_the_kernels_and_matches_eager():
    """Inductor's own launch of each kernel in the compiled graph (no fallback to an opaque op);
    it compiles them itself, so results may differ from eager by rounding (FMA contraction)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    a = _args("cuda", torch.bfloat16, l=300, c=3072, h=24, d=128)

    def all_ops():
        return [CALLS[name](a) for name in CALLS]

    compiled, code = run_and_get_code(torch.compile(all_ops, fullgraph=True))
    for kernel in ("_modulate_kernel", "_residual_kernel", "_rms_norm_kernel", "_qk_norm_rope_kernel"):
        assert kernel in "\n".join(code), kernel
    for name, got, want in zip(CALLS, compiled, all_ops()):
        for g, w in zip(*(t if isinstance(t, tuple) else (t,) for t in (got, want))):
            assert_close(g, w)
