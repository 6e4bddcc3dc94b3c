"""The bad input a new user hits (issue 15): each ends with one line on stderr, exit code 1, the
database as it was and no directory created; `--help` stays readable at 80 columns."""

import importlib.util
import re
import signal
import sys

import pytest
import torch
from typer.testing import CliRunner

from dittune import db as D
from dittune.cli import app
from dittune.engine import checks
from dittune.engine.gpu import Detection
from dittune.tuner import TuneResult, runner as R
from dittune.tuner import study

cli = CliRunner()


@pytest.fixture
def db(tmp_path, monkeypatch):
    """An existing dittune database, and a machine without a GPU."""
    path = tmp_path / "dittune.db"
    D.open_db(f"sqlite:///{path}", create=True).dispose()
    monkeypatch.delenv("DITTUNE_DB", raising=False)
    monkeypatch.setattr(study, "detect", lambda: Detection((), "no NVIDIA GPU: NVML unavailable (test)"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return path


def refused(args, fragment, db=None):
    before = db.read_bytes() if db is not None else None
    r = cli.invoke(app, args)
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], r.stderr
    if db is not None:
        assert db.read_bytes() == before
    return lines[0]


@pytest.mark.parametrize("args, fragment", [
    (["--device", "tpu"], "--device 'tpu'"),
    (["--device", "nonsense", "--gpu", "7"], "--device 'nonsense' is not a device"),
    (["--device", "cuda"], "no CUDA device is available"),
    (["--gpu", "7"], "--gpu 7: the study runs on the CPU"),
    (["--vram-budget", "12apples"], "VRAM budget '12apples': unknown unit"),
    (["--guidance", "-3"], "--guidance -3 must be >= 0"),
])
def test_tune_refuses_bad_flags_first(db, args, fragment):
    refused(["tune", "flux-dev-tiny", "--trials", "1", "--db", f"sqlite:///{db}", *args], fragment, db)


def test_tune_refuses_a_database_directory_that_does_not_exist(db, tmp_path):
    missing = tmp_path / "nonexistent" / "dir"
    refused(["tune", "flux-dev-tiny", "--device", "cpu", "--db", f"sqlite:///{missing / 'x.db'}"], "does not exist")
    assert not (tmp_path / "nonexistent").exists()


@pytest.mark.parametrize("url", ["postgresql://u@localhost/dittune", "mysql://u@localhost/dittune"])
def test_missing_sql_driver_names_the_package(db, url):
    from sqlalchemy.engine import make_url

    module, package = _DRIVERS[make_url(url).get_dialect().driver]  # the dialect's default driver
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    refused(["studies", "--db", url], f"URLs need the Python driver {module}: pip install {package}")
    refused(["tune", "flux-dev-tiny", "--device", "cpu", "--db", url], f"pip install {package}")


_DRIVERS = {"psycopg": ("psycopg", "psycopg[binary]"), "psycopg2": ("psycopg2", "psycopg2-binary"),
            "mysqldb": ("MySQLdb", "mysqlclient")}


def test_nvml_failure_is_an_error_not_a_cpu_study(db, monkeypatch):
    monkeypatch.setattr(study, "detect", lambda: Detection((), "NVML query failed (NVMLError_Unknown: Unknown Error)",
                                                           failed=True))
    refused(["tune", "flux-dev-tiny", "--db", f"sqlite:///{db}"], "NVML query failed", db)


def test_nvml_errors_other_than_absence_are_failures(monkeypatch):
    from dittune.engine import gpu

    class Broken:
        def nvmlSystemGetDriverVersion(self):
            raise OSError("GPU is lost")

        def nvmlShutdown(self):
            pass

    monkeypatch.setattr(gpu, "_nvml", lambda: Broken())
    assert gpu.detect().failed
    monkeypatch.setattr(gpu, "_nvml", lambda: (_ for _ in ()).throw(ImportError("no pynvml")))
    d = gpu.detect()
    assert not d and not d.failed


def test_cpu_machine_refuses_a_model_that_does_not_fit(db, monkeypatch):
    monkeypatch.setattr(checks, "available_host_bytes", lambda: 16 * 2**30)
    line = refused(["tune", "flux-dev", "--db", f"sqlite:///{db}"], "flux-dev on the CPU needs at least", db)
    assert "16.0 GiB is available" in line or "16.00 GiB is available" in line, line
    refused(["generate", "--model", "flux-dev", "--device", "cpu", "--output", str(db.parent / "x.png")],
            "flux-dev on the CPU needs at least")
    assert not (db.parent / "x.png").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--model", "flux-dev-tiny", "--guidance", "-3"], "--guidance -3 must be >= 0"),
    (["--model", "flux-dev-tiny", "--negative-prompt", "blurry"], "flux-dev-tiny has no classifier-free guidance"),
    (["--model", "z-image-turbo-tiny", "--negative-prompt", "blurry"], "only with --guidance above 0"),
    (["--model", "flux-schnell", "--guidance", "3.5"], "flux-schnell has no guidance input"),
    (["--device", "tpu", "--model", "flux-dev-tiny"], "--device 'tpu'"),
])
def test_generate_refuses_what_the_model_ignores(tmp_path, args, fragment):
    refused(["generate", *args, "--output", str(tmp_path / "x.png")], fragment)
    assert not (tmp_path / "x.png").exists()


def test_killed_worker_says_so(tmp_path):
    """A worker the kernel kills: the reason names the signal, not the last warning it printed."""
    cmd = (sys.executable, "-c", "import os, signal, sys; print('RuntimeWarning: runpy', file=sys.stderr, flush=True); "
           "os.kill(os.getpid(), signal.SIGKILL)")
    out = R.run_trial({"model": "flux-dev"}, 60, worker_cmd=cmd)
    assert out.status == "failed" and out.reason.startswith("worker killed by SIGKILL") and "runpy" not in out.reason


def test_no_measured_trial_without_a_budget_names_no_budget(monkeypatch):
    import dittune.tuner as T

    empty = TuneResult("s", "sqlite:///x.db", 0, [], None, None, "trial budget reached", None)
    monkeypatch.setattr(T, "tune", lambda *a, **k: empty)
    line = refused(["tune", "flux-dev-tiny", "--device", "cpu"], "every trial failed")
    assert "budget" not in line.replace("trial budget", "")


@pytest.mark.parametrize("command", ["generate", "tune"])
def test_help_keeps_flag_names_whole_at_80_columns(command):
    r = cli.invoke(app, [command, "--help"], env={"COLUMNS": "80", "TERM": "dumb"})
    assert r.exit_code == 0, r.output
    assert max(len(line) for line in r.stdout.splitlines()) <= 80
    assert "…" not in r.stdout
    from dittune.engine.flags import FLAGS

    names = ["--" + f.name for f in FLAGS] if command == "generate" else ["--vram-budget", "--trial-timeout", "--measure-steps"]
    for name in names:
        assert re.search(rf"(^|\s|,){re.escape(name)}(\s|,|/|$)", r.stdout, re.M), name
