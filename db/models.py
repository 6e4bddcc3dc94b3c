"""The dittune_ tables (SQLAlchemy 2.0 typed ORM). Optuna keeps its own tables in the same database."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# 2: dittune_lease and dittune_claim (several processes on one study); a version-1 database gains
# the two tables when a tune opens it (db/session.py), and reads as it did.
SCHEMA_VERSION = 2


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Meta(Base):
    __tablename__ = "dittune_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class Gpu(Base):
    __tablename__ = "dittune_gpu"
    __table_args__ = (UniqueConstraint("name", "memory_bytes", "driver", "compute_capability", "count"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128))  # NVML name, "NVIDIA H100 80GB HBM3"; "cpu" for CPU runs
    memory_bytes: Mapped[int] = mapped_column(BigInteger)
    driver: Mapped[str] = mapped_column(String(64))
    compute_capability: Mapped[str] = mapped_column(String(16))  # "9.0"
    count: Mapped[int] = mapped_column(Integer)


class Workload(Base):
    __tablename__ = "dittune_workload"
    __table_args__ = (UniqueConstraint("model", "width", "height", "steps", "guidance"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    steps: Mapped[int] = mapped_column(Integer)
    guidance: Mapped[float] = mapped_column(Float)


class Study(Base):
    __tablename__ = "dittune_study"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(256), unique=True)  # the Optuna study name
    workload_id: Mapped[int] = mapped_column(ForeignKey("dittune_workload.id"))
    gpu_id: Mapped[int] = mapped_column(ForeignKey("dittune_gpu.id"))
    budget_bytes: Mapped[int] = mapped_column(BigInteger)
    objective: Mapped[str] = mapped_column(String(16), default="frontier")
    registry_hash: Mapped[str] = mapped_column(String(32))
    # torch, triton, driver, dittune, diffusers, transformers versions at study creation
    versions: Mapped[dict[str, Any]] = mapped_column(default=dict)
    allow_lossy: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)

    workload: Mapped[Workload] = relationship()
    gpu: Mapped[Gpu] = relationship()
    trials: Mapped[list["Trial"]] = relationship(back_populates="study", order_by="Trial.id")


class Trial(Base):
    __tablename__ = "dittune_trial"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("dittune_study.id"), index=True)
    optuna_number: Mapped[int | None] = mapped_column(Integer)
    # complete | pruned (memory model) | oom | timeout | failed | confirmed
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    flags: Mapped[dict[str, Any]] = mapped_column()  # every registry flag, typed
    argv: Mapped[str] = mapped_column(Text)  # non-default engine flags, registry order
    manifest: Mapped[dict[str, Any]] = mapped_column(default=dict)
    stage_times: Mapped[dict[str, Any]] = mapped_column(default=dict)  # seconds per stage
    step_times: Mapped[list[Any]] = mapped_column(default=list)  # seconds per measured step
    step_median_s: Mapped[float | None] = mapped_column(Float)
    step_spread: Mapped[float | None] = mapped_column(Float)  # (p90 - p10) / median of the step times
    latency_s: Mapped[float | None] = mapped_column(Float)  # encode + steps x median step + decode
    peak_vram_bytes: Mapped[int | None] = mapped_column(BigInteger)
    predicted_vram_bytes: Mapped[int | None] = mapped_column(BigInteger)
    cold_start_s: Mapped[float | None] = mapped_column(Float)
    stderr_tail: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)

    study: Mapped[Study] = relationship(back_populates="trials")


class Lease(Base):
    """A configuration being measured (purpose "trial") or confirmed ("confirm") by one process:
    while its heartbeat is fresh no other process runs it; an expired lease is swept by whoever
    sees it first and its configuration asked again. Deleted in the transaction that records the
    trial, so a configuration is at every moment leased, recorded, or free."""

    __tablename__ = "dittune_lease"
    __table_args__ = (UniqueConstraint("study_id", "purpose", "argv"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("dittune_study.id"), index=True)
    purpose: Mapped[str] = mapped_column(String(16))  # trial | confirm
    argv: Mapped[str] = mapped_column(Text)
    optuna_number: Mapped[int | None] = mapped_column(Integer)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)  # Optuna params, to ask it again when swept
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime)  # database clock, UTC
    heartbeat_at: Mapped[dt.datetime] = mapped_column(DateTime)  # database clock, UTC


class Claim(Base):
    """A one-time job of a study done by whichever process inserts its row first (seeding)."""

    __tablename__ = "dittune_claim"

    study_id: Mapped[int] = mapped_column(ForeignKey("dittune_study.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
