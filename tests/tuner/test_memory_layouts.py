"""The memory model on parallel layouts: every rank holds the whole DiT, rank 0 the VAE, the last
rank the text encoders, and the higher of those two binds; sequence parallelism splits the DiT's activations and
adds shard buffers. Checked against the fake engine's layout peaks: none of the layouts it runs is
predicted over budget."""

import subprocess
import sys

from dittune.engine import flags as F
from dittune.tuner import memory

import fake_engine

LAYOUTS = [(1, 1), (2, 1), (1, 2), (4, 1), (2, 2)]


def _cfg(u, r, extra=()):
    argv = ["--num-gpus", str(u * r), "--ulysses-degree", str(u), "--ring-degree", str(r), *extra] if u * r > 1 else [*extra]
    return F.config_from_argv(argv)


def test_sequence_parallel_splits_activations_and_two_ranks_hold_the_rest():
    fp = memory.footprint("flux-dev")
    stages = {lay: memory.predict_stage_bytes("flux-dev", _cfg(*lay), 1024, 1024) for lay in LAYOUTS}
    denoise = {lay: st["denoise"] for lay, st in stages.items()}
    assert denoise[(2, 1)] < denoise[(1, 1)] and denoise[(4, 1)] < denoise[(2, 1)]
    assert denoise[(2, 1)] == denoise[(1, 2)] and denoise[(4, 1)] == denoise[(2, 2)]  # the split is ulysses x ring
    assert stages[(1, 1)]["load"] == fp.dit_bytes + fp.text_encoder_bytes + fp.vae_bytes  # one process holds all
    several = [st for lay, st in stages.items() if lay != (1, 1)]
    # several GPUs: no layout splits the weights; rank 0 holds the VAE, the last rank the text
    # encoders, and for FLUX the encoders' rank binds (T5-XXL outweighs the VAE and its decode)
    assert all(st["load"] == fp.dit_bytes + fp.text_encoder_bytes and st["decode"] == st["load"] for st in several)
    # the whole footprint: the allocator's peak plus the allowance outside it (NCCL's on several GPUs)
    peaks = {lay: memory.predict_peak_bytes("flux-dev", _cfg(*lay), 1024, 1024) - memory.outside_allocator_bytes(lay[0] * lay[1])
             for lay in LAYOUTS}
    assert peaks[(1, 1)] == int(stages[(1, 1)]["decode"] * memory.ALLOCATOR_OVERHEAD)  # one GPU: the decode binds
    assert all(peaks[lay] < peaks[(1, 1)] for lay in LAYOUTS if lay != (1, 1))
    assert memory.outside_allocator_bytes(2) > memory.outside_allocator_bytes(1) > 0


def test_layout_peaks_agree_with_the_fake_engine():
    for extra in ((), ("--text-encoder-cpu-offload",), ("--text-encoder-cpu-offload", "--vae-cpu-offload")):
        model = [memory.predict_peak_bytes("flux-dev", _cfg(*lay, extra), 1024, 1024)
                 - memory.outside_allocator_bytes(lay[0] * lay[1]) for lay in LAYOUTS]
        fake = [fake_engine.cost(F.config_to_dict(_cfg(*lay, extra)))[1] for lay in LAYOUTS]
        # never predicted above a single GPU's peak, and within the prune margin of the fake's peaks,
        # so no layout the fake engine runs is pruned by the model
        assert all(m <= model[0] for m in model)
        assert all(not memory.over_budget(m, f) for m, f in zip(model, fake))


def test_bad_gpus_flag_is_one_line():
    p = subprocess.run([sys.executable, "-m", "dittune", "tune", "flux-dev-tiny", "--gpus", "0,zero"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.strip().count("\n") == 0 and "NVML indices" in p.stderr, p.stderr
