"""recommend / export / studies on rows stored through the tuner's store functions, and bad input."""

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from dittune import db as D
from dittune.cli import app

from dbrows import GiB, add_study, add_trial

runner = CliRunner()
FLAGS_FAST = {"attention-backend": "torch_cudnn_sdpa", "enable-torch-compile": True}
FLAGS_SMALL = {"dit-layerwise-offload": True, "dit-resident-layers": 20}


@pytest.fixture
def filled(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'dittune.db'}"
    d = D.open_db(url, create=True)
    s = add_study(d)
    add_trial(d, s, "--attention-backend torch_cudnn_sdpa --enable-torch-compile", 10.0, 40, flags=FLAGS_FAST)
    add_trial(d, s, "--dit-layerwise-offload --dit-resident-layers 20", 20.0, 14, flags=FLAGS_SMALL)
    add_trial(d, s, "", 15.0, 45, flags={})
    d.dispose()
    monkeypatch.delenv("DITTUNE_DB", raising=False)
    return url, tmp_path / "dittune.db"


def run(*args):
    return runner.invoke(app, list(args))


def test_recommend_text_and_json(filled):
    url, _ = filled
    r = run("recommend", "flux-dev", "--db", url)
    assert r.exit_code == 0, r.output
    assert "dittune generate --model flux-dev --width 1024 --height 1024 --steps 28 --guidance 3.5 --attention-backend torch_cudnn_sdpa --enable-torch-compile" in r.output
    r = run("recommend", "flux-dev", "--db", url, "--vram-budget", "16GiB", "--format", "json")
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.stdout)
    assert row["flags"] == FLAGS_SMALL and row["peak_vram_bytes"] == 14 * GiB and row["latency_s"] == 20.0
    assert row["command"].endswith("--dit-layerwise-offload --dit-resident-layers 20")
    assert row["remeasure"] == row["command"] + " --warmup 1 --max-warmup 4 --measure-s 0.5 --perf-dump-path remeasure.json"
    # the evidence: a single run's band says so; the stored peak is NVML's whole footprint
    assert row["noise_band"] == 0.01 and row["noise_band_source"] == "single run (spread of its steps)"
    assert row["peak_kind"] == "nvml_process" and row["trial_id"] and row["versions"]["torch"] == "2.11.0"
    assert row["step_median_s"] == 20.0 / 30 and row["measured_at"]
    r = run("recommend", "flux-dev", "--db", url, "--vram-budget", "0.5", "--gpu", "H100", "--format", "json")
    assert json.loads(r.stdout)[0]["latency_s"] == 10.0  # 40 GiB fits half of 80 GiB


def test_recommend_env_db(filled, monkeypatch):
    url, _ = filled
    monkeypatch.setenv("DITTUNE_DB", url)
    assert run("recommend", "flux-dev").exit_code == 0


def test_recommend_nothing_fits(filled):
    url, _ = filled
    r = run("recommend", "flux-dev", "--db", url, "--vram-budget", "4GiB")
    assert r.exit_code == 1 and "no measured configuration of flux-dev within 4GiB" in r.stderr


@pytest.mark.parametrize("fmt", ["sh", "json", "md", "sglang"])
def test_export_formats(filled, fmt, tmp_path):
    url, _ = filled
    out = tmp_path / f"export.{fmt}"
    r = run("export", "--db", url, "--format", fmt, "-o", str(out))
    assert r.exit_code == 0, r.output
    text = out.read_text()
    if fmt == "json":
        rows = json.loads(text)
        assert [x["latency_s"] for x in rows] == [10.0, 20.0]  # the 15 s / 45 GiB row is dominated
    elif fmt == "sh":
        commands = [line for line in text.splitlines() if line.startswith("dittune generate")]
        assert text.startswith("#!/bin/sh") and len(commands) == 2
        assert text.count("# re-measure: dittune generate") == 2
    elif fmt == "md":
        assert text.count("\n| flux-dev |") == 2
    else:
        assert "sglang generate --model-path black-forest-labs/FLUX.1-dev" in text
        dropped = "# measured flags with no SGLang equivalent (dropped here, so this command is not the measured configuration): "
        assert "--enable-torch-compile" in text and dropped + "--attention-backend torch_cudnn_sdpa" in text
        assert "--dit-layerwise-offload" in text and dropped + "--dit-resident-layers 20" in text
        # dittune's latency is never presented as the SGLang command's
        assert "These SGLang commands were NOT measured" in text
        for line in text.splitlines():
            if "s/request" in line:
                assert line.startswith("# measured by dittune's engine, not SGLang: ")


def test_export_stdout_and_filters(filled):
    url, _ = filled
    r = run("export", "--db", url, "--format", "md", "--vram-budget", "16GiB")
    assert r.exit_code == 0 and r.stdout.count("| flux-dev |") == 1
    r = run("export", "--db", url, "--gpu", "A100")
    assert r.exit_code == 1 and "no measured configurations" in r.stderr


