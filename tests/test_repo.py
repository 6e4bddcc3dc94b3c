"""The README's commands and CI stay in step."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_blocks():
    return re.findall(r"```\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)


def test_ci_runs_exactly_the_readme_test_command():
    test_cmd = next(b for b in _readme_blocks() if "pytest" in b and "\n" not in b.strip())
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmd.strip() in ci_lines
    assert test_cmd.strip().startswith("pip install torch==2.13.0")


def test_readme_main_command_installs_torch_first():
    main = _readme_blocks()[0].strip()
    assert main.startswith("pip install torch==2.13.0 && pip install -e .")
