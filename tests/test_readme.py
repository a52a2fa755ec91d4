"""The README's set-up and test commands are the ones CI runs, so a missing install step
fails CI instead of a new user."""

import re

from conftest import REPO_ROOT


def readme_code_blocks() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_set_up_then_test_command_exactly():
    blocks = readme_code_blocks()
    setup, tests = blocks[0], blocks[1]
    # The pinned versions (tests/test_locks.py), the project and its test tools.
    assert setup == 'python -m pip install -c requirements/linux-cpu.txt -e ".[dev]"'
    assert tests == "python -m pytest"
    ci = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()]
    assert setup in ci and tests in ci
    assert ci.index(setup) < ci.index(tests)
