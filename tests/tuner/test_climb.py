"""The residency climb spends trials where they inform: after an out-of-memory climb it jumps to
just below the wall (the miss rescales the memory model's per-block cost), after two misses it
bisects; and under the latency objective a streamed configuration with fewer resident blocks than
one already measured within the budget is never run."""

from dittune import db as D
from dittune.engine import flags as F
from dittune.tuner import memory
from dittune.tuner import study as S

from test_study import GiB, pretend_h100

STREAM = ["--text-encoder-cpu-offload", "--vae-cpu-offload", "--dit-layerwise-offload", "--dit-resident-layers"]


def _setup(monkeypatch):
    pretend_h100(monkeypatch)
    return S._setup(S.TuneOptions("flux-dev", vram_budget="24GiB", trials=1, db_url="sqlite://"))


def _add(state, s, cfg, latency=1.0, status="complete", peak=None):
    if peak is None and status == "complete":
        peak = int(memory.predict_peak_bytes("flux-dev", cfg, s.width, s.height))
    argv = " ".join(F.config_to_argv(cfg))
    state.add(argv, D.TrialRecord(status=status, flags=F.config_to_dict(cfg), argv=argv, latency_s=latency,
                                  peak_vram_bytes=peak if status == "complete" else None))


def test_a_miss_jumps_below_the_wall_and_two_misses_bisect(monkeypatch):
    s = _setup(monkeypatch)
    base = F.config_from_argv([*STREAM, "10"])
    state = S._State({})
    _add(state, s, base)
    up = S._next_climb(s, state)
    assert up is not None and up.dit_resident_layers > 12
    _add(state, s, up, status="oom")  # the model was optimistic: it needed more than the room left
    jump = S._next_climb(s, state)
    # the per-block cost is rescaled by the miss: the next try sits just below the wall, not at the
    # model's next count down, and far above the base (no walk down from the top, no walk up from 10)
    assert jump is not None and (up.dit_resident_layers + 10) // 2 < jump.dit_resident_layers < up.dit_resident_layers
    _add(state, s, jump, status="oom")  # a second miss: the model is wrong in shape, bisect
    mid = S._next_climb(s, state)
    assert mid is not None and 10 < mid.dit_resident_layers <= (10 + jump.dit_resident_layers) // 2
    steps = 3
    while True:  # the number of trials to settle stays logarithmic in the ladder
        nxt = S._next_climb(s, state)
        if nxt is None:
            break
        steps += 1
        _add(state, s, nxt, latency=1.0 - 0.001 * nxt.dit_resident_layers,
             status="complete" if nxt.dit_resident_layers < mid.dit_resident_layers + 3 else "oom")
        assert steps < 12
    assert steps <= 3 + 6


def test_latency_objective_never_runs_fewer_resident_blocks_than_a_measured_fit(monkeypatch):
    s = _setup(monkeypatch)
    state = S._State({})
    r40 = F.config_from_argv([*STREAM, "40"])
    _add(state, s, r40, latency=2.0)
    r20 = F.config_from_argv([*STREAM, "20"])
    assert S._dominated(r20, s, state, "latency").argv == " ".join(F.config_to_argv(r40))
    assert S._dominated(F.config_from_argv([*STREAM, "45"]), s, state, "latency") is None  # more: worth a try
    assert S._dominated(r20, s, state, "frontier") is None  # the frontier wants the lower-memory points
    other = F.config_from_argv(["--attention-backend", "torch_cudnn_sdpa", *STREAM, "20"])
    assert S._dominated(other, s, state, "latency") is None  # another configuration
    over = F.config_from_argv(["--text-encoder-cpu-offload", "--vae-cpu-offload"])
    _add(state, s, over, latency=1.0, peak=30 * GiB)  # the whole DiT resident, but over the budget
    assert S._dominated(r20, s, state, "latency").latency_s == 2.0
    _add(state, s, over, latency=1.0, peak=20 * GiB)  # within it: every streamed variant is dominated
    assert S._dominated(F.config_from_argv([*STREAM, "45"]), s, state, "latency").latency_s == 1.0


