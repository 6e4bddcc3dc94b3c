"""Opening the database: default URL, schema creation and the schema-version check."""

from __future__ import annotations

import importlib.util
import os
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, inspect, select, text, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dittune.errors import DittuneError

from .models import SCHEMA_VERSION, Base, Claim, Lease, Meta


class DatabaseError(DittuneError):
    pass


def default_url() -> str:
    env = os.environ.get("DITTUNE_DB")
    if env:
        return env
    data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return f"sqlite:///{data / 'dittune' / 'dittune.db'}"


def _sqlite_path(url: str) -> Path | None:
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


class Database:
    """A checked connection to a dittune database; `session()` yields ORM sessions."""

    def __init__(self, url: str, engine: Engine):
        self.url = url
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    def session(self) -> Session:
        return self._sessions()

    def dispose(self) -> None:
        self.engine.dispose()


# SQLAlchemy's default drivers -> the package that provides them
_DRIVER_PACKAGES = {"psycopg2": "psycopg2-binary", "psycopg": "psycopg[binary]", "MySQLdb": "mysqlclient",
                    "pymysql": "PyMySQL", "cx_Oracle": "cx_Oracle", "oracledb": "oracledb", "pyodbc": "pyodbc",
                    "asyncpg": "asyncpg", "pg8000": "pg8000", "mysql": "mysql-connector-python"}


def _with_driver(url: str) -> str:
    """postgresql://... means psycopg 3 (the `postgres` extra), not SQLAlchemy's psycopg2 default;
    a missing driver is one line, not a traceback."""
    u = make_url(url)
    if u.get_backend_name() != "postgresql":
        return url
    if u.get_driver_name() in ("psycopg2", "psycopg") and u.drivername == "postgresql":
        u = u.set(drivername="postgresql+psycopg")
    driver = u.get_driver_name()
    if importlib.util.find_spec(driver) is None:
        raise DatabaseError(f"PostgreSQL needs its driver {driver!r}: pip install \"dittune[postgres]\"")
    return u.render_as_string(hide_password=False)


def open_db(url: str | None = None, create: bool = False) -> Database:
    """Open `url` (default: DITTUNE_DB or the XDG data dir). With create=False (read-only verbs) a
    missing database is an error and nothing is written. Only the default location's directory
    is created: a database path the user named must lie in a directory that exists."""
    named = bool(url or os.environ.get("DITTUNE_DB"))
    url = url or default_url()
    try:
        url = _with_driver(url)
    except ArgumentError:
        raise DatabaseError(f"malformed database URL {url!r}; e.g. sqlite:///path/to/dittune.db") from None
    path = _sqlite_path(url)
    if path is not None:
        if path.is_dir():
            raise DatabaseError(f"database path {path} is a directory")
        if not path.exists():
            if not create:
                raise DatabaseError(f"no dittune database at {path}; run `dittune tune MODEL` first or pass --db")
            if named and not path.parent.is_dir():
                raise DatabaseError(f"database directory {path.parent} does not exist; create it or pass another --db")
            path.parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = create_engine(url)
        with exclusive(engine):  # several processes may open a fresh database at once
            _check_schema(engine, create)
    except DatabaseError:
        raise
    except ImportError as e:  # the URL's DBAPI driver is not installed
        driver = e.name or str(e)
        scheme = make_url(url).drivername
        raise DatabaseError(
            f"{scheme}:// URLs need the Python driver {driver}: pip install {_DRIVER_PACKAGES.get(driver, driver)}"
        ) from None
    except SQLAlchemyError as e:
        raise DatabaseError(f"cannot open database {url}: {str(e.orig if hasattr(e, 'orig') else e).strip()}") from None
    return Database(url, engine)


@contextmanager
def exclusive(engine: Engine, name: str = "dittune schema") -> Iterator[None]:
    """Serialise a create-if-missing step between processes: a PostgreSQL advisory lock held on
    its own connection. SQLite has one writer per file (and one tuner per file, tuner/leases.py),
    so nothing to take there."""
    if engine.dialect.name != "postgresql":
        yield
        return
    key = zlib.crc32(name.encode())
    with engine.connect() as c:
        c.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        c.commit()
        try:
            yield
        finally:
            c.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            c.commit()


def _check_schema(engine: Engine, create: bool) -> None:
    tables = set(inspect(engine).get_table_names())
    if Meta.__tablename__ not in tables:
        ours = {t for t in tables if t.startswith("dittune_")}
        foreign = tables - ours - _OPTUNA_TABLES
        if ours or foreign:
            raise DatabaseError(
                f"{engine.url.render_as_string(hide_password=True)} is not a dittune database "
                f"(it has tables {', '.join(sorted(tables)[:5])}); pass another --db"
            )
        if not create:
            raise DatabaseError(f"{engine.url} holds no dittune results yet; run `dittune tune MODEL` first")
        with Session(engine) as s, s.begin():
            Base.metadata.create_all(s.connection())
            s.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
        return
    with Session(engine) as s:
        row = s.scalar(select(Meta.value).where(Meta.key == "schema_version"))
    try:
        version = int(row) if row is not None else None
    except ValueError:
        version = None
    if version is None:
        raise DatabaseError(f"{engine.url}: dittune_meta has no valid schema_version; the database is damaged")
    if version > SCHEMA_VERSION:
        raise DatabaseError(
            f"{engine.url} has dittune schema {version}, newer than this dittune's {SCHEMA_VERSION}; upgrade dittune"
        )
    if version < _OLDEST_READABLE:
        raise DatabaseError(f"{engine.url} has an old dittune schema {version} (this is {SCHEMA_VERSION}); no migration exists")
    if version < SCHEMA_VERSION and create:
        _upgrade(engine, version)
        tables = set(inspect(engine).get_table_names())
    elif version < SCHEMA_VERSION:  # read-only verbs read a version-1 database as it is
        tables |= _ADDED_IN_2
    missing = {t.name for t in Base.metadata.sorted_tables} - tables
    if missing:
        raise DatabaseError(f"{engine.url}: dittune tables missing ({', '.join(sorted(missing))}); the database is damaged")


_OLDEST_READABLE = 1
_ADDED_IN_2 = {Lease.__tablename__, Claim.__tablename__}


def _upgrade(engine: Engine, version: int) -> None:
    """1 -> 2: the lease and claim tables are new; nothing else changed."""
    with Session(engine) as s, s.begin():
        Base.metadata.create_all(s.connection(), tables=[Lease.__table__, Claim.__table__])
        s.execute(update(Meta).where(Meta.key == "schema_version").values(value=str(SCHEMA_VERSION)))


# Tables Optuna's RDBStorage creates; a database holding only these may receive ours.
_OPTUNA_TABLES = {
    "studies", "version_info", "study_directions", "study_user_attributes", "study_system_attributes",
    "trials", "trial_user_attributes", "trial_system_attributes", "trial_params", "trial_values",
    "trial_intermediate_values", "trial_heartbeats", "alembic_version",
}
