"""Software versions that key results: after an upgrade, older results are shown as stale."""

from __future__ import annotations

from importlib import metadata

import torch

from dittune import __version__
from dittune.engine.flags import registry_hash


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def current_versions(driver: str | None = None) -> dict[str, str | None]:
    return {
        "dittune": __version__,
        "registry_hash": registry_hash(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "driver": driver,
    }


def staleness_keys() -> dict[str, str | None]:
    """What a machine that only reads results compares against (it may have no GPU driver)."""
    v = current_versions()
    return {k: v[k] for k in ("dittune", "registry_hash", "torch")}
