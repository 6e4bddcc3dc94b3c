"""Tensor parallel (engine/parallel/tensor.py) on gloo: TP-2 and TP-2 x Ulysses-2 of each tiny DiT
(4 heads) against one process, fp32, from synthetic weights and from a diffusers checkpoint the
test writes; each rank holds only its share; the flag's refusals; the CLI end to end. Ranks run
tests/engine/tensor_ranks.py."""

from __future__ import annotations

import dataclasses
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
from dittune.engine.flags import config_from_dict, validate_for_model
from dittune.engine.models import get_spec
from dittune.engine.parallel import launch
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


def _check_dits(world, cases):
    results = launch.run(world, "tensor_ranks:check_dits", {"cases": cases}, "gloo")
    assert len(results) == world
    for rank_rows in results:
        assert len(rank_rows) == len(cases)
        for model, lay, weights, err, scale, held_x_tp, whole_split, held, whole, n_attn in rank_rows:
            case = (model, lay, weights)
            assert err <= TOL * max(1.0, scale), (case, err)
            assert whole_split > 0 and held_x_tp == whole_split, case  # each split tensor: exactly 1/tp of it
            assert held == whole - whole_split + whole_split // lay["tp"], case  # the rest is whole
            assert (n_attn > 0) == (lay.get("ulysses", 1) > 1), case


def test_tp2_matches_one_process_synthetic_and_checkpoint(checkpoints):
    cases = [(m, {"tp": 2}, path) for m in MODELS for path in (None, checkpoints[m])]
    _check_dits(2, cases)


def test_tp2_times_ulysses2_matches_one_process_synthetic_and_checkpoint(checkpoints):
    cases = [(m, {"tp": 2, "ulysses": 2}, path) for m in MODELS for path in (None, checkpoints[m])]
    _check_dits(4, cases)
