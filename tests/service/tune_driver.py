"""`python tune_driver.py ARGS...` runs `dittune ARGS...` as the service's job runner would, with
the tuner pretending an H100 and measuring through the fake engine (tests/tuner/fake_engine.py):
the real CLI, tuner, store and signal handling; only the engine is fake."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tuner"), str(HERE.parent)]

import pytest  # noqa: E402

import dittune.tuner.study as study  # noqa: E402
from test_study import FAKE, pretend_h100  # noqa: E402

mp = pytest.MonkeyPatch()
pretend_h100(mp)
_run = study.run_trial
mp.setattr(study, "run_trial", lambda job, limit, cmd, env, **kw: _run(job, limit, FAKE, env))  # cold: spares would start the real worker

from dittune.cli import main  # noqa: E402

sys.argv = ["dittune", *sys.argv[1:]]
main()
