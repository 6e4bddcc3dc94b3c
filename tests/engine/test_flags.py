import dataclasses

import pytest

from dittune.engine import flags as F
from dittune.engine.errors import FlagError


def _non_default_value(f: F.Flag):
    if f.type is bool:
        return not f.default
    if f.choices:
        return next(c for c in f.choices if c != f.default)
    return f.default + (3 if f.type is int else 2.5)


def _config_with(f: F.Flag, value):
    """A valid config where `f` is active and set to `value` (parents switched on)."""
    values = {f.name: value}
    parent = f.requires
    while parent:
        values[parent] = True
        parent = F.FLAG_BY_NAME[parent].requires
    if f.name == "pin-cpu-memory" and value is False:
        values["vae-cpu-offload"] = True
    if f.multi_gpu:  # a layout whose degrees multiply to --num-gpus
        if f.name == "num-gpus":
            values["ulysses-degree"] = value
        elif f.name == "enable-cfg-parallel":
            values["num-gpus"] = 2 if value else 1
        else:
            values["num-gpus"] = value
    return F.config_from_dict(values)


@pytest.mark.parametrize("flag", F.FLAGS, ids=lambda f: f.name)
def test_argv_round_trip_every_flag(flag):
    cfg = _config_with(flag, _non_default_value(flag))
    argv = F.config_to_argv(cfg)
    assert flag.option in argv or f"--no-{flag.name}" in argv
    assert F.config_from_argv(argv) == cfg
    assert F.config_to_argv(F.config_from_argv(argv)) == argv


@pytest.mark.parametrize("flag", [f for f in F.FLAGS if f.choices], ids=lambda f: f.name)
def test_every_choice_round_trips(flag):
    for choice in flag.choices:
        cfg = _config_with(flag, choice)
        assert getattr(F.config_from_argv(F.config_to_argv(cfg)), flag.attr) == choice


def test_default_config_renders_empty_and_argv_is_in_registry_order():
    assert F.config_to_argv(F.EngineConfig()) == []
    cfg = F.config_from_dict({
        "vae-cpu-offload": True, "attention-backend": "torch_cudnn_sdpa", "enable-torch-compile": True,
        "dit-layerwise-offload": True, "dit-resident-layers": 4,
    })
    argv = F.config_to_argv(cfg)
    opts = [a for a in argv if a.startswith("--")]
    order = [f.option for f in F.FLAGS]
    assert opts == sorted(opts, key=order.index)
    assert argv == ["--attention-backend", "torch_cudnn_sdpa", "--enable-torch-compile", "--vae-cpu-offload",
                    "--dit-layerwise-offload", "--dit-resident-layers", "4"]


def test_argv_forms():
    a = F.config_from_argv(["--attention-backend=torch_flash_sdpa", "--dit-layerwise-offload", "--dit-offload-prefetch-size", "0.25"])
    assert a.attention_backend == "torch_flash_sdpa" and a.dit_offload_prefetch_size == 0.25
    assert F.config_to_argv(a)[-2:] == ["--dit-offload-prefetch-size", "0.25"]


@pytest.mark.parametrize("argv, fragment", [
    (["--attention-backend", "xformers"], "not one of"),
    (["--dit-layerwise-offload", "--dit-resident-layers", "-1"], "below the minimum"),
    (["--dit-layerwise-offload", "--dit-resident-layers", "two"], "not a valid int"),
    (["--dit-layerwise-offload", "--dit-offload-prefetch-size", "nan"], "finite"),
    (["--no-such-flag"], "unknown flag"),
    (["--attention-backend"], "needs a value"),
    (["stray"], "unexpected argument"),
    (["--no-fused-kernels=1"], "takes no value"),
])
def test_bad_values_are_flag_errors(argv, fragment):
    with pytest.raises(FlagError, match=fragment):
        F.config_from_argv(argv)


@pytest.mark.parametrize("flag", [f for f in F.FLAGS if f.requires], ids=lambda f: f.name)
def test_inactive_flag_set_without_parent_is_rejected(flag):
    with pytest.raises(FlagError, match=f"--{flag.requires}"):
        F.config_from_dict({flag.name: _non_default_value(flag)})


BAD_AND_GOOD = {
    "layerwise-excludes-dit-cpu-offload": (
        {"dit-layerwise-offload": True, "dit-cpu-offload": True},
        {"dit-layerwise-offload": True, "text-encoder-cpu-offload": True},
    ),
    "full-compile-excludes-layerwise": (
        {"enable-torch-compile": True, "compile-scope": "full", "dit-layerwise-offload": True},
        {"enable-torch-compile": True, "compile-scope": "regional", "dit-layerwise-offload": True},
    ),
    "cuda-graph-needs-resident-dit": (
        {"enable-cuda-graph": True, "dit-layerwise-offload": True},
        {"enable-cuda-graph": True, "text-encoder-cpu-offload": True, "vae-cpu-offload": True},
    ),
    "num-gpus-is-layout-product": (
        {"num-gpus": 2},
        {"num-gpus": 4, "ulysses-degree": 2, "enable-cfg-parallel": True},
    ),
    "ring-needs-torch-attention": (
        {"num-gpus": 2, "ring-degree": 2, "attention-backend": "fa"},
        {"num-gpus": 2, "ring-degree": 2, "attention-backend": "torch_cudnn_sdpa"},
    ),
    "multi-gpu-excludes-dit-offload": (
        {"num-gpus": 2, "ulysses-degree": 2, "dit-layerwise-offload": True},
        {"num-gpus": 2, "ulysses-degree": 2, "text-encoder-cpu-offload": True, "vae-cpu-offload": True},
    ),
    "unpinned-needs-offload": (
        {"pin-cpu-memory": False},
        {"pin-cpu-memory": False, "dit-cpu-offload": True},
    ),
}


