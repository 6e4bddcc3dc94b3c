"""Every engine flag changes what runs, shows in the manifest, and (lossless flags) leaves the
output as the default path makes it. CPU here; the CUDA-only flags run under the `gpu` marker."""

import pytest
import torch

from dittune.engine import flags as F
from dittune.engine.errors import EngineError
from dittune.engine.run import GenerateRequest, generate

MODEL = "flux-dev-tiny"


def _run(argv, device="cpu", **kw):
    req = GenerateRequest(model=MODEL, steps=2, width=64, height=64, device=device, flags=F.config_from_argv(argv), **kw)
    return generate(req)


@pytest.fixture(scope="module")
def default_cpu():
    return _run([])


def _close(a, b, max_abs: int, max_mean: float = 0.5):
    diff = (a.image.int() - b.image.int()).abs()
    assert diff.max().item() <= max_abs and diff.float().mean().item() <= max_mean, (diff.max().item(), diff.float().mean().item())


def test_default_manifest(default_cpu):
    m = default_cpu.dump["manifest"]
    assert m["attention"]["backend"] == "torch_sdpa" and m["attention"]["calls"]["torch_sdpa"] > 0
    assert m["compile"]["enabled"] is False and m["compile"]["compiled"] == []
    assert set(m["placement"].values()) == {"resident"} and m["layerwise"] is None and m["text_encoder_layerwise"] is None
    assert m["flags"] == F.config_to_dict(F.EngineConfig())


@pytest.mark.parametrize("argv, compiled", [
    (["--enable-torch-compile"], ["double_blocks", "single_blocks"]),
    (["--enable-torch-compile", "--compile-scope", "full"], ["FluxTransformer"]),
])
def test_compile_applies_and_matches(default_cpu, argv, compiled):
    r = _run(argv, warmup=1)
    m = r.dump["manifest"]["compile"]
    assert m["enabled"] and m["compiled"] == compiled and m["compile_s"] >= 0
    _close(r, default_cpu, max_abs=1)


def test_vae_bf16_is_applied(default_cpu):
    r = _run(["--vae-precision", "bf16"])
    assert r.dump["manifest"]["vae_dtype"] == "bfloat16"


@pytest.mark.parametrize("argv", [
    ["--dit-cpu-offload"], ["--text-encoder-cpu-offload"], ["--vae-cpu-offload"], ["--dit-layerwise-offload"],
    ["--attention-backend", "torch_cudnn_sdpa"], ["--attention-backend", "torch_flash_sdpa"],
])
def test_cuda_only_flags_refuse_on_cpu(argv):
    with pytest.raises(EngineError) as e:
        _run(argv)
    assert "\n" not in str(e.value) and ("CUDA" in str(e.value) or "not available on cpu" in str(e.value))


def test_fused_kernels_refuse_where_triton_cannot_run():
    from dittune import kernels

    if kernels.triton_available("cpu"):
        pytest.skip("TRITON_INTERPRET=1: the kernels do run on the CPU here")
    with pytest.raises(EngineError, match="Triton kernels cannot run on cpu"):
        _run(["--fused-kernels"])


FUSED_SCRIPT = """
import json, sys, torch
from dittune.engine import flags as F
from dittune.engine.run import GenerateRequest, generate
out = {}
for name, argv in (("default", []), ("fused", ["--fused-kernels"])):
    r = generate(GenerateRequest(model=sys.argv[1], steps=2, width=64, height=64, device="cpu", flags=F.config_from_argv(argv)))
    out[name] = {"image": r.image.flatten().tolist(), "fused": r.dump["manifest"]["fused_kernels"]}
print(json.dumps(out))
"""


@pytest.mark.parametrize("model, kernels", [
    ("flux-dev-tiny", ["gated_residual", "gated_residual_modulate", "joint_qk_norm_rope", "linear_concat", "linear_gelu",
                       "modulate", "qk_norm_rope"]),
    ("qwen-image-tiny", ["gated_residual", "gated_residual_modulate", "joint_qk_norm_rope", "linear_gelu", "modulate"]),
    ("z-image-turbo-tiny", ["gated_norm_residual", "qk_norm_rope", "rms_norm_modulate"]),
])
def test_fused_kernels_apply_and_match_under_the_triton_interpreter(model, kernels):
    import json
    import os
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", FUSED_SCRIPT, model], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, TRITON_INTERPRET="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["fused"]["fused"] == {"enabled": True, "kernels": kernels}
    assert out["default"]["fused"] == {"enabled": False, "kernels": []}
    a, b = torch.tensor(out["default"]["image"]), torch.tensor(out["fused"]["image"])
    assert (a - b).abs().max().item() <= 1


@pytest.mark.parametrize("kw, frag", [
    (dict(width=100), "multiple of 16"), (dict(steps=0), "at least one"), (dict(dtype="fp8"), "--dtype"),
    (dict(device="tpu"), "--device"), (dict(model_path="/nonexistent/ckpt"), "does not exist"),
])
def test_bad_requests(kw, frag):
    base = dict(model=MODEL, steps=2, width=64, height=64, device="cpu")
    with pytest.raises(EngineError, match=frag):
        generate(GenerateRequest(**{**base, **kw}))


# --- on the device ------------------------------------------------------------------------------

