"""Tensor parallel (engine/parallel/tensor.py) on gloo: TP-2 and TP-2 x Ulysses-2 of each tiny DiT
(4 heads) against one process, fp32, from synthetic weights and from a diffusers checkpoint the
test writes; each rank holds only its share; the flag's refusals; the CLI end to end. Ranks run
tests/engine/tensor_ranks.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dittune.engine.errors import FlagError
from dittune.engine.flags import config_from_dict, config_to_argv, to_sglang_argv, validate_for_model
from dittune.engine.models import get_spec
from dittune.engine.parallel import Layout, launch
from dittune.engine.parallel.tensor import Shard, fill_slice

HERE = Path(__file__).parent
TOL = 2e-5  # fp32: the same sums in another order
MODELS = ("flux-dev-tiny", "qwen-image-tiny", "z-image-turbo-tiny")


@pytest.fixture(autouse=True)
def ranks_import_checks(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))


def _diffusers_transformer(model: str):
    """diffusers' own transformer at the wide tiny sizes (tensor_ranks.WIDE), random weights."""
    import diffusers

    sys.path.insert(0, str(HERE))
    from tensor_ranks import wide_family

    cfg = wide_family(model).spec.dit_config
    if model.startswith("flux"):
        t = diffusers.FluxTransformer2DModel(
            in_channels=cfg.in_channels, num_layers=cfg.num_layers, num_single_layers=cfg.num_single_layers,
            attention_head_dim=cfg.attention_head_dim, num_attention_heads=cfg.num_attention_heads,
            joint_attention_dim=cfg.joint_attention_dim, pooled_projection_dim=cfg.pooled_projection_dim,
            guidance_embeds=cfg.guidance_embeds, axes_dims_rope=cfg.axes_dims_rope)
    elif model.startswith("qwen"):
        t = diffusers.QwenImageTransformer2DModel(
            patch_size=cfg.patch_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
            num_layers=cfg.num_layers, attention_head_dim=cfg.attention_head_dim,
            num_attention_heads=cfg.num_attention_heads, joint_attention_dim=cfg.joint_attention_dim,
            axes_dims_rope=cfg.axes_dims_rope)
    else:
        t = diffusers.ZImageTransformer2DModel(**cfg.to_diffusers())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # diffusers zero-inits some layers: make every weight (and bias) count
        for p in t.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return t


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """model -> a folder whose transformer/ holds diffusers' weights in several shards (an index)."""
    out = {}
    for model in MODELS:
        path = tmp_path_factory.mktemp("tp-ckpt") / model
        _diffusers_transformer(model).save_pretrained(path / "transformer", safe_serialization=True,
                                                      max_shard_size="60KB")
        assert (path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
        out[model] = str(path)
    return out


def _check(world, cases, explain=None, backend="gloo", tol=TOL, fast=False, plain=False):
    results = launch.run(world, "tensor_ranks:check", {"dits": cases, "explain": explain, "fast": fast, "plain": plain},
                         backend)
    assert len(results["dits"]) == world
    for rank_rows in results["dits"]:
        assert len(rank_rows) == len(cases)
        for model, lay, weights, err, scale, held_x_tp, whole_split, held, whole, n_attn in rank_rows:
            case = (model, lay, weights)
            assert err <= tol * max(1.0, scale), (case, err)
            assert whole_split > 0 and held_x_tp == whole_split, case  # each split tensor: exactly 1/tp of it
            assert held == whole - whole_split + whole_split // lay["tp"], case  # the rest is whole
            assert (n_attn > 0) == (lay.get("ulysses", 1) > 1), case
    return results


def test_tp2_matches_one_process_and_compiles_without_graph_breaks(checkpoints):
    cases = [(m, {"tp": 2}, path) for m in MODELS for path in (None, checkpoints[m])]
    results = _check(2, cases, explain={"tp": 2}, plain=True)
    breaks = results["explain"]
    assert len(breaks) == 2 and all(n == 0 for _, n in breaks), breaks  # one graph per block kind
    # uncompiled, the seams hand plain tensors on (fused kernels read data pointers), summed right
    assert results["plain"] == {"all_reduce": ("Tensor", 3 * 32.0), "all_gather (dim 0)": ("Tensor", 3 * 6.0),
                                "modulation gather": ("Tensor", 3 * 8.0)}


def test_tp2_times_ulysses2_and_cfg_times_tp_match_one_process(checkpoints):
    cases = [(m, {"tp": 2, "ulysses": 2}, path) for m in MODELS for path in (None, checkpoints[m])]
    _check(4, cases + [("qwen-image-tiny", {"cfg": 2, "tp": 2}, None)])


@pytest.mark.gpu
def test_gpu_tp2_matches_one_gpu():
    """NCCL on two GPUs, bf16: within the lossless tolerance (bf16 sums in another order)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    _check(2, [(m, {"tp": 2}, None) for m in MODELS], backend="nccl", tol=2e-2)


@pytest.mark.gpu
def test_gpu_tp2_with_fused_kernels_compile_and_cuda_graph_matches_one_gpu():
    """The same, the TP-2 DiT with --fused-kernels (cuBLASLt GELU epilogue, split output
    projection: sharded weights through the same fused ops), regional compile, CUDA graph."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    _check(2, [(m, {"tp": 2}, None) for m in MODELS], backend="nccl", tol=2e-2, fast=True)


def test_layout_puts_tp_innermost():
    lay = Layout(cfg=2, ulysses=2, tp=2)
    assert lay.world == 8 and lay.describe() == "cfg 2 x ulysses 2 x tp 2"
    assert lay.coords(5) == {"cfg": 1, "ring": 0, "ulysses": 0, "sp": 0, "tp": 1}
    groups = lay.group_ranks()
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]  # neighbours
    assert groups["ulysses"] == [[0, 2], [1, 3], [4, 6], [5, 7]]  # same tp index, same tokens' heads
    assert groups["cfg"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    for dim, gs in groups.items():  # every rank in exactly one group of each dimension
        assert sorted(r for g in gs for r in g) == list(range(8)), dim


def test_synthetic_shard_is_the_slice_of_the_tiled_tensor():
    """fill_slice against the whole tensor that repeats a tile (as components.randomize_ fills
    tensors larger than its tile): column ranges of a row-parallel weight, row ranges of a fused
    Q/K/V, a zero bias."""
    tile = torch.arange(7, dtype=torch.float32) + 1
    whole = tile.repeat(-(-5 * 12 // 7))[: 5 * 12].view(5, 12)
    for dim, ranges in ((1, ((2, 2), (6, 4))), (0, ((1, 1), (3, 2))), (1, ((0, 12),))):
        shard = Shard((5, 12), dim, ranges)
        got = torch.empty(shard.shape)
        fill_slice(got, shard, tile, chunk=9)  # chunks of rows that do not divide the shape
        want = torch.cat([whole.narrow(dim, a, n) for a, n in ranges], dim=dim)
        assert torch.equal(got, want), (dim, ranges)
    bias = torch.ones(5)
    fill_slice(bias, Shard((5,), 0, ((0, 5),), zero=True), tile)
    assert not bias.any()


@pytest.mark.parametrize("model, flags, fragment", [
    ("z-image-turbo-tiny", {"num-gpus": 2, "tp-size": 2},
     "--tp-size 2 does not divide the width 85 of z-image-turbo-tiny's noise_refiner.w13"),
    ("flux-dev-tiny", {"num-gpus": 4, "tp-size": 4}, "--tp-size 4 does not divide flux-dev-tiny's 2 attention heads"),
    ("flux-dev-tiny", {"num-gpus": 4, "tp-size": 2, "ulysses-degree": 2},
     "--ulysses-degree 2 does not divide the 1 attention heads each of --tp-size 2 GPUs holds"),
    ("z-image-turbo", {"num-gpus": 4, "tp-size": 2, "ulysses-degree": 2},
     "--ulysses-degree 2 does not divide the 15 attention heads each of --tp-size 2 GPUs holds"),
])
def test_bad_tp_degrees_are_refused_in_one_line(model, flags, fragment):
    spec = get_spec(model)
    with pytest.raises(FlagError, match=fragment.replace("(", r"\(")) as e:
        validate_for_model(config_from_dict(flags), spec, spec.guidance)
    assert "\n" not in str(e.value)


def test_tp_counts_in_num_gpus_and_real_models_split():
    with pytest.raises(FlagError, match=r"x 1 \(ring\) x 2 \(tp\) = 4"):
        config_from_dict({"num-gpus": 2, "tp-size": 2, "ulysses-degree": 2})
    for model in ("flux-dev", "qwen-image", "z-image-turbo"):  # the real sizes split in two
        spec = get_spec(model)
        validate_for_model(config_from_dict({"num-gpus": 2, "tp-size": 2}), spec, spec.guidance)
    spec = get_spec("flux-dev")  # 24 heads: tp 2 x ulysses 2 too
    cfg = validate_for_model(config_from_dict({"num-gpus": 4, "tp-size": 2, "ulysses-degree": 2}), spec, spec.guidance)
    assert to_sglang_argv(cfg) == (["--num-gpus", "4", "--ulysses-degree", "2", "--tp-size", "2"], [])  # SGLang's names
    assert config_to_argv(cfg) == ["--num-gpus", "4", "--ulysses-degree", "2", "--tp-size", "2"]


def _dittune(*args, cwd):
    return subprocess.run([sys.executable, "-m", "dittune.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_tp2_matches_one_process_and_dumps_the_all_reduces(tmp_path):
    from dittune.engine.run import GenerateRequest, generate

    one = generate(GenerateRequest(model="flux-dev-tiny", device="cpu", steps=2, output=tmp_path / "one.png"))
    two = _dittune("generate", "--model", "flux-dev-tiny", "--device", "cpu", "--steps", "2", "--num-gpus", "2",
                   "--tp-size", "2", "--output", str(tmp_path / "two.png"), "--perf-dump-path", str(tmp_path / "two.json"),
                   cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    a, b = (np.asarray(Image.open(tmp_path / f), dtype=np.int32) for f in ("one.png", "two.png"))
    assert np.abs(a - b).max() <= 1
    dump = json.loads((tmp_path / "two.json").read_text())
    par = dump["parallel"]
    assert par["layout"] == {"world_size": 2, "cfg": 1, "ulysses": 1, "ring": 1, "tp": 2, "describe": "tp 2"}
    assert [r["tp"] for r in par["ranks"]] == [0, 1]
    # flux-dev-tiny at 128x128: 64 image + 32 text tokens of width 32, fp32; a ring all-reduce over
    # 2 ranks sends each rank's whole tensor once: the double block reduces its attention and MLP
    # outputs (each over both streams' 96 tokens), the single block its one output projection.
    # The packed modulations (double 12 x 32, single 3 x 32, final 2 x 32) are one all-gather of
    # each rank's half.
    for r in par["ranks"]:
        c = r["collectives_per_step"]
        assert c["tensor_parallel_bytes"] == 3 * (64 + 32) * 32 * 4 + 17 * 32 // 2 * 4 and c["attention_bytes"] == 0
    m = dump["manifest"]
    assert m["tensor_parallel_linears"] == 15 and m["flags"]["tp-size"] == 2 and m["modulation"] == "packed"
    assert m["parameters"]["dit"] < one.dump["manifest"]["parameters"]["dit"]
