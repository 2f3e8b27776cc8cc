"""The house rules a later change could quietly break: imports go one way with no cycles (import-linter), no module
grows past about 500 lines without saying why, and importing the package raises no deprecation of its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "diffcxr_aug"
MAX_LINES = 520  # "about 500"
# A module past the limit says why in its docstring, in these words.
REASON = "past 500 lines because"


def test_imports_keep_their_layers_and_have_no_cycles():
    """``lint-imports`` with the repository's .importlinter: cli -> augment -> config -> evaluation -> generator |
    classifiers -> data -> the leaf of shared types, and no import cycle between the modules of a package."""
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint)], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_layers_contract(tmp_path):
    """The contract can fail: a data module importing the recipe schema is reported (checked on a copy)."""
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(PACKAGE, copy / "diffcxr_aug", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / ".importlinter", copy / ".importlinter")
    (copy / "diffcxr_aug" / "data" / "upward.py").write_text("from diffcxr_aug.config import Recipe\n")
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run(
        [str(lint)], cwd=copy, capture_output=True, text=True, env={"PYTHONPATH": str(copy), "PATH": ""}
    )
    assert result.returncode != 0 and "diffcxr_aug.data.upward -> diffcxr_aug.config" in result.stdout


def test_no_module_is_long_without_a_reason():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").count("\n")
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        if lines > MAX_LINES and REASON not in " ".join(doc.split()):
            long.append(f"{path.relative_to(REPO_ROOT)} ({lines} lines)")
    assert not long, f"split these by concern, or say in the module docstring why each runs {REASON} ...: {long}"


def test_importing_the_command_line_raises_no_deprecation():
    errors = ["-W", "error::DeprecationWarning", "-W", "error::FutureWarning"]
    result = subprocess.run(
        [sys.executable, *errors, "-c", "import diffcxr_aug.cli"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
