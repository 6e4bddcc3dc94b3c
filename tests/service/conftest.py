import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tuner"))

from dittune import db as D  # noqa: E402

TOKEN = "s3cret-token"
GiB = 2**30


@pytest.fixture(scope="module")
def fake_study(tmp_path_factory):
    """A frontier study under 40 GiB, stored by the tuner's own code path (fake engine), plus a
    2-GPU study stored through the same store functions (the registry has no num-gpus flag yet)."""
    from test_study import FAKE, pretend_h100

    from dittune.tuner import TuneOptions, tune

    from dbrows import add_study, add_trial

    tmp = tmp_path_factory.mktemp("svc")
    url = f"sqlite:///{tmp / 'dittune.db'}"
    with pytest.MonkeyPatch.context() as mp:
        pretend_h100(mp)
        res = tune(TuneOptions("flux-dev", vram_budget="40GiB", trials=5, db_url=url, worker_cmd=FAKE, confirm=1,
                               patience=100, seed=0), log=lambda m: None)
    db = D.open_db(url)
    two = add_study(db, name="flux-2gpu")
    add_trial(db, two, "--num-gpus 2 --ulysses-degree 2", 3.0, 30, flags={"num-gpus": 2, "ulysses-degree": 2})
    add_trial(db, two, "--num-gpus 2 --ulysses-degree 2 --text-encoder-cpu-offload", 5.0, 12,
              flags={"num-gpus": 2, "ulysses-degree": 2, "text-encoder-cpu-offload": True})
    db.dispose()
    return url, res


def make_client(url, token=TOKEN, jobs_dir=None, command=None):
    from fastapi.testclient import TestClient

    from dittune.service.app import create_app
    from dittune.service.jobs import JobRunner, jobs_dir_for

    db = D.open_db(url)
    jobs = JobRunner(Path(jobs_dir) if jobs_dir else jobs_dir_for(url), url, command)
    return TestClient(create_app(db, token, jobs))


def dump(url):
    """Every row of every table (dittune's and Optuna's): 'the database is unchanged'."""
    import sqlite3

    con = sqlite3.connect(D.open_db(url).engine.url.database)
    try:
        return [line for line in con.iterdump() if not line.startswith("PRAGMA")]
    finally:
        con.close()
