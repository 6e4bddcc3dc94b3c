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
