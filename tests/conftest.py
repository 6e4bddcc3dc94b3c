import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from dittune import db as D  # noqa: E402


@pytest.fixture
def database(tmp_path):
    d = D.open_db(f"sqlite:///{tmp_path / 'dittune.db'}", create=True)
    yield d
    d.dispose()


@pytest.fixture(scope="session")
def postgres_server():
    """URL of a PostgreSQL server's maintenance database (see tests/pgserver.py)."""
    import os

    import pgserver

    pytest.importorskip("psycopg", reason='the PostgreSQL driver is missing: pip install "dittune[test]"')
    url = os.environ.get("DITTUNE_TEST_POSTGRES")
    if url:
        yield url
        return
    url, stop = pgserver.start()
    yield url
    stop()


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh, empty PostgreSQL database for one test."""
    import pgserver

    return pgserver.fresh_database(postgres_server)
