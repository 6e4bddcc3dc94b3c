"""The GPU pool: trials side by side on a study's GPUs, each child pinned to its GPU by UUID (or
PCI bus order), finalists confirmed alone. Driven against the fake engine on pretend H100s."""

import os
import subprocess
import sys
import time

import pytest
import torch

from dittune import db as D
from dittune.engine import flags as F
from dittune.engine.gpu import Detection, GpuInfo
from dittune.tuner import TuneOptions, TunerError, tune
from dittune.tuner.pool import GpuPool, choose, cpu_shares, host_bound, parse_gpus, visible_devices

import fake_engine
from test_study import ALL_BACKENDS, FAKE, GiB

H100S = tuple(GpuInfo(i, "NVIDIA H100 80GB HBM3", 80 * GiB, 79 * GiB, "580.65", (9, 0), 4,
                      f"GPU-{i}aaaaaaa-0000-0000-0000-00000000000{i}", f"00000000:{0x19 + i:02X}:00.0") for i in range(4))


def pretend_h100s(monkeypatch, gpus=H100S):
    import dittune.engine.pipeline as pipeline
    import dittune.tuner.study as study

    monkeypatch.setattr(study, "detect", lambda: Detection(tuple(gpus)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pipeline, "supported_values", lambda device: {"attention-backend": ALL_BACKENDS})


def optimum_on(gpus: int) -> tuple[float, dict, int]:
    """The fake engine's fastest configuration among every layout and flag on `gpus` GPUs."""
    from dittune.engine import flags as F
    from dittune.engine.models import get_family
    from dittune.tuner.presets import load_preset
    from dittune.tuner.space import build_space

    spec = get_family("flux-dev").spec
    preset = load_preset(spec)
    space = build_space({"attention-backend": ALL_BACKENDS}, preset.space, {}, False, 57, gpu_count=gpus,
                        check=lambda c: F.validate_for_model(c, spec, preset.guidance))
    # the fake engine's latency falls as resident layers rise: each integer range at its top only
    dims = tuple(type(d)(d.flag, d.values[-1:]) if d.ordinal else d for d in space.dims)
    best = min(((fake_engine.cost(F.config_to_dict(c))[0], F.config_to_dict(c)) for c in space.configs(dims)),
               key=lambda x: x[0])
    return best[0], best[1], space.size()


def test_four_gpus_run_trials_side_by_side_and_find_the_optimum(tmp_path, monkeypatch):
    pretend_h100s(monkeypatch)
    # Long enough that a single-GPU trial outlasts one round of the loop (database reads, a TPE ask)
    # even on a loaded two-core CI machine, where 1 s trials were seen to run one after another.
    monkeypatch.setenv("FAKE_ENGINE_SLEEP", "2.5")
    url = f"sqlite:///{tmp_path / 't.db'}"
    said = []
    t0 = time.time()
    res = tune(TuneOptions("flux-dev", trials=30, db_url=url, worker_cmd=FAKE, seed=0, confirm=2, patience=100,
                           objective="latency"), log=said.append)
    wall = time.time() - t0
    best, flags, size = optimum_on(4)
    assert size > 2000 and flags["num-gpus"] == 4  # layouts and flags together; the fastest uses every GPU
    assert res.measured == 30
    assert res.winner.latency_s <= best * 1.03, (res.winner.latency_s, best)
    assert res.winner.flags["num-gpus"] == 4
    rows = D.trials(D.open_db(url), study_name=res.study)
    done = [t for t in rows if t.status == "complete"]
    assert len({t.argv for t in done}) == 30  # side by side, still none measured twice
    uuids = {g.uuid for g in H100S}
    share = dict(zip((g.uuid for g in H100S), cpu_shares(4)))
    for t in done:  # each child saw exactly the GPUs its layout needs, by UUID, and their cores
        seen = t.manifest["cuda_visible_devices"].split(",")
        assert len(seen) == t.flags["num-gpus"] == len(set(seen)) and set(seen) <= uuids and t.manifest["device"] == "cuda"
        assert t.manifest["cpus"] == ",".join(str(c) for c in sorted({c for u in seen for c in share[u]}))
    assert {t.flags["num-gpus"] for t in done} >= {1, 4}  # single-GPU trials and layouts in one study
    spans = sorted(t.manifest["ran"] for t in done)
    wide = [t.manifest["ran"] for t in done if t.flags["num-gpus"] == 4]
    for a, b in wide:  # a trial holding every GPU ran alone
        assert sum(1 for x, y in spans if x < b and a < y) == 1
    overlapping = max(sum(1 for a, b in spans if a <= s < b) for s, _ in spans)
    assert overlapping >= 2  # trials really ran at the same time...
    for i, t in enumerate(done):  # ...and never two on one GPU
        for u in done[i + 1:]:
            (a, b), (x, y) = t.manifest["ran"], u.manifest["ran"]
            if x < b and a < y:
                assert set(t.manifest["cuda_visible_devices"].split(",")).isdisjoint(u.manifest["cuda_visible_devices"].split(","))
    streamed = [t.manifest["ran"] for t in done if host_bound(F.config_from_dict(t.flags))]
    for i, (a, b) in enumerate(streamed):  # trials streaming from (or building in) host memory: one at a time
        assert not any(x < b and a < y for x, y in streamed[i + 1:])
    confirmed = [t for t in rows if t.status == "confirmed"]
    assert len(confirmed) == 2
    for c in confirmed:  # confirmed alone, on every core: no other trial ran while its runs did
        assert c.manifest["cpus"] is None
        a, b = c.manifest["ran"]
        assert not any(x < b and a < y for x, y in spans)
    assert any(m.startswith("4 GPUs, trials side by side:") for m in said)
    print(f"4 pretend GPUs, 30 trials of 1 s side by side: {wall:.1f} s wall (30 s of trials), "
          f"{overlapping} at once at most, {len(streamed)} streamed one at a time; winner {res.winner.argv}")


def test_gpus_choose_a_subset_and_a_single_gpu_runs_one_at_a_time(tmp_path, monkeypatch):
    pretend_h100s(monkeypatch)
    url = f"sqlite:///{tmp_path / 't.db'}"
    res = tune(TuneOptions("flux-dev", trials=4, db_url=url, worker_cmd=FAKE, confirm=0, patience=100, gpus=(2,)),
               log=lambda m: None)
    rows = D.trials(D.open_db(url), study_name=res.study)
    assert {t.manifest["cuda_visible_devices"] for t in rows if t.status == "complete"} == {H100S[2].uuid}
    assert all(t.flags["num-gpus"] == 1 for t in rows)  # one GPU: no layouts in the space


def test_trials_streaming_the_dit_from_host_memory_never_run_side_by_side(tmp_path, monkeypatch):
    """Streamed trials slow each other down (host memory, PCIe): on two GPUs, every trial
    streamed, they run one after another although a GPU is free."""
    pretend_h100s(monkeypatch, H100S[:2])
    monkeypatch.setenv("FAKE_ENGINE_SLEEP", "1.5")
    url = f"sqlite:///{tmp_path / 't.db'}"
    res = tune(TuneOptions("flux-dev", trials=4, db_url=url, worker_cmd=FAKE, confirm=0, patience=100, gpus=(0, 1),
                           max_gpus_per_trial=1, fix=("dit-layerwise-offload=true",)), log=lambda m: None)
    done = [t for t in D.trials(D.open_db(url), study_name=res.study) if t.status == "complete"]
    assert len(done) == 4 and all(t.flags["dit-layerwise-offload"] for t in done)
    spans = sorted(t.manifest["ran"] for t in done)
    assert all(b <= x for (_, b), (x, _) in zip(spans, spans[1:])), spans


def test_a_host_bound_trial_waits_in_a_thread_while_the_loop_fills_the_free_gpu(tmp_path, monkeypatch):
    """Two GPUs, most configurations host-bound: a host-bound trial asked while another holds the
    host's slot waits in a thread (said), host-bound trials never overlap, the free GPU still gets
    GPU-bound trials meanwhile, and nothing is lost or measured twice."""
    from dittune.tuner import study as S

    pretend_h100s(monkeypatch, H100S[:2])
    monkeypatch.setenv("FAKE_ENGINE_SLEEP", "1.5")
    bound = lambda cfg: cfg.attention_backend != "torch_cudnn_sdpa" or cfg.fused_kernels  # noqa: E731
    monkeypatch.setattr(S, "host_bound", bound)
    url = f"sqlite:///{tmp_path / 't.db'}"
    said = []
    res = tune(TuneOptions("flux-dev", trials=10, db_url=url, worker_cmd=FAKE, confirm=0, patience=100, gpus=(0, 1),
                           max_gpus_per_trial=1, seed=1, objective="latency"), log=said.append)
    done = [t for t in D.trials(D.open_db(url), study_name=res.study) if t.status == "complete"]
    assert res.measured == 10 and len({t.argv for t in done}) == 10
    hb = sorted(t.manifest["ran"] for t in done if bound(F.config_from_dict(t.flags)))
    gb = [t.manifest["ran"] for t in done if not bound(F.config_from_dict(t.flags))]
    assert all(b <= x for (_, b), (x, _) in zip(hb, hb[1:])), hb  # one host-bound trial at a time
    assert any("waits for the host's streaming slot" in m for m in said)
    assert gb and any(x < b and a < y for a, b in hb for x, y in gb)  # GPU-bound trials ran beside them


def test_visible_devices_by_uuid_else_pci_bus_order():
    assert visible_devices([H100S[1]], H100S) == {"CUDA_VISIBLE_DEVICES": H100S[1].uuid}
    # NVML's order differs from the PCI bus order CUDA enumerates by: the bus decides
    a = GpuInfo(0, "X", GiB, GiB, "1", (9, 0), 3, "", "00000000:C1:00.0")
    b = GpuInfo(1, "X", GiB, GiB, "1", (9, 0), 3, "", "00000000:19:00.0")
    c = GpuInfo(2, "X", GiB, GiB, "1", (9, 0), 3, "", "00000000:41:00.0")
    assert visible_devices([a], [a, b, c]) == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "2"}
    assert visible_devices([b, c], [a, b, c])["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_each_gpu_owns_a_share_of_the_cores():
    assert cpu_shares(2, range(32)) == [tuple(range(16)), tuple(range(16, 32))]
    assert cpu_shares(3, [0, 1, 2, 3, 4]) == [(0, 1), (2, 3), (4,)]
    assert cpu_shares(4, [0, 1]) == [(0,), (1,), (0,), (1,)]  # fewer cores than GPUs: shared round robin
    pool = GpuPool(H100S)
    shares = cpu_shares(4)
    assert pool.env(H100S[1:2])["DITTUNE_CPUS"] == ",".join(map(str, shares[1]))
    assert pool.env(H100S[:2])["DITTUNE_CPUS"] == ",".join(map(str, sorted(set(shares[0] + shares[1]))))
    assert "DITTUNE_CPUS" not in pool.env(H100S[:1], cpus=False)  # confirmation: alone, every core
    assert "DITTUNE_CPUS" not in GpuPool(H100S[:1]).env(H100S[:1])  # one GPU: nothing beside it


def test_a_worker_binds_to_its_share_and_a_bad_share_is_a_warning(tmp_path):
    code = ("import os, torch; from dittune.tuner.worker import bind_cpus; bind_cpus(os.environ['DITTUNE_CPUS']); "
            "print(sorted(os.sched_getaffinity(0)), torch.get_num_threads())")
    one = min(os.sched_getaffinity(0))
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, DITTUNE_CPUS=str(one)),
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == [f"[{one}]", "1"]
    bad = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, DITTUNE_CPUS="9999"),
                         capture_output=True, text=True, check=True)
    assert "DITTUNE_CPUS='9999' not applied" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_pool_hands_out_each_gpu_once():
    pool = GpuPool(H100S)
    first = pool.take(3)
    assert len({g.index for g in first}) == 3 and pool.free() == 1
    with pytest.raises(TunerError, match="needs 5 GPUs"):
        pool.take(5)
    pool.give(first[:1])
    second = pool.take(2)
    assert {g.index for g in second}.isdisjoint({g.index for g in first[1:]})


