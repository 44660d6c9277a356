"""The README's two commands exist and CI runs the test one verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands():
    text = (ROOT / "README.md").read_text()
    return [line.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()
            if line.strip()]


def test_readme_has_main_job_and_test_commands():
    commands = _commands()
    assert any(c.endswith("normkit train") and "pip install -q torch==2.13.0" in c for c in commands)
    assert any(c.endswith("python -m pytest -q") for c in commands)
    for command in commands:
        # torch first, pinned, so pip never pulls a CUDA build
        assert command.index("torch==2.13.0") < command.index("-e \".")


def test_ci_runs_the_readme_test_command():
    test_command = next(c for c in _commands() if c.endswith("python -m pytest -q"))
    assert test_command in (ROOT / ".ci" / "run").read_text()
