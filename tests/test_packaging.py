"""Every package folder and data file really ends up in the wheel (no module silently missing)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"dittune": "dittune", "engine": "dittune/engine", "kernels": "dittune/kernels", "studies": "dittune/studies",
          "tuner": "dittune/tuner", "db": "dittune/db"}


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True)
    (whl,) = out.glob("dittune-*.whl")
    return set(zipfile.ZipFile(whl).namelist())


def _source_files(folder: str, patterns=("*.py",)):
    base = ROOT / folder
    for pattern in patterns:
        for p in base.rglob(pattern):
            if "__pycache__" not in p.parts:
                yield p.relative_to(base)


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_every_module_and_data_file_is_in_the_wheel(wheel_names, folder):
    files = list(_source_files(folder, ("*.py", "*.json", "*.toml")))
    assert any(f.suffix == ".py" for f in files)
    missing = [str(f) for f in files if f"{LAYERS[folder]}/{f.as_posix()}" not in wheel_names]
    assert not missing, f"not packaged from {folder}/: {missing}"


def test_console_script_declared(wheel_names):
    ep = next(n for n in wheel_names if n.endswith("entry_points.txt"))
    assert ep


def test_installed_namespace_imports():
    import importlib

    for name in ("dittune.engine", "dittune.kernels", "dittune.studies", "dittune.tuner", "dittune.db", "dittune.engine.models"):
        importlib.import_module(name)