def test_bad_gpu_requests_are_one_line_errors():
    assert parse_gpus(None) is None and parse_gpus("all") is None and parse_gpus("0,2") == (0, 2)
    for text, frag in [("0,x", "NVML indices"), ("1,1", "each index once"), ("-1", "none negative")]:
        with pytest.raises(TunerError, match=frag):
            parse_gpus(text)
    with pytest.raises(TunerError, match="no GPU 7 here"):
        choose(H100S, (7,))
    l40 = GpuInfo(4, "NVIDIA L40S", 48 * GiB, 47 * GiB, "580.65", (8, 9), 5, "GPU-l40", "")
    with pytest.raises(TunerError, match="different kinds"):
        choose((*H100S, l40), (0, 4))


def test_wide_seeds_follow_the_single_gpu_seeds_with_cfg_parallel_where_the_workload_has_true_cfg(monkeypatch):
    import optuna

    import dittune.tuner.study as study
    from dittune.tuner import seeds

    pretend_h100s(monkeypatch, H100S[:2])
    fix = ("attention-backend=torch_cudnn_sdpa", "enable-torch-compile=true", "fused-kernels=true", "enable-cuda-graph=true")
    layouts = {}
    for model in ("qwen-image", "flux-dev"):
        st = optuna.create_study()
        seeds.enqueue_seeds(st, study._setup(TuneOptions(model, fix=fix)))
        fixed = [t.system_attrs["fixed_params"] for t in st.trials]  # enqueued: not asked yet
        layouts[model] = [(p.get("enable-cfg-parallel", False), p["ulysses-degree"], p["ring-degree"], p.get("tp-size", 1))
                          for p in fixed]
    # the fixes fold the preset's seeds into one single-GPU configuration; its wide forms follow:
    # CFG parallel, sequence parallel, tensor parallel
    assert layouts["qwen-image"] == [(False, 1, 1, 1), (True, 1, 1, 1), (False, 2, 1, 1), (False, 1, 1, 2)]
    assert layouts["flux-dev"] == [(False, 1, 1, 1), (False, 2, 1, 1), (False, 1, 1, 2)]  # FLUX.1-dev has no true CFG
