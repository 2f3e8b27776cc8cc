"""The README's two quick-start commands are the ones CI and users actually run."""

from __future__ import annotations

import re

from tests.conftest import REPO_ROOT


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_opens_with_two_commands_and_ci_runs_the_second():
    blocks = _bash_blocks((REPO_ROOT / "README.md").read_text())
    install_and_run, install_and_test = blocks[0], blocks[1]
    assert "pip install" in install_and_run and "diffcxr-aug run recipes/" in install_and_run
    assert "pip install" in install_and_test and "pytest" in install_and_test
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert install_and_test in ci.splitlines()


def test_readme_recipe_exists():
    blocks = _bash_blocks((REPO_ROOT / "README.md").read_text())
    recipe = re.search(r"diffcxr-aug run (\S+)", blocks[0]).group(1)
    assert (REPO_ROOT / recipe).is_file()


def test_ci_runs_the_first_commands_install_without_extras():
    """The README's first command installs no extras; CI repeats that install in its own venv and runs a recipe."""
    blocks = _bash_blocks((REPO_ROOT / "README.md").read_text())
    install = blocks[0].split(" && diffcxr-aug run")[0]
    assert "[" not in install  # no extras
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert install.replace(".venv", ".venv-core") + " && diffcxr-aug run recipes/smoke.yaml" in ci