def test_the_climb_leaves_the_allowance_outside_the_allocator(monkeypatch):
    """The worker caps the allocator at the budget less the allowance for the CUDA context and
    the rest (engine/budget.py): a climb judged from a measured allocated peak keeps that room."""
    from dittune.tuner.climb import residency_climb

    s = _setup(monkeypatch)
    base = F.config_from_argv([*STREAM, "10"])
    alloc = int(memory.predict_peak_bytes("flux-dev", base, s.width, s.height) / memory.ALLOCATOR_OVERHEAD)

    def rec(allowance):
        manifest = {"peak_vram": {"stages": {"denoise": {"allocated_bytes": alloc, "reserved_bytes": alloc}}},
                    **({"outside_allocator": {"allowance_bytes": allowance}} if allowance is not None else {})}
        return D.TrialRecord(status="complete", flags=F.config_to_dict(base), argv=" ".join(F.config_to_argv(base)),
                             latency_s=1.0, peak_vram_bytes=alloc, manifest=manifest)

    free = residency_climb(base, rec(None), s, S._State({}))
    kept = residency_climb(base, rec(4 * GiB), s, S._State({}))
    assert free is not None and kept is not None
    assert kept.dit_resident_layers < free.dit_resident_layers  # 4 GiB less room: fewer blocks climbed


def test_a_streamed_configuration_waits_for_its_resident_sibling(monkeypatch):
    """Under the latency objective a streamed configuration whose DiT-resident sibling should fit
    is deferred until that sibling is measured (then `dominated` prunes it for free); a sibling
    predicted over the budget, measured, or out of memory lets it run; the frontier runs it."""
    from dittune.tuner.climb import resident_first

    s = _setup(monkeypatch)
    state = S._State({})
    small = ["--text-encoder-cpu-offload", "--vae-cpu-offload"]
    r10 = F.config_from_argv([*STREAM, "10"])
    sib = F.config_from_argv(small)
    fits = memory.predict_peak_bytes("flux-dev", sib, s.width, s.height) <= s.budget_bytes
    assert (resident_first(r10, s, state, "latency") == sib) is fits  # FLUX resident at 24 GiB: the model decides
    s24 = S._setup(S.TuneOptions("flux-dev", vram_budget="80GiB", trials=1, db_url="sqlite://"))
    assert resident_first(r10, s24, state, "latency") == sib
    idle = F.config_from_argv([*STREAM, "10", "--dit-idle-offload", "--dit-offload-prefetch-size", "2"])
    assert resident_first(idle, s24, state, "latency") == sib  # the streaming-only flags go with it
    whole = F.config_from_argv([*small, "--dit-cpu-offload"])
    assert resident_first(whole, s24, state, "latency") == sib
    assert resident_first(r10, s24, state, "frontier") is None
    assert resident_first(sib, s24, state, "latency") is None  # nothing streamed: it simply runs
    s8 = S._setup(S.TuneOptions("flux-dev", vram_budget="8GiB", trials=1, db_url="sqlite://"))
    assert resident_first(r10, s8, state, "latency") is None  # the resident DiT cannot fit 8 GiB
    _add(state, s24, sib, status="oom")
    assert resident_first(r10, s24, state, "latency") is None  # it ran out of memory: stream
    state = S._State({})
    _add(state, s24, sib, latency=1.0, peak=20 * GiB)
    assert resident_first(r10, s24, state, "latency") is None  # measured: `dominated` decides
    assert S._dominated(r10, s24, state, "latency").latency_s == 1.0
    assert S._dominated(idle, s24, state, "latency").latency_s == 1.0  # idle offload, prefetch: same family
    assert S._dominated(whole, s24, state, "latency").latency_s == 1.0  # whole-DiT offload too
    r5_idle = F.config_from_argv([*STREAM, "5", "--dit-idle-offload"])
    state = S._State({})
    _add(state, s24, r10, latency=1.5, peak=12 * GiB)
    assert S._dominated(F.config_from_argv([*STREAM, "5"]), s24, state, "latency").latency_s == 1.5
    assert S._dominated(r5_idle, s24, state, "latency") is None  # idle offload is not ordered by count alone
