"""The documentation site and the Python API: the site builds with ``mkdocs build --strict``, its generated references
cover every recipe key and every command, the entry points import from the package root with a docstring each, and
the front page's links and Python example stay true."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from tests.conftest import REPO_ROOT

DOCS = REPO_ROOT / "docs"
README = REPO_ROOT / "README.md"
CONSTANTS = {"CHEXPERT_LABELS", "NIH_LABELS", "__version__"}


def _gen_reference():
    """``docs/gen_reference.py``, imported as a module (mkdocs-gen-files runs it as a script)."""
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model_of(annotation):
    """The pydantic model in a field's annotation (``AblationSection | None`` -> ``AblationSection``), or None."""
    from pydantic import BaseModel

    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _sections_of(markdown: str) -> dict[str, str]:
    """``## heading`` -> the text under it, for the generated pages."""
    parts = re.split(r"^## (.+?)(?: \{#[^}]*\})?$", markdown, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


# --------------------------------------------------------------------------------------------- generated references
def test_recipe_reference_lists_every_key_of_every_section():
    """Every field of the recipe schema, section by section (and the models nested in a section, such as
    ``generator.dkim_templates``), has its row in the table of its own section."""
    from diffcxr_aug.config import Recipe

    sections = _sections_of(_gen_reference().recipe_reference())
    expected: dict[str, list[str]] = {"Top level": []}
    for name, field in Recipe.model_fields.items():
        model = _model_of(field.annotation)
        if model is None:
            expected["Top level"].append(name)
            continue
        expected[f"`{name}`"] = list(model.model_fields)
        for sub_name, sub_field in model.model_fields.items():
            sub_model = _model_of(sub_field.annotation)
            if sub_model is not None:
                expected[f"`{name}.{sub_name}`"] = list(sub_model.model_fields)
    assert set(expected) <= set(sections), f"sections missing: {set(expected) - set(sections)}"
    for section, keys in expected.items():
        missing = [key for key in keys if f"| `{key}` |" not in sections[section]]
        assert not missing, f"{section}: no row for {missing}"
    # the library's own settings classes are the vae / filter / generator / synthesize sections
    assert "diffcxr_aug.generator.settings.GeneratorSettings" in sections["`generator`"]


def test_recipe_reference_gives_types_and_defaults():
    from diffcxr_aug.generator.settings import GeneratorSettings

    generator = _sections_of(_gen_reference().recipe_reference())["`generator`"]
    row = next(line for line in generator.splitlines() if line.startswith("| `max_steps` |"))
    assert "int" in row and f"`{GeneratorSettings().max_steps}`" in row
    row = next(line for line in generator.splitlines() if line.startswith("| `mixed_precision` |"))
    assert "`bf16`" in row and "`auto`" in row  # a Literal's choices, and its default


def test_cli_reference_lists_every_command_and_option():
    import typer

    from diffcxr_aug.cli import app

    group = typer.main.get_command(app)
    ctx = typer.Context(group, info_name="diffcxr-aug")
    sections = _sections_of(_gen_reference().cli_reference())
    for name in group.list_commands(ctx):
        assert f"`{name}`" in sections, f"no section for the command {name}"
        command = group.get_command(ctx, name)
        options = [opt for param in command.params if not getattr(param, "hidden", False) for opt in param.opts]
        missing = [opt for opt in options if opt.startswith("-") and opt not in sections[f"`{name}`"]]
        assert not missing, f"{name}: options missing from the reference: {missing}"


def test_api_reference_documents_every_export():
    import diffcxr_aug

    page = _gen_reference().api_reference()
    for name, module in diffcxr_aug._LAZY.items():
        assert f"::: {module}.{name}\n" in page


# ----------------------------------------------------------------------------------------------------- Python API
@pytest.mark.parametrize("name", sorted(set(__import__("diffcxr_aug").__all__) - CONSTANTS))
def test_each_entry_point_imports_from_the_root_with_a_docstring(name):
    import diffcxr_aug

    namespace: dict = {}
    exec(f"from diffcxr_aug import {name}", namespace)
    obj = namespace[name]
    # the API page's mkdocstrings path is the module that defines the object
    assert obj.__module__ == diffcxr_aug._LAZY[name]
    own_doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    assert own_doc and own_doc.strip(), f"{name} has no docstring of its own"


def test_the_root_package_stays_light_and_names_what_it_lacks():
    """``import diffcxr_aug`` loads neither torch nor the layers; an unknown name says what the package exports."""
    code = (
        "import json, sys, diffcxr_aug\n"
        "heavy = [m for m in ('torch', 'diffcxr_aug.generator', 'diffcxr_aug.config') if m in sys.modules]\n"
        "print(json.dumps(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
    import diffcxr_aug

    with pytest.raises(AttributeError, match="it exports: .*DiffCXRPipeline"):
        diffcxr_aug.DiffCXRPipelin  # noqa: B018
    assert set(diffcxr_aug.__all__) == set(diffcxr_aug._LAZY) | CONSTANTS


# ---------------------------------------------------------------------------------------------------------- the site
@pytest.mark.integration
def test_the_site_builds_strict(tmp_path):
    """``mkdocs build --strict``: every link between pages resolves, every include marker finds its record, and the
    generated references render (mkdocstrings reads every exported docstring)."""
    env = {**os.environ, "DISABLE_MKDOCS_2_WARNING": "true", "NO_MKDOCS_2_WARNING": "1"}
    mkdocs = Path(sys.executable).parent / "mkdocs"
    site = tmp_path / "site"
    result = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(site)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for page in ("reference/recipe", "reference/cli", "reference/api", "results/headline", "changelog"):
        assert (site / page / "index.html").is_file(), page
    api = (site / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    assert "DiffCXRPipeline" in api and "train_generator" in api
    headline = (site / "results" / "headline" / "index.html").read_text(encoding="utf-8")
    assert "include:" not in headline  # the record's tables replaced the markers


def test_every_include_marker_names_a_record_that_exists():
    gen = _gen_reference()
    pages = gen.pages_with_includes()
    assert pages, "no page includes a record"
    for page in pages:
        text = gen.expand_includes(page.read_text(encoding="utf-8"), page)
        assert "<!-- include:" not in text


# ------------------------------------------------------------------------------------------------- the front page
def test_the_front_pages_links_resolve():
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    missing = [link for link in links if "://" not in link and not (REPO_ROOT / link).exists()]
    assert not missing, missing


def test_the_front_page_is_a_page_not_a_notebook():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 200


@pytest.mark.usefixtures("one_thread")
def test_the_front_pages_python_example_runs_on_a_tiny_trained_pipeline(tmp_path, monkeypatch):
    """The front page's Python example, as written, on a tiny generator trained for one step in its folder."""
    import torch

    from diffcxr_aug import GeneratorSettings, train_generator
    from tests.conftest import make_tiny_manifest

    code = re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S).group(1)
    folder = re.search(r'from_pretrained\("([^"]+)"\)', code).group(1)
    data = make_tiny_manifest(tmp_path / "data").parent
    settings = GeneratorSettings(
        config="tiny", max_steps=1, batch_size=4, lr_warmup_steps=1, sample_every=10, checkpoint_every=10
    )
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    train_generator(data, tmp_path / folder, settings, device="cpu")
    exec(compile(code, str(README), "exec"), {})
    saved = re.search(r'\.save\("([^"]+)"\)', code).group(1)
    assert (tmp_path / saved).stat().st_size > 0