GPU_LOSSLESS = [
    ["--attention-backend", "torch_cudnn_sdpa"], ["--attention-backend", "torch_flash_sdpa"],
    ["--attention-backend", "torch_efficient_sdpa"], ["--enable-torch-compile"],
    ["--enable-torch-compile", "--compile-scope", "full"], ["--dit-cpu-offload"], ["--text-encoder-cpu-offload"],
    ["--vae-cpu-offload"], ["--fused-kernels"], ["--dit-layerwise-offload"], ["--dit-layerwise-offload", "--dit-resident-layers", "1"],
    ["--dit-layerwise-offload", "--dit-offload-prefetch-size", "0.5", "--no-pin-cpu-memory"],
    ["--dit-layerwise-offload", "--enable-torch-compile"], ["--enable-cuda-graph"],
    ["--dit-layerwise-offload", "--dit-resident-layers", "1", "--dit-idle-offload", "--enable-torch-compile"],
    ["--attention-backend", "torch_cudnn_sdpa", "--fused-kernels", "--enable-torch-compile", "--enable-cuda-graph"],
]


@pytest.fixture(scope="module")
def default_gpu():
    return _run([], device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("argv", GPU_LOSSLESS, ids=" ".join)
def test_lossless_flags_match_default_on_gpu(default_gpu, argv):
    r = _run(argv, device="cuda", warmup=1)
    m = r.dump["manifest"]
    cfg = F.config_from_argv(argv)
    if cfg.attention_backend != "torch_sdpa" and not cfg.enable_torch_compile:
        assert set(m["attention"]["calls"]) == {cfg.attention_backend}
    if cfg.dit_cpu_offload:
        assert m["placement"]["dit"] == "cpu_offload"
    if cfg.text_encoder_cpu_offload:
        # layers streamed during encode, the rest visiting for it (TextEncoderOffload)
        assert m["placement"]["text_encoder"] == m["placement"]["text_encoder_2"] == "layerwise_offload"
        for name in ("text_encoder", "text_encoder_2"):
            te = m["text_encoder_layerwise"][name]
            assert te["resident"] == 0 and te["streamed"] == te["blocks"] >= 2 and te["gpu_slots"] == 2
            assert te["misses"] == 0 and te["prefetch_hits"] > 0 and te["prefetch_hits"] % te["blocks"] == 0
            assert m["offloaded_bytes"][name] == te["streamed_bytes"] + te["other_bytes"]
    else:
        assert m["text_encoder_layerwise"] is None
    if cfg.vae_cpu_offload:
        assert m["placement"]["vae"] == "cpu_offload"
    if cfg.fused_kernels:
        assert m["fused_kernels"]["enabled"] and "modulate" in m["fused_kernels"]["kernels"]
    if cfg.enable_cuda_graph:  # one graph (one shape), replayed for every step of both requests
        assert m["cuda_graph"]["enabled"] and m["cuda_graph"]["graphs"] == 1 and m["cuda_graph"]["replays"] >= 2
    whole = not (cfg.dit_layerwise_offload or cfg.dit_cpu_offload)
    assert m["modulation"] == ("packed" if whole else "per_block")
    if cfg.dit_layerwise_offload:
        lw = m["layerwise"]
        assert m["placement"]["dit"] == "layerwise_offload" and lw["resident"] == cfg.dit_resident_layers
        assert lw["pinned"] == cfg.pin_cpu_memory and lw["misses"] >= 1
        if lw["streamed"] > 1:  # one streamed block cannot be prefetched while it is in use
            assert lw["prefetch_hits"] > 0
        # idle offload: the resident blocks were copied back once per denoise loop (both requests)
        assert lw["idle_offload"] == cfg.dit_idle_offload
        assert lw["resident_restores"] == (2 if cfg.dit_idle_offload and cfg.dit_resident_layers else 0)
    # bf16: a different kernel or fusion order moves a few pixels by a few levels
    _close(r, default_gpu, max_abs=16, max_mean=1.0)


@pytest.mark.gpu
def test_cuda_graph_with_true_cfg_new_prompts_and_shapes():
    """Qwen-Image (two passes per step, sharing the step cache) from one Pipeline: a graph per
    shape, a new request's prompts copied into the captured buffers, outputs as eager's."""
    from dittune.engine.models import get_family
    from dittune.engine.pipeline import Pipeline

    def requests(argv):
        pipe = Pipeline(get_family("qwen-image-tiny"), F.config_from_argv(argv), torch.device("cuda"), torch.bfloat16)
        # the second request has other prompts of the same token counts: same graph, new embeddings
        out = [pipe("a red fox", "blurry", 64, 64, 3, 4.0, 0)[0], pipe("a big cat", "hazy", 64, 64, 3, 4.0, 1)[0],
               pipe("a red fox", "blurry", 96, 64, 3, 4.0, 0)[0]]
        return out, pipe.manifest()

    eager, _ = requests([])
    graphed, m = requests(["--enable-cuda-graph"])
    assert m["cuda_graph"]["graphs"] == 2 and m["cuda_graph"]["replays"] == 9  # 64x64 and 96x64; 3 steps x 3
    assert not torch.equal(eager[0], eager[1])
    for a, b in zip(graphed, eager):
        diff = (a.int() - b.int()).abs()
        assert diff.max().item() <= 1, diff.max().item()


@pytest.mark.gpu
def test_vram_budget_is_enforced_on_gpu():
    from dittune.engine.errors import BudgetExceededError

    with pytest.raises(BudgetExceededError, match="VRAM budget"):
        generate(GenerateRequest(model="flux-dev", steps=1, device="cuda", vram_budget="4GiB"))


def test_third_party_attention_kernels_are_opaque_custom_ops():
    """fa and sage_attn go through dittune:: custom ops, so torch.compile sees one node (their
    fake implementations give the output shape without the packages installed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import dittune.engine.attention  # noqa: F401  (registers the ops)

    with FakeTensorMode():
        q = torch.empty(1, 17, 3, 64, dtype=torch.bfloat16)  # [B, L, H, D], the libraries' layout
        for op in (torch.ops.dittune.flash_attention, torch.ops.dittune.flashinfer_attention,
                   torch.ops.dittune.sage_attention):
            out = op(q, q, q)
            assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
