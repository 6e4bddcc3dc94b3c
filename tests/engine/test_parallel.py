"""Every parallel layout on gloo (CPU processes) against one process, fp32; the launcher's
failure handling; the CLI with --num-gpus. Ranks run tests/engine/parallel_ranks.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dittune.engine import errors
from dittune.engine import flags as F
from dittune.engine.parallel import launch

HERE = Path(__file__).parent
TOL = 2e-5  # fp32: the same sums in another order


@pytest.fixture(autouse=True)
def ranks_import_checks(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))


U2, R2 = {"ulysses": 2}, {"ring": 2}
MODELS = ("flux-dev-tiny", "qwen-image-tiny", "z-image-turbo-tiny")


def _check_dits(world, cases, backend="gloo", tol=TOL):
    results = launch.run(world, "parallel_ranks:check_dits", cases, backend)
    assert len(results) == world
    for rank_errs in results:
        assert len(rank_errs) == len(cases)
        for model, lay, n_txt, masked, n_attn, err, scale in rank_errs:
            assert n_attn > 0, (model, lay)
            assert err <= tol * max(1.0, scale), (model, lay, n_txt, masked, err)


def test_two_ranks_ulysses_and_ring_match_one_process():
    # 7 and 33 text tokens: shards of unequal length; Qwen-Image also with a key mask.
    cases = [(m, lay, n, False) for m in MODELS for lay in (U2, R2) for n in (7, 32)]
    cases += [("qwen-image-tiny", lay, 7, True) for lay in (U2, R2)]
    _check_dits(2, cases)


def test_four_ranks_usp_and_cfg_halves_match_one_process():
    cases = [(m, lay, 9, False) for m in MODELS
             for lay in ({"ulysses": 2, "ring": 2}, {"cfg": 2, "ulysses": 2}, {"ring": 4})]
    cases.append(("qwen-image-tiny", {"ulysses": 2, "ring": 2}, 9, True))
    _check_dits(4, cases)


def _check_pipelines(world, cases):
    results = launch.run(world, "parallel_ranks:check_pipelines", cases, "gloo")
    for rank, rank_out in enumerate(results):
        for model, flags, guidance, err, no_image in rank_out:
            assert no_image == (rank != 0), (model, flags)  # the VAE lives on rank 0
            if rank == 0:
                lat_err, scale, img_err = err
                assert lat_err <= TOL * max(1.0, scale), (model, flags, lat_err)
                assert img_err <= 1, (model, flags, img_err)


def test_pipelines_cfg_parallel_and_ulysses_on_two_ranks():
    _check_pipelines(2, [
        ("qwen-image-tiny", {"num-gpus": 2, "enable-cfg-parallel": True}, 4.0),
        ("z-image-turbo-tiny", {"num-gpus": 2, "enable-cfg-parallel": True}, 2.0),
        ("z-image-turbo-tiny", {"num-gpus": 2, "ring-degree": 2}, 0.0),
        ("flux-dev-tiny", {"num-gpus": 2, "ulysses-degree": 2}, 3.5),
    ])


def test_pipelines_cfg_times_ulysses_on_four_ranks():
    _check_pipelines(4, [
        ("qwen-image-tiny", {"num-gpus": 4, "enable-cfg-parallel": True, "ulysses-degree": 2}, 4.0),
        ("flux-dev-tiny", {"num-gpus": 4, "ulysses-degree": 2, "ring-degree": 2}, 3.5),
    ])


@pytest.mark.parametrize("kind, exc, fragment", [
    ("oom", errors.BudgetExceededError, "out of GPU memory"),
    ("refused", errors.EngineError, "refused by the test"),
    ("exit", launch.RankCrashed, "rank 1 of 3 ended with exit code 7"),
    ("bug", launch.RankCrashed, "rank 1 of 3 failed: ValueError"),
])
def test_a_failing_rank_ends_every_rank_with_its_error(kind, exc, fragment):
    with pytest.raises(exc, match=fragment) as e:
        launch.run(3, "parallel_ranks:fail_on", {"rank": 1, "kind": kind}, "gloo")
    assert type(e.value) is exc


def _dittune(*args, cwd):
    return subprocess.run([sys.executable, "-m", "dittune.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_num_gpus_matches_one_process_and_dumps_every_rank(tmp_path):
    base = ["generate", "--model", "flux-dev-tiny", "--device", "cpu", "--steps", "2"]
    one = _dittune(*base, "--output", str(tmp_path / "one.png"), cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    # warm-up until two requests agree: rank 0 decides for every rank (their requests hold collectives)
    two = _dittune(*base, "--num-gpus", "2", "--ulysses-degree", "2", "--output", str(tmp_path / "two.png"),
                   "--perf-dump-path", str(tmp_path / "two.json"), "--warmup", "1", "--max-warmup", "4", cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    a, b = (np.asarray(Image.open(tmp_path / f), dtype=np.int32) for f in ("one.png", "two.png"))
    assert np.abs(a - b).max() <= 1
    dump = json.loads((tmp_path / "two.json").read_text())
    assert 1 <= dump["warmup_requests"] <= 4 and len(dump["warmup"]["latencies_s"]) == dump["warmup_requests"] + 1
    par = dump["parallel"]
    assert par["layout"] == {"world_size": 2, "cfg": 1, "ulysses": 2, "ring": 1, "tp": 1,
                             "describe": "ulysses 2"}
    assert [r["rank"] for r in par["ranks"]] == [0, 1] and [r["ulysses"] for r in par["ranks"]] == [0, 1]
    for r in par["ranks"]:
        assert r["collectives_per_step"]["attention_bytes"] > 0
    assert dump["manifest"]["flags"]["num-gpus"] == 2 and dump["manifest"]["sequence_parallel_attention"] == 2
    # rank 0's manifest: it holds the VAE; the last rank the text encoders
    assert "vae" in dump["manifest"]["placement"] and "text_encoder" not in dump["manifest"]["placement"]
    assert par["text_encoders"].startswith("rank 1 ") and par["vae"] == "rank 0"


def test_cli_rank_failure_is_one_line_with_the_single_process_status(tmp_path):
    empty = tmp_path / "not-a-checkpoint"
    empty.mkdir()
    args = ["generate", "--model", "flux-dev-tiny", "--device", "cpu", "--model-path", str(empty)]
    one = _dittune(*args, cwd=tmp_path)
    two = _dittune(*args, "--num-gpus", "2", "--ring-degree", "2", cwd=tmp_path)
    assert one.returncode == two.returncode == 1
    assert two.stderr.strip().splitlines()[-1] == one.stderr.strip().splitlines()[-1]
    assert "Traceback" not in two.stderr


@pytest.mark.parametrize("argv, fragment", [
    (["--num-gpus", "2"], "--num-gpus 2 must equal the product"),
    (["--num-gpus", "2", "--enable-cfg-parallel"], "flux-dev-tiny has none"),
    (["--num-gpus", "4", "--ulysses-degree", "4"], "does not divide flux-dev-tiny's 2 attention heads"),
    (["--num-gpus", "2", "--ring-degree", "2", "--device", "tpu"], "only cuda and cpu"),
])
def test_cli_bad_layouts_are_one_line_errors(tmp_path, argv, fragment):
    r = _dittune("generate", "--model", "flux-dev-tiny", "--device", "cpu", *argv, cwd=tmp_path)
    assert r.returncode == 1 and fragment in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.gpu
def test_gpu_two_ranks_every_layout_matches_one_gpu():
    """NCCL on two GPUs, bf16: within the lossless tolerance (bf16 sums in another order)."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    cases = [(m, lay, n, False) for m in MODELS for lay in (U2, R2) for n in (7, 512)]
    _check_dits(2, cases, backend="nccl", tol=2e-2)


