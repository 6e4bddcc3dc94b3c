"""The tuner's search, pruning, constraints and resume, driven against a fake engine whose
latency and memory are known functions of the flags (tests/tuner/fake_engine.py)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from dittune import db as D
from dittune.engine import flags as F
from dittune.engine.gpu import Detection, GpuInfo
from dittune.tuner import TuneOptions, TunerError, tune
from dittune.tuner.space import build_space

import fake_engine

HERE = Path(__file__).parent
FAKE = (sys.executable, str(HERE / "fake_engine.py"))
GiB = 2**30
H100 = GpuInfo(0, "NVIDIA H100 80GB HBM3", 80 * GiB, 79 * GiB, "580.65", (9, 0), 1)
ALL_BACKENDS = ("torch_sdpa", "torch_cudnn_sdpa", "torch_flash_sdpa", "torch_efficient_sdpa")


def pretend_h100(monkeypatch):
    """The tuner sees an H100 whose engine supports every flag (the fake engine answers)."""
    import dittune.engine.pipeline as pipeline
    import dittune.tuner.study as study

    monkeypatch.setattr(study, "detect", lambda: Detection((H100,)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pipeline, "supported_values", lambda device: {"attention-backend": ALL_BACKENDS})


def optimum(budget=None):
    """The fake engine's fastest configuration within `budget` among those the memory model lets
    through (the search is tested here, the memory model against real measurements)."""
    from dittune.tuner import memory

    from dittune.engine.models import get_family
    from dittune.tuner.presets import load_preset

    space = build_space({"attention-backend": ALL_BACKENDS}, load_preset(get_family("flux-dev").spec).space, {}, False, 57)
    best = None
    for c in space.configs():
        lat, peak = fake_engine.cost(F.config_to_dict(c))
        if budget is not None and (peak > budget or memory.over_budget(
                memory.predict_peak_bytes("flux-dev", c, 1024, 1024), budget)):
            continue
        best = lat if best is None else min(best, lat)
    return best, space.size()


@pytest.mark.parametrize("objective, trials, within", [("latency", 30, 1.03), ("frontier", 60, 1.05)])
def test_finds_the_optimum_within_the_trial_budget(tmp_path, monkeypatch, objective, trials, within):
    pretend_h100(monkeypatch)
    url = f"sqlite:///{tmp_path / 't.db'}"
    res = tune(TuneOptions("flux-dev", trials=trials, db_url=url, worker_cmd=FAKE, seed=0, confirm=2, patience=100,
                           objective=objective), log=lambda m: None)
    best, size = optimum()
    assert size > 500  # a real search, not an enumeration
    assert res.winner.latency_s <= best * within, (res.winner.latency_s, best)
    assert res.measured == trials
    rows = D.trials(D.open_db(url), study_name=res.study)
    for t in rows:  # nothing that violates a registry constraint was ever stored, let alone run
        F.config_from_dict(t.flags)
    assert any(t.status == "confirmed" for t in rows)
    # a frontier: strictly decreasing VRAM as latency grows
    peaks = [r.peak_vram_bytes for r in res.frontier]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == len(peaks)


def test_budget_prunes_without_running_and_result_fits(tmp_path, monkeypatch):
    pretend_h100(monkeypatch)
    url = f"sqlite:///{tmp_path / 't.db'}"
    res = tune(TuneOptions("flux-dev", vram_budget="24GiB", trials=30, db_url=url, worker_cmd=FAKE, confirm=1, patience=30),
               log=lambda m: None)
    assert res.budget_bytes == 24 * GiB
    assert res.winner.peak_vram_bytes <= 24 * GiB
    rows = D.trials(D.open_db(url), study_name=res.study)
    pruned = [t for t in rows if t.status == "pruned"]
    assert pruned and all("memory model predicts" in t.reason or "already ran out" in t.reason for t in pruned)
    assert all(t.latency_s is None for t in pruned)
    best, _ = optimum(budget=24 * GiB)
    assert res.winner.latency_s <= best * 1.10  # seeds repaired to fit the budget start the search inside it
    # the default (fully resident) configuration was predicted far over 24 GiB and never launched
    assert not any(t.argv == "" and t.status == "complete" for t in rows)


def test_oom_ends_the_trial_not_the_study(tmp_path, monkeypatch):
    pretend_h100(monkeypatch)
    url = f"sqlite:///{tmp_path / 't.db'}"
    # 35 GiB, DiT resident: the memory model lets the 38 GiB configurations (text encoders resident;
    # predicted 39.5 GiB with the CUDA context) through within its 15% margin... they OOM; with the
    # text encoders offloaded they fit
    res = tune(TuneOptions("flux-dev", vram_budget="35GiB", trials=10, db_url=url, worker_cmd=FAKE, confirm=0, patience=30,
                           fix=("attention-backend=torch_cudnn_sdpa", "dit-layerwise-offload=false", "dit-cpu-offload=false")),
               log=lambda m: None)
    rows = D.trials(D.open_db(url), study_name=res.study)
    assert any(t.status == "oom" and "out of memory" in t.reason for t in rows)
    assert res.measured == 10 and res.winner.peak_vram_bytes <= 35 * GiB
    assert all(t.flags["attention-backend"] == "torch_cudnn_sdpa" for t in rows)


def test_bad_requests_fail_before_touching_the_database(tmp_path, monkeypatch):
    pretend_h100(monkeypatch)
    p = tmp_path / "t.db"
    for opts, frag in [
        (dict(fix=("warp=1",)), "unknown flag"),
        (dict(fix=("attention-backend=fa",)), "cannot run on this machine"),
        (dict(fix=("attention-backend=sage_attn",)), "cannot run on this machine"),
        (dict(fix=("dit-layerwise-offload=true", "dit-cpu-offload=true")), "search space is empty"),
        (dict(vram_budget="lots"), "malformed VRAM budget"),
        (dict(vram_budget="200GiB"), "exceeds"),
        (dict(width=1000), "multiple of 16"),
        (dict(trials=0), "at least one trial"),
        (dict(objective="speed"), "--objective"),
    ]:
        with pytest.raises(Exception) as e:
            tune(TuneOptions("flux-dev", db_url=f"sqlite:///{p}", worker_cmd=FAKE, **opts))
        assert frag in str(e.value), (opts, str(e.value))
        assert not p.exists()
    with pytest.raises(Exception, match="unknown model"):
        tune(TuneOptions("flux-ultra", db_url=f"sqlite:///{p}"))


def test_lossy_needs_allow_lossy(monkeypatch):
    space = build_space({"attention-backend": (*ALL_BACKENDS, "sage_attn")}, {}, {}, False, 57)
    backends = next(d.values for d in space.dims if d.flag.name == "attention-backend")
    assert "sage_attn" not in backends
    space = build_space({"attention-backend": (*ALL_BACKENDS, "sage_attn")}, {}, {}, True, 57)
    assert "sage_attn" in next(d.values for d in space.dims if d.flag.name == "attention-backend")
    with pytest.raises(TunerError, match="lossy"):
        build_space({"attention-backend": (*ALL_BACKENDS, "sage_attn")}, {}, {"attention-backend": "sage_attn"}, False, 57)


DRIVER = textwrap.dedent("""
    import signal, sys
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even when pytest runs in the background
    sys.path.insert(0, {here!r})
    import pytest
    from test_study import pretend_h100, FAKE
    from dittune.tuner import TuneOptions, tune
    mp = pytest.MonkeyPatch()
    pretend_h100(mp)
    tune(TuneOptions("flux-dev", trials=12, db_url={url!r}, worker_cmd=FAKE, confirm=0, patience=100, seed=3), log=print)
