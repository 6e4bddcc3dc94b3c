"""Shared by the kernel tests: the Triton path under the interpreter, tolerances, input helpers.

How the interpreter is enabled: triton reads TRITON_INTERPRET when a function is decorated with
@triton.jit, and that includes triton's own library (tl.sum, ...), decorated when triton is
first imported. Setting the variable inside a pytest process is therefore unreliable (another
test module, torch.compile or our own op modules may have imported triton already, and a global
setting would leak into every later test). Instead each kernel test module lists its Triton
cases (`interpreted_cases()`), and `run_interpreted` runs them all in one fresh Python whose
environment has TRITON_INTERPRET=1 from the start; the child refuses to run unless the kernels
really are interpreted. The parent's tests then report each case's outcome.
"""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def run_interpreted(test_file: str, timeout: float = 600) -> dict[str, str | None]:
    """case id -> None (passed) or the failure's traceback, from a TRITON_INTERPRET=1 child process."""
    pytest.importorskip("triton")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import kernelcheck; "
                f"kernelcheck._child({test_file!r}, {str(out)!r})")  # fmt: skip
        env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode or not out.exists():
            name = Path(test_file).name
            raise RuntimeError(f"interpreted run of {name} failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}")
        return json.loads(out.read_text())


def _child(test_file: str, out_path: str) -> None:
    from dittune.kernels import triton_available

    if not triton_available("cpu"):
        raise SystemExit("TRITON_INTERPRET=1 was set but the kernels are not interpreted")
    spec = importlib.util.spec_from_file_location(Path(test_file).stem, test_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = {}
    for case, check in module.interpreted_cases().items():
        try:
            check()
            results[case] = None
        except Exception:  # reported by the parent test of this case
            results[case] = traceback.format_exc()
    Path(out_path).write_text(json.dumps(results))


def assert_close(out: torch.Tensor, ref: torch.Tensor, ulps: float = 2) -> None:
    """Within `ulps` units of the dtype's epsilon, relative to the value and to the largest value
    (the references round intermediates to the dtype where the kernels stay in fp32)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape, (out.dtype, out.shape, ref.dtype, ref.shape)
    eps = torch.finfo(ref.dtype).eps
    big = ref.float().abs().amax().clamp_min(1).item()
    torch.testing.assert_close(out.float(), ref.float(), rtol=ulps * eps, atol=ulps * eps * big)


def rand(*shape: int, dtype=torch.float32, device="cpu", scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    return (torch.randn(*shape, device=device) * scale + offset).to(dtype)