def test_studies(filled):
    url, _ = filled
    r = run("studies", "--db", url)
    assert r.exit_code == 0 and "s1" in r.stdout and "flux-dev" in r.stdout


def test_gpus_without_driver(monkeypatch):
    monkeypatch.setenv("DITTUNE_NO_NVML", "1")
    r = run("gpus")
    assert r.exit_code == 0 and "no NVIDIA GPU" in r.stdout


@pytest.mark.parametrize("args, fragment", [
    (["recommend", "flux-pro"], "unknown model 'flux-pro'"),
    (["recommend", "flux-dev", "--vram-budget", "lots"], "malformed VRAM budget"),
    (["recommend", "flux-dev", "--format", "yaml"], "--format 'yaml'"),
    (["export", "--format", "csv"], "--format 'csv'"),
    (["export", "--model", "sdxl"], "unknown model 'sdxl'"),
])
def test_bad_input_one_line_nonzero_db_unchanged(filled, args, fragment):
    url, path = filled
    before = path.read_bytes()
    r = run(*args, "--db", url)
    assert r.exit_code == 1
    assert fragment in r.stderr and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    assert path.read_bytes() == before


def test_bad_databases(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_text("not a database")
    newer = tmp_path / "newer.db"
    d = D.open_db(f"sqlite:///{newer}", create=True)
    with d.engine.begin() as c:
        c.exec_driver_sql("update dittune_meta set value='7' where key='schema_version'")
    d.dispose()
    for path, fragment in [(junk, "cannot open database"), (newer, "newer than this dittune"), (tmp_path / "missing.db", "no dittune database")]:
        before = path.read_bytes() if path.exists() else None
        r = run("recommend", "flux-dev", "--db", f"sqlite:///{path}")
        assert r.exit_code == 1 and fragment in r.stderr and r.stderr.count("\n") == 1
        assert (path.read_bytes() if path.exists() else None) == before


def test_real_process_exit_code_and_stderr(tmp_path):
    env = dict(os.environ, DITTUNE_DB=f"sqlite:///{tmp_path / 'none.db'}")
    p = subprocess.run([sys.executable, "-m", "dittune", "recommend", "flux-dev", "--vram-budget", "12 bananas"],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 1 and p.stderr.strip().startswith("error: ") and p.stderr.count("\n") == 1
    assert "Traceback" not in p.stderr


def test_generate_writes_png_and_perf_dump(tmp_path):
    png, dump = tmp_path / "out.png", tmp_path / "perf.json"
    r = run("generate", "--model", "flux-dev-tiny", "--device", "cpu", "--steps", "2", "--width", "64", "--height", "64",
            "--output", str(png), "--perf-dump-path", str(dump))
    assert r.exit_code == 0, r.output
    from PIL import Image

    assert Image.open(png).size == (64, 64)
    d = json.loads(dump.read_text())
    assert d["schema"] == 1 and len(d["steps_s"]) == 2 and d["manifest"]["model"] == "flux-dev-tiny"
    assert set(d["stages"]) == {"encode_s", "prepare_s", "denoise_s", "decode_s", "save_s"}
    assert d["cold_start"]["total_s"] >= d["cold_start"]["load_s"] > 0


@pytest.mark.parametrize("args, fragment", [
    (["--model", "flux-pro"], "unknown model"),
    (["--model", "flux-dev-tiny", "--width", "100"], "multiple of 16"),
    (["--model", "flux-dev-tiny", "--steps", "0"], "at least one denoise step"),
    (["--model", "flux-dev-tiny", "--model-path", "/no/such/dir"], "does not exist"),
    (["--model", "flux-dev-tiny", "--attention-backend", "xformers"], "not one of"),
    (["--model", "flux-dev-tiny", "--dit-resident-layers", "3"], "--dit-layerwise-offload"),
])
def test_generate_bad_input(args, fragment, tmp_path):
    r = run("generate", "--device", "cpu", "--output", str(tmp_path / "x.png"), *args)
    assert r.exit_code == 1 and fragment in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_compare_two_perf_dumps(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for path, extra in ((a, []), (b, ["--vae-precision", "bf16"])):
        r = run("generate", "--model", "flux-dev-tiny", "--device", "cpu", "--steps", "2", "--width", "64", "--height", "64",
                "--output", str(tmp_path / "x.png"), "--perf-dump-path", str(path), *extra)
        assert r.exit_code == 0, r.output
    r = run("compare", str(a), str(b))
    assert r.exit_code == 0, r.output
    assert "denoise step median" in r.stdout and "stage decode" in r.stdout
    assert "flag vae-precision: fp32 -> bf16" in r.stdout
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": 99}')
    r = run("compare", str(a), str(bad))
    assert r.exit_code == 1 and "not a dittune perf dump" in r.stderr and r.stderr.count("\n") == 1