def test_every_constraint_has_a_case():
    assert set(BAD_AND_GOOD) == {c.name for c in F.CONSTRAINTS}


@pytest.mark.parametrize("name", sorted(BAD_AND_GOOD))
def test_constraint_rejects_bad_accepts_good(name):
    bad, good = BAD_AND_GOOD[name]
    c = next(c for c in F.CONSTRAINTS if c.name == name)
    with pytest.raises(FlagError) as e:
        F.config_from_dict(bad)
    assert str(e.value) == (c.message(F.EngineConfig(**{F.FLAG_BY_NAME[k].attr: v for k, v in bad.items()}))
                            if callable(c.message) else c.message)
    F.config_from_dict(good)


def test_validate_catches_hand_built_configs():
    with pytest.raises(FlagError):
        F.validate(F.EngineConfig(attention_backend="nope"))
    with pytest.raises(FlagError):
        F.validate(dataclasses.replace(F.EngineConfig(), dit_cpu_offload=True, dit_layerwise_offload=True))


def test_parse_fix():
    assert F.parse_fix(["attention-backend=torch_cudnn_sdpa", "enable-torch-compile=true", "dit-resident-layers=3"]) == {
        "attention-backend": "torch_cudnn_sdpa", "enable-torch-compile": True, "dit-resident-layers": 3}
    for bad, frag in [("nonsense", "expected flag=value"), ("=1", "expected flag=value"),
                      ("warp-speed=1", "unknown flag"), ("enable-torch-compile=maybe", "not a boolean")]:
        with pytest.raises(FlagError, match=frag):
            F.parse_fix([bad])


def test_lossless():
    assert F.is_lossless(F.EngineConfig())
    assert not F.is_lossless(F.config_from_dict({"attention-backend": "sage_attn"}))
    assert not F.is_lossless(F.config_from_dict({"vae-precision": "bf16"}))


def test_registry_hash_is_stable_and_sensitive(monkeypatch):
    h = F.registry_hash()
    assert h == F.registry_hash() and len(h) == 16
    changed = F.FLAGS[:-1] + (dataclasses.replace(F.FLAGS[-1], choices=("fp32", "bf16", "fp16")),)
    monkeypatch.setattr(F, "FLAGS", changed)
    assert F.registry_hash() != h


def test_sglang_translation_names_what_has_no_equivalent():
    cfg = F.config_from_dict({"attention-backend": "torch_cudnn_sdpa", "enable-torch-compile": True,
                              "dit-layerwise-offload": True, "dit-resident-layers": 8, "dit-offload-prefetch-size": 2})
    argv, missing = F.to_sglang_argv(cfg)
    assert argv == ["--enable-torch-compile", "--dit-layerwise-offload", "--dit-offload-prefetch-size", "2"]
    assert missing == ["--attention-backend", "torch_cudnn_sdpa", "--dit-resident-layers", "8"]
    argv, missing = F.to_sglang_argv(F.config_from_dict({"attention-backend": "sage_attn"}))
    assert argv == ["--attention-backend", "sage_attn"] and missing == []


def test_layout_product_message_names_the_degrees():
    with pytest.raises(FlagError, match=r"--num-gpus 4 must equal .* 2 \(cfg parallel\) x 1 \(ulysses\) x 1 \(ring\) x 1 \(tp\) = 2"):
        F.config_from_argv(["--num-gpus", "4", "--enable-cfg-parallel"])


@pytest.mark.parametrize("model, guidance, argv, fragment", [
    ("z-image-turbo", 0.0, ["--num-gpus", "4", "--ulysses-degree", "4"], "does not divide z-image-turbo's 30 attention heads"),
    ("flux-dev", 3.5, ["--num-gpus", "2", "--enable-cfg-parallel"], "flux-dev has none"),
    ("z-image-turbo", 0.0, ["--num-gpus", "2", "--enable-cfg-parallel"], "only with --guidance > 0"),
    ("qwen-image", 1.0, ["--num-gpus", "2", "--enable-cfg-parallel"], "only with --guidance > 1"),
])
def test_model_constraints_refuse_layouts(model, guidance, argv, fragment):
    from dittune.engine.models import get_spec

    with pytest.raises(FlagError, match=fragment):
        F.validate_for_model(F.config_from_argv(argv), get_spec(model), guidance)


@pytest.mark.parametrize("model, guidance, argv", [
    ("z-image-turbo", 0.0, ["--num-gpus", "2", "--ulysses-degree", "2"]),
    ("z-image-turbo", 1.5, ["--num-gpus", "4", "--enable-cfg-parallel", "--ulysses-degree", "2"]),
    ("z-image-turbo", 0.0, ["--num-gpus", "4", "--ring-degree", "4"]),
    ("qwen-image", 4.0, ["--num-gpus", "2", "--enable-cfg-parallel"]),
    ("flux-dev", 3.5, ["--num-gpus", "8", "--ulysses-degree", "8"]),
])
def test_model_constraints_accept_valid_layouts(model, guidance, argv):
    from dittune.engine.models import get_spec

    F.validate_for_model(F.config_from_argv(argv), get_spec(model), guidance)


def test_layout_flags_translate_to_sglang():
    argv, missing = F.to_sglang_argv(F.config_from_argv(["--num-gpus", "4", "--enable-cfg-parallel", "--ulysses-degree", "2"]))
    assert argv == ["--num-gpus", "4", "--ulysses-degree", "2", "--enable-cfg-parallel"] and missing == []
