"""Opening the database: default URL, schema creation and the schema-version check."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import create_engine, inspect, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dittune.errors import DittuneError

from .models import SCHEMA_VERSION, Base, Meta


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


def open_db(url: str | None = None, create: bool = False) -> Database:
    """Open `url` (default: DITTUNE_DB or the XDG data dir). With create=False (read-only verbs) a
    missing database is an error and nothing is written. Only the default location's directory
    is created: a database path the user named must lie in a directory that exists."""
    named = bool(url or os.environ.get("DITTUNE_DB"))
    url = url or default_url()
    try:
        make_url(url)
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
    if version < SCHEMA_VERSION:
        raise DatabaseError(f"{engine.url} has an old dittune schema {version} (this is {SCHEMA_VERSION}); no migration exists")
    missing = {t.name for t in Base.metadata.sorted_tables} - tables
    if missing:
        raise DatabaseError(f"{engine.url}: dittune tables missing ({', '.join(sorted(missing))}); the database is damaged")


# Tables Optuna's RDBStorage creates; a database holding only these may receive ours.
_OPTUNA_TABLES = {
    "studies", "version_info", "study_directions", "study_user_attributes", "study_system_attributes",
    "trials", "trial_user_attributes", "trial_system_attributes", "trial_params", "trial_values",
    "trial_intermediate_values", "trial_heartbeats", "alembic_version",
}