""")


def test_sigkill_mid_study_loses_nothing_and_resume_finishes(tmp_path):
    url = f"sqlite:///{tmp_path / 't.db'}"
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(here=str(HERE), url=url))
    env = dict(os.environ, FAKE_ENGINE_SLEEP="0.4")
    p = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    seen = 0
    deadline = time.time() + 120
    while seen < 4 and time.time() < deadline:  # let a few trials complete, then kill it mid-trial
        line = p.stdout.readline()
        if line.startswith("trial "):
            seen += 1
    time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert seen >= 4
    db = D.open_db(url)
    before = {t.id: (t.argv, t.latency_s) for t in D.trials(db) if t.status == "complete"}
    assert len(before) >= 4
    db.dispose()

    done = subprocess.run([sys.executable, str(script)], env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    db = D.open_db(url)
    after = {t.id: (t.argv, t.latency_s) for t in D.trials(db) if t.status == "complete"}
    assert all(after[i] == v for i, v in before.items())  # nothing completed was lost or rewritten
    assert len(after) == 12  # and the study finished its 12 measured trials
    assert len({a for a, _ in after.values()}) == 12  # no configuration was run twice
    import optuna

    study = optuna.load_study(study_name=D.studies(db)[0].name, storage=url)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_stops_cleanly_and_keeps_what_was_measured(tmp_path, sig):
    """Ctrl-C, and SIGTERM (what `timeout` and batch systems send), end the study cleanly."""
    url = f"sqlite:///{tmp_path / 't.db'}"
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(here=str(HERE), url=url) + "print('RETURNED')\n")
    mark = f"DITTUNE_TEST_MARK={tmp_path.name}"  # inherited by every process this study starts
    env = dict(os.environ, FAKE_ENGINE_SLEEP="1.0", DITTUNE_TEST_MARK=tmp_path.name)
    p = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True)
    seen = 0
    deadline = time.time() + 120
    while seen < 2 and time.time() < deadline:
        if p.stdout.readline().startswith("trial "):
            seen += 1
    time.sleep(0.3)  # a trial's worker is running now
    p.send_signal(sig)  # the orchestrator only, as a terminal's Ctrl-C reaches it
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0 and "RETURNED" in out
    db = D.open_db(url)
    assert 2 <= len([t for t in D.trials(db) if t.status == "complete"]) < 12  # stopped early, kept what it measured
    import optuna

    study = optuna.load_study(study_name=D.studies(db)[0].name, storage=url)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    # no worker left behind: no process this study started still runs (other tests' may, in parallel)
    left = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if mark.encode() in environ.read_bytes().split(b"\0"):
                left.append(environ.parent.name)
        except OSError:
            pass
    assert not left


def test_trial_timeout_kills_the_worker_group_and_records_it(tmp_path, monkeypatch):
    pretend_h100(monkeypatch)
    monkeypatch.setenv("FAKE_ENGINE_SLEEP", "30")
    url = f"sqlite:///{tmp_path / 't.db'}"
    t = time.time()
    res = tune(TuneOptions("flux-dev", trials=1, db_url=url, worker_cmd=FAKE, confirm=0, patience=100,
                           trial_timeout_s=1.0, timeout_s=5.0), log=lambda m: None)
    assert time.time() - t < 20
    rows = D.trials(D.open_db(url), study_name=res.study)
    assert rows and all(r.status == "timeout" and "timed out after 1 s" in r.reason for r in rows)
    assert res.winner is None and res.stopped == "--timeout reached"


def test_timeout_cuts_the_running_trial_and_does_not_record_it(tmp_path, monkeypatch):
    """--timeout bounds the run, not only the start of trials: a trial still running at the
    deadline is stopped and left for the rerun (not stored as a timeout of its configuration)."""
    pretend_h100(monkeypatch)
    monkeypatch.setenv("FAKE_ENGINE_SLEEP", "30")
    url = f"sqlite:///{tmp_path / 't.db'}"
    t = time.time()
    res = tune(TuneOptions("flux-dev", trials=3, db_url=url, worker_cmd=FAKE, confirm=0, patience=100,
                           trial_timeout_s=600.0, timeout_s=3.0), log=lambda m: None)
    assert time.time() - t < 20
    assert res.stopped == "--timeout reached" and res.winner is None
    assert D.trials(D.open_db(url), study_name=res.study) == []
    monkeypatch.setenv("FAKE_ENGINE_SLEEP", "0")  # the rerun measures that configuration
    again = tune(TuneOptions("flux-dev", trials=8, db_url=url, worker_cmd=FAKE, confirm=0, patience=100),
                 log=lambda m: None)
    rows = D.trials(D.open_db(url), study_name=again.study)
    assert len(rows) == 8 and all(r.status == "complete" for r in rows)
    assert "" in {r.argv for r in rows}  # the cut trial (the first seed: the defaults) was asked again


def test_resident_layers_are_one_integer_range(monkeypatch):
    """Every resident count is searchable (Optuna sees an ordered integer), so an enqueued count
    off any grid (the residency climb's) runs as asked."""
    import optuna

    from dittune.tuner import study as S

    pretend_h100(monkeypatch)
    s = S._setup(S.TuneOptions("flux-dev", db_url="sqlite://"))
    dim = next(d for d in s.space.dims if d.flag.name == "dit-resident-layers")
    assert dim.ordinal and dim.values == tuple(range(57))
    study = optuna.create_study(directions=["minimize", "minimize"])
    cfg = F.config_from_argv(["--text-encoder-cpu-offload", "--vae-cpu-offload", "--dit-layerwise-offload",
                              "--dit-resident-layers", "46"])
    study.enqueue_trial(s.space.params(cfg))
    got = s.space.suggest(study.ask())
    assert got == cfg
    assert s.space.contains(cfg)
    # the space size counts every resident count where streaming is on
    one_count = [c.dit_layerwise_offload for c in
                 s.space.configs(tuple(type(d)(d.flag, d.values[:1]) if d.ordinal else d for d in s.space.dims))]
    off, on = one_count.count(False), one_count.count(True)
    assert s.space.size() == off + 57 * on and on > 0


def test_seeds_are_repaired_to_fit_the_budget(monkeypatch):
    """A preset seed predicted over budget is enqueued as its closest fitting variant, keeping as
    many resident blocks as the memory model allows (monotone)."""
    from dittune.tuner import memory
    from dittune.tuner.study import _fit_budget, _setup

    pretend_h100(monkeypatch)
    s = _setup(TuneOptions("flux-dev", vram_budget="24GiB"))
    seed = F.config_from_dict({"attention-backend": "torch_cudnn_sdpa", "enable-torch-compile": True})
    fixed = _fit_budget(seed, s)
    assert fixed is not None and fixed.dit_layerwise_offload and fixed.text_encoder_cpu_offload
    assert fixed.attention_backend == "torch_cudnn_sdpa" and fixed.enable_torch_compile
    assert memory.predict_peak_bytes("flux-dev", fixed, 1024, 1024) <= 24 * GiB
    more = [r for r in (0, 10, 20, 30, 40, 50) if r > fixed.dit_resident_layers]
    for r in more:  # one more resident step would not fit
        import dataclasses

        assert memory.predict_peak_bytes("flux-dev", dataclasses.replace(fixed, dit_resident_layers=r), 1024, 1024) > 24 * GiB
    roomy = _setup(TuneOptions("flux-dev", vram_budget="80GiB"))
    assert _fit_budget(seed, roomy) == seed


def test_warns_when_the_card_is_busy(tmp_path, monkeypatch):
    import dataclasses

    import dittune.tuner.study as study

    pretend_h100(monkeypatch)
    busy = dataclasses.replace(H100, free_bytes=10 * GiB)
    monkeypatch.setattr(study, "detect", lambda: Detection((busy,)))
    said = []
    tune(TuneOptions("flux-dev", vram_budget="24GiB", trials=1, db_url=f"sqlite:///{tmp_path / 't.db'}", worker_cmd=FAKE,
                     confirm=0), log=said.append)
    assert any(m.startswith("warning: only 10.00 GiB of the GPU is free") for m in said)


def test_rerunning_a_finished_study_measures_nothing_again(tmp_path, monkeypatch):
    pretend_h100(monkeypatch)
    url = f"sqlite:///{tmp_path / 't.db'}"
    opts = TuneOptions("flux-dev", trials=5, db_url=url, worker_cmd=FAKE, confirm=2, patience=100)
    first = tune(opts, log=lambda m: None)
    n = len(D.trials(D.open_db(url)))
    again = tune(opts, log=lambda m: None)
    assert len(D.trials(D.open_db(url))) == n  # no new trial, no new confirmation
    assert again.winner.trial_id == first.winner.trial_id


def test_residency_climb_uses_the_measured_peak(monkeypatch):
    """After a layerwise trial fits, the next is the same config with the most resident blocks
    whose allocated peak (measured + the model's difference) still fits; nothing once measured
    above. The allocated peak comes from the trial's per-stage peaks (a capped trial's reserved
    peak is elastic), else from its reserved peak less the allocator overhead."""
    from dittune.engine import flags as F
    from dittune.tuner import memory
    from dittune.tuner import study as S

    pretend_h100(monkeypatch)
    s = S._setup(S.TuneOptions("flux-dev", vram_budget="24GiB", trials=1, db_url="sqlite://"))
    budget = 24 * GiB
    cfg = F.config_from_argv(["--text-encoder-cpu-offload", "--vae-cpu-offload", "--dit-layerwise-offload",
                              "--dit-resident-layers", "10"])
    state = S._State({})

    def alloc(c):  # the model's allocated peak
        return memory.predict_peak_bytes("flux-dev", c, s.width, s.height) / memory.ALLOCATOR_OVERHEAD

    def climb(allocated, reserved=None):
        manifest = {"peak_vram": {"stages": {"denoise": {"allocated_bytes": int(allocated), "reserved_bytes": 0},
                                             "decode": {"allocated_bytes": int(allocated) - GiB}}}}
        rec = D.TrialRecord(status="complete", flags=F.config_to_dict(cfg), argv="",
                            peak_vram_bytes=int(reserved or allocated * 1.05), manifest=manifest)
        return S._residency_climb(cfg, rec, s, state)

    residents = next(d.values for d in s.space.dims if d.flag.name == "dit-resident-layers")
    up = climb(alloc(cfg))  # the model was exact: climb as far as it predicts fits
    assert up is not None and up.dit_resident_layers > 10
    assert alloc(up) <= budget * S.CLIMB_MARGIN
    for r in [r for r in residents if r > up.dit_resident_layers]:  # no count above it would fit
        assert alloc(F.config_from_dict({**F.config_to_dict(up), "dit-resident-layers": r})) > budget * S.CLIMB_MARGIN
    worse = climb(alloc(cfg) + 6 * GiB)  # measured 6 GiB above the model: a smaller climb, or none
    assert worse is None or worse.dit_resident_layers < up.dit_resident_layers
    # a capped trial's reserved peak may sit at the budget: the allocated peak decides
    assert climb(alloc(cfg), reserved=budget - 1) == up
    assert climb(alloc(cfg), reserved=25 * GiB) is None  # over budget: nothing to climb from
    no_stages = D.TrialRecord(status="complete", flags=F.config_to_dict(cfg), argv="",
                              peak_vram_bytes=int(alloc(cfg) * memory.ALLOCATOR_OVERHEAD))
    assert S._residency_climb(cfg, no_stages, s, state) == up  # old rows: reserved less the overhead
    resident = F.config_from_argv(["--text-encoder-cpu-offload"])
    rec = D.TrialRecord(status="complete", flags=F.config_to_dict(resident), argv="", peak_vram_bytes=10 * GiB)
    assert S._residency_climb(resident, rec, s, state) is None  # not streamed: no residency to climb


def test_only_the_fastest_streamed_configuration_is_climbed(monkeypatch):
    """Once the queue is empty the climb starts from the fastest streamed configuration that fit;
    when its climb runs out of memory the next climb settles below that count."""
    from dittune.tuner import memory
    from dittune.tuner import study as S

    pretend_h100(monkeypatch)
    s = S._setup(S.TuneOptions("flux-dev", vram_budget="24GiB", trials=1, db_url="sqlite://"))
    stream = ["--text-encoder-cpu-offload", "--vae-cpu-offload", "--dit-layerwise-offload", "--dit-resident-layers", "30"]
    slow = F.config_from_argv(stream)
    fast = F.config_from_argv(["--attention-backend", "torch_cudnn_sdpa", *stream])
    whole = F.config_from_argv(["--attention-backend", "torch_cudnn_sdpa", "--dit-cpu-offload",
                                "--text-encoder-cpu-offload", "--vae-cpu-offload"])
    state = S._State({})

    def add(cfg, latency, status="complete"):
        peak = int(memory.predict_peak_bytes("flux-dev", cfg, s.width, s.height))
        argv = " ".join(F.config_to_argv(cfg))
        state.add(argv, D.TrialRecord(status=status, flags=F.config_to_dict(cfg), argv=argv, latency_s=latency,
                                      peak_vram_bytes=peak if status == "complete" else None))

    assert S._next_climb(s, state) is None  # nothing measured yet
    add(slow, 5.0)
    add(fast, 4.0)
    add(whole, 3.0)  # faster, but not streamed: nothing to climb
    up = S._next_climb(s, state)
    assert up is not None and up.attention_backend == "torch_cudnn_sdpa" and up.dit_resident_layers > 30
    add(up, 0.0, status="oom")  # the climb ran out of memory: the next one stops below it
    lower = S._next_climb(s, state)
    assert lower is not None and 30 < lower.dit_resident_layers < up.dit_resident_layers
    assert lower.attention_backend == "torch_cudnn_sdpa"
