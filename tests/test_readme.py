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


def test_readme_headline_tables_are_those_of_the_committed_results():
    """The front page's tables are what the headline run's own results.csv gives (the recipe scores against the
    phantom world's truth), so a rerun of the recipe, which rewrites its summary from results.csv, reproduces them."""
    import yaml

    from diffcxr_aug.augment.results import read_results, scored_view
    from diffcxr_aug.augment.summary import headline_markdown

    record = REPO_ROOT / "docs" / "results" / "augment_phantom128"
    recipe = yaml.safe_load((REPO_ROOT / "recipes" / "augment-phantom128.yaml").read_text())
    results = read_results(record / "results.csv")
    assert {"generated", "ceiling"} == set(results["source"]) - {"none"}
    assert set(results["model"]) == set(recipe["classifier"]["model"])
    assert set(results["seed"]) == set(recipe["classifier"]["seeds"])
    assert set(results["generator_seed"].dropna()) == set(recipe["generator"]["seeds"])
    tables = headline_markdown(scored_view(results, recipe["classifier"]["metric"]))
    readme = (REPO_ROOT / "README.md").read_text()
    assert tables.strip() in readme
    summary = (record / "summary.md").read_text()
    assert tables.strip() in summary
