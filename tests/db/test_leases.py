"""Leases, claims and the schema-2 upgrade (db/leases.py, db/session.py), on SQLite and on a real
PostgreSQL (the tests/conftest.py fixture)."""

import sqlite3
import subprocess
import sys
import time

import pytest
from sqlalchemy import text, update

from dittune import db as D

from dbrows import add_study, add_trial


def _lease_semantics(database):
    sid = add_study(database)
    a = D.leases.acquire(database, sid, "trial", "--x", "h1", 1, optuna_number=3, params={"x": True})
    assert a is not None
    assert D.leases.acquire(database, sid, "trial", "--x", "h2", 2) is None  # held by another process
    assert D.leases.acquire(database, sid, "confirm", "--x", "h2", 2) is not None  # another purpose, another lease
    (row,) = D.leases.leases(database, sid, "trial")
    assert (row.host, row.pid, row.optuna_number, row.params) == ("h1", 1, 3, {"x": True}) and row.age_s < 60
    assert D.leases.heartbeat(database, a)
    assert D.leases.finish(database, a, sid, D.TrialRecord(status="complete", flags={}, argv="--x", latency_s=1.0))
    assert D.leases.acquire(database, sid, "trial", "--x", "h2", 2) is None  # recorded now: never measured twice
    b = D.leases.acquire(database, sid, "trial", "--y", "h1", 1)
    (row,) = D.leases.leases(database, sid, "trial")
    assert D.leases.take_expired(database, row) and not D.leases.take_expired(database, row)  # one sweeper wins
    assert not D.leases.heartbeat(database, b)
    assert not D.leases.finish(database, b, sid, D.TrialRecord(status="complete", flags={}, argv="--y", latency_s=2.0))
    assert [t.argv for t in D.trials(database)] == ["--x"]  # the swept holder recorded nothing
    assert D.leases.claim(database, sid, "seeds", "h1", 1) and not D.leases.claim(database, sid, "seeds", "h2", 2)
    # the study's last slot: one measured, so a limit of 1 is full and a limit of 2 has one place
    assert D.leases.acquire(database, sid, "trial", "--z", "h1", 1, limit=1) is None
    assert D.leases.acquire(database, sid, "trial", "--z", "h1", 1, limit=2) is not None
    assert D.leases.acquire(database, sid, "trial", "--w", "h2", 2, limit=2) is None


def test_leases_on_sqlite(database):
    _lease_semantics(database)


def test_leases_on_postgres(postgres_url):
    database = D.open_db(postgres_url, create=True)
    assert database.url.startswith("postgresql+psycopg://")
    _lease_semantics(database)
    database.dispose()


def test_schema_1_database_is_upgraded_by_tune_and_read_as_is_otherwise(tmp_path):
    p = tmp_path / "old.db"
    database = D.open_db(f"sqlite:///{p}", create=True)
    sid = add_study(database)
    add_trial(database, sid, "--a", 1.0, 10)
    with database.engine.begin() as c:  # what schema 1 was: no lease or claim tables
        c.execute(text("drop table dittune_lease"))
        c.execute(text("drop table dittune_claim"))
        c.execute(update(D.models.Meta).values(value="1"))
    database.dispose()
    before = p.read_bytes()
    ro = D.open_db(f"sqlite:///{p}")  # recommend / export: read, write nothing
    assert [t.argv for t in D.trials(ro)] == ["--a"]
    ro.dispose()
    assert p.read_bytes() == before
    D.open_db(f"sqlite:///{p}", create=True).dispose()  # tune: gains the new tables
    con = sqlite3.connect(p)
    assert con.execute("select value from dittune_meta").fetchone() == (str(D.SCHEMA_VERSION),)
    assert {"dittune_lease", "dittune_claim"} <= {r[0] for r in con.execute("select name from sqlite_master")}
    assert con.execute("select argv from dittune_trial").fetchall() == [("--a",)]


def test_missing_postgres_driver_is_one_line(tmp_path):
    code = ("import sys; sys.modules['psycopg'] = None\n"
            "from dittune.cli import main\nsys.argv = ['dittune', 'studies', '--db', 'postgresql://u@h/db']\nmain()")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert p.stderr.strip() == 'error: PostgreSQL needs its driver \'psycopg\': pip install "dittune[postgres]"', p.stderr