@pytest.mark.parametrize("layout", [{"ulysses": 2}, {"ring": 2}])
def test_compiled_blocks_trace_the_collectives_without_graph_breaks(layout):
    """Functional collectives inside each repeated block: one graph per block under torch.compile."""
    breaks = launch.run(2, "parallel_ranks:explain_blocks", layout, "gloo")
    assert len(breaks) == 6 and all(n == 0 for _, n in breaks), breaks


def test_graphs_with_collectives_run_their_ranks_without_expandable_segments(monkeypatch):
    """NCCL capture in a CUDA graph with expandable segments is reported to hang: the ranks of such
    a run get expandable_segments:False, unless the user chose the allocator setting."""
    from dittune.engine import run

    monkeypatch.setenv("DITTUNE_ALLOC_CONF", "default")
    graph = dict(F.config_to_dict(F.EngineConfig()), **{"enable-cuda-graph": True, "num-gpus": 2})
    for layout, expected in [({"ulysses-degree": 2}, {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}),
                             ({"ring-degree": 2}, {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}),
                             ({"enable-cfg-parallel": True}, {})]:  # CFG parallel gathers outside the graph
        assert run.rank_env(F.config_from_dict({**graph, **layout})) == expected, layout
    assert run.rank_env(F.config_from_dict({**graph, "enable-cuda-graph": False, "ulysses-degree": 2})) == {}
    monkeypatch.delenv("DITTUNE_ALLOC_CONF")  # the user's own PYTORCH_CUDA_ALLOC_CONF
    assert run.rank_env(F.config_from_dict({**graph, "ulysses-degree": 2})) == {}
    seen = launch.run(2, "parallel_ranks:environment", ["PYTORCH_CUDA_ALLOC_CONF", "X_DITTUNE"], "gloo",
                      env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False", "X_DITTUNE": "1"})
    assert seen == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False", "X_DITTUNE": "1"}


def test_ranks_end_when_their_launcher_is_killed(tmp_path):
    """A launcher ended by SIGTERM (`timeout`, a scheduler) runs no cleanup: its ranks must not
    live on holding GPUs and waiting on their peers."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    here = Path(__file__).parent
    code = f"from dittune.engine.parallel import launch; launch.run(2, 'parallel_ranks:linger', {str(tmp_path)!r}, 'gloo')"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("rank*.pid"))) < 2 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.2)
    pids = [int(f.read_text()) for f in tmp_path.glob("rank*.pid")]
    assert len(pids) == 2, "the ranks did not start"
    p.send_signal(signal.SIGTERM)
    p.wait(30)

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        with open(f"/proc/{pid}/stat") as f:  # a zombie (not yet reaped) is gone
            return f.read().split(")")[-1].split()[0] != "Z"

    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in pids if alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"ranks {left} outlived their launcher"
