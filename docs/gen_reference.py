"""The generated pages of the documentation site, rebuilt by ``mkdocs build`` (mkdocs-gen-files runs this script).

- ``reference/recipe.md``: every recipe key, section by section, from the pydantic schema
  (``diffcxr_aug.config.Recipe`` and the ``diffcxr_aug.generator.settings`` models it holds): type, default and
  description.
- ``reference/cli.md``: every command of ``diffcxr-aug`` with its arguments and options, from the typer app.
- ``reference/api.md``: mkdocstrings directives for the names ``diffcxr_aug`` exports (its lazy-import table).
- ``changelog.md``: the repository's ``CHANGELOG.md``.
- Pages holding ``<!-- include: results/RECORD/FILE.md -->`` get that record's text in place of the marker
  (``...FILE.md#Heading``: one section; ``...FILE.md#(lead)``: the text before its first section), so a results
  page shows the table its run wrote, not a copy of it.

``tests/test_docs.py`` imports this file and checks the recipe and CLI references against the schema and the app.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
INCLUDE = re.compile(r"^<!-- include: (?P<path>[^#\s]+)(?:#(?P<heading>[^>]+?))? -->$", re.M)
# Pages the site never renders (mkdocs.yml's exclude_docs) need no include pass.
NOT_PAGES: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------------- markdown helpers
def cell(text: str) -> str:
    """Text for one table cell: one line, pipes escaped, ``<`` escaped outside code spans (``generator-seed<S>/``
    would otherwise be read as an HTML tag)."""
    text = " ".join(str(text).split())
    # Docstrings are reStructuredText-flavoured: ``code`` and :class:`Name` become Markdown code spans.
    text = re.sub(r":\w+:`", "`", text.replace("``", "`"))
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # even parts are outside code spans
        parts[i] = parts[i].replace("<", "&lt;").replace("|", "\\|")
    return "`".join(parts)


# ------------------------------------------------------------------------------------------------- recipe reference
def _constraints(metadata: list[Any]) -> str:
    symbols = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "length ≥", "max_length": "length ≤"}
    found = []
    for item in metadata:
        for attr, symbol in symbols.items():
            value = getattr(item, attr, None)
            if value is not None:
                found.append(f"{symbol} {value}")
    return ", ".join(found)


def type_text(annotation: Any, models: dict[type, str] | None = None) -> str:
    """A field's type as a reader of a YAML file needs it: ``auto``, ``no``, ``bf16`` or ``fp16``; list of int; ..."""
    from pydantic import BaseModel

    models = models or {}
    if annotation is type(None):
        return "null"
    origin = get_origin(annotation)
    if origin is Annotated:
        inner, *extra = get_args(annotation)
        metadata = [m for e in extra for m in (getattr(e, "metadata", None) or [e])]
        bound = _constraints(metadata)
        return type_text(inner, models) + (f" ({bound})" if bound else "")
    if origin is Literal:
        values = [f"`{v}`" for v in get_args(annotation)]
        return "one of " + ", ".join(values) if len(values) > 1 else values[0]
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_text(a, models) for a in get_args(annotation))
    if origin in (list, tuple, set):
        args = [a for a in get_args(annotation) if a is not Ellipsis]
        if origin is tuple and len(args) > 1 and len(set(args)) == 1:
            return f"list of {len(args)} {type_text(args[0], models)}"
        return "list of " + " or ".join(type_text(a, models) for a in dict.fromkeys(args)) if args else "list"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            anchor = models.get(annotation)
            return f"[{annotation.__name__}](#{anchor})" if anchor else annotation.__name__
        if issubclass(annotation, Path):
            return "path"
        return {"str": "string", "int": "int", "float": "float", "bool": "bool"}.get(
            annotation.__name__, annotation.__name__
        )
    return str(annotation).replace("typing.", "")


def default_text(field: Any) -> str:
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, dict) and len(value) > 4:
        return f"{len(value)} entries (see the class)"
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    return f"`{text}`"


def _source_comments(cls: type) -> dict[str, str]:
    """Comments that sit on or directly above a field in the class source: the description of a field that has none
    (``ClassifierSection.synthetic`` is documented by the comment block above it)."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments: dict[str, str] = {}
    body = ast.parse(source).body[0]
    for node in getattr(body, "body", []):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        first = lines[node.lineno - 1]
        above: list[str] = []
        i = node.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#"):
            above.insert(0, lines[i].strip().lstrip("#").strip())
            i -= 1
        inline = first.split("#", 1)[1].strip() if "  # " in first else ""
        text = " ".join(part for part in (" ".join(above), inline) if part)
        if text:
            comments[node.target.id] = text
    return comments


def _docstring_attributes(cls: type) -> dict[str, str]:
    """``Attributes:`` entries of a Google-style class docstring (``KnowledgeTemplates`` documents its keys there)."""
    doc = inspect.getdoc(cls) or ""
    match = re.search(r"^Attributes:\n(?P<body>(?:[ \t]+.*\n?|\n)+)", doc, re.M)
    if not match:
        return {}
    entries: dict[str, str] = {}
    current = None
    for line in match.group("body").splitlines():
        entry = re.match(r"^    (\w+): (.*)$", line)
        if entry:
            current = entry.group(1)
            entries[current] = entry.group(2)
        elif current and line.strip():
            entries[current] += " " + line.strip()
    return entries


def _first_paragraph(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return " ".join(doc.split("\n\n")[0].split())


def _section_model(annotation: Any) -> type | None:
    from pydantic import BaseModel

    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def recipe_sections() -> list[tuple[str, type]]:
    """(dotted key, model) of every section the reference documents: the recipe's top level, each section, and the
    models nested in a section (``generator.dkim_templates``)."""
    from diffcxr_aug.config import Recipe

    sections: list[tuple[str, type]] = [("", Recipe)]
    for name, field in Recipe.model_fields.items():
        model = _section_model(field.annotation)
        if model is None:
            continue
        sections.append((name, model))
        for sub_name, sub_field in model.model_fields.items():
            sub_model = _section_model(sub_field.annotation)
            if sub_model is not None:
                sections.append((f"{name}.{sub_name}", sub_model))
    return sections


def _anchor(key: str) -> str:
    return "top-level" if not key else key.replace(".", "")


def recipe_reference() -> str:
    """The recipe reference page: one table per section, every key with its type, default and description."""
    sections = recipe_sections()
    anchors = {model: _anchor(key) for key, model in sections if key}
    out = [
        "# Recipe reference",
        "",
        "Generated from the pydantic schema at every build of this site (`diffcxr_aug.config.Recipe` and the settings "
        "models it holds; the `vae`, `filter`, `generator` and `synthesize` sections are the library's own "
        "`diffcxr_aug.generator.settings` classes). A key's description is its `Field(description=...)`, or else "
        "the comment beside it in the source. How recipes are layered (YAML, `--set`, the resolved recipe): "
        "[Recipes](../guides/recipes.md).",
        "",
        "Unknown keys are errors that name the key and the keys allowed there. `null` is YAML's None: for most "
        'generator keys it means "the registered `generator.config` decides".',
        "",
    ]
    for key, model in sections:
        fields = model.model_fields
        if not key:
            fields = {n: f for n, f in fields.items() if _section_model(f.annotation) is None}
            title, what = "Top level", "The keys outside any section."
        else:
            title = f"`{key}`"
            what = _first_paragraph(model)
        comments = {**_docstring_attributes(model), **_source_comments(model)}
        out += [f"## {title} {{#{_anchor(key)}}}", ""]
        if key:
            out += [f"`{model.__module__}.{model.__name__}`: {cell(what)}", ""]
        else:
            out += [what, ""]
        out += ["| key | type | default | description |", "|---|---|---|---|"]
        for name, field in fields.items():
            kind = type_text(field.annotation, anchors)
            bound = _constraints(field.metadata)
            if bound:
                kind += f" ({bound})"
            description = field.description or comments.get(name, "")
            out.append(f"| `{name}` | {cell(kind)} | {cell(default_text(field))} | {cell(description)} |")
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- CLI reference
# The command line's order of work; a command added later lands after these, so none goes missing.
CLI_ORDER = (
    "prepare",
    "label",
    "train-vae",
    "filter",
    "train-generator",
    "synthesize",
    "train-classifier",
    "evaluate",
)


def _help_cell(text: str) -> str:
    """A help text for a table cell. Click's ``[default: x] [required]`` would read as a Markdown reference link
    (autorefs then looks for a target named ``required``), so its brackets are escaped."""
    return cell(text).replace("[", "\\[").replace("]", "\\]")


def cli_commands() -> list[str]:
    import typer

    from diffcxr_aug.cli import app

    group = typer.main.get_command(app)
    ctx = typer.Context(group, info_name="diffcxr-aug")
    names = list(group.list_commands(ctx))
    rank = {name: i for i, name in enumerate(CLI_ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n == "run", n))


def cli_reference() -> str:
    """The CLI reference page: each command's help, usage, arguments and options, as ``--help`` prints them."""
    import typer

    from diffcxr_aug.cli import app

    group = typer.main.get_command(app)
    root = typer.Context(group, info_name="diffcxr-aug")
    out = [
        "# Command-line reference",
        "",
        "Generated from the typer app (`diffcxr_aug.cli.app`) at every build of this site: what `diffcxr-aug "
        "COMMAND --help` prints. Every step command takes `--recipe R`, whose section for that step supplies the "
        "defaults; the options given override them ([Recipes](../guides/recipes.md), "
        "[recipe keys](recipe.md)). Bad input ends with exit code 2 and a one-line reason.",
        "",
        "```console",
        "$ diffcxr-aug " + " ".join(group.collect_usage_pieces(root)),
        "```",
        "",
        "| option | |",
        "|---|---|",
    ]
    for param in group.get_params(root):
        record = param.get_help_record(root)
        if record:
            out.append(f"| {cell(f'`{record[0]}`')} | {_help_cell(record[1])} |")
    out.append("")
    for name in cli_commands():
        command = group.get_command(root, name)
        ctx = typer.Context(command, info_name=name, parent=root)
        out += [f"## `{name}`", ""]
        help_text = inspect.cleandoc(command.help or "")
        out += [help_text.replace("\b\n", ""), ""] if help_text else []
        out += ["```console", f"$ diffcxr-aug {name} " + " ".join(command.collect_usage_pieces(ctx)), "```", ""]
        rows = {"argument": [], "option": []}
        for param in command.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None and param.param_type_name in rows:
                rows[param.param_type_name].append(record)
        for kind, records in rows.items():
            if records:
                out += [f"| {kind} | |", "|---|---|"]
                out += [f"| {cell(f'`{opts}`')} | {_help_cell(text)} |" for opts, text in records]
                out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- API reference
API_GROUPS = (
    ("The whole loop", ("run_experiment", "load_recipe", "Recipe")),
    (
        "One step each",
        ("prepare_dataset", "run_filter", "train_generator", "synthesize", "train_classifier", "evaluate"),
    ),
    ("Models", ("DiffCXRPipeline", "LatentNoiseFilter")),
    ("Settings", ("VAESettings", "FilterSettings", "GeneratorSettings", "SynthesisSettings")),
)
# Classes whose keys the recipe reference lists (mkdocstrings would print each pydantic Field(...) expression).
SETTINGS_LIKE = ("Recipe", "VAESettings", "FilterSettings", "GeneratorSettings", "SynthesisSettings")


def api_names() -> dict[str, str]:
    """name -> defining module, for every entry point ``diffcxr_aug`` exports (its lazy-import table)."""
    import diffcxr_aug

    return dict(diffcxr_aug._LAZY)


def api_reference() -> str:
    names = api_names()
    placed = {n for _, group in API_GROUPS for n in group}
    groups = [*API_GROUPS, ("Other", tuple(n for n in names if n not in placed))]
    section_of = {model.__name__: key for key, model in recipe_sections() if key and "." not in key}
    out = [
        "# Python API",
        "",
        "Generated at every build from the docstrings (mkdocstrings) of the names the package exports. Import them "
        "from the package root; each is imported on first use, so `import diffcxr_aug` stays light:",
        "",
        "```python",
        "from diffcxr_aug import (",
        *textwrap.wrap(", ".join(names) + ",", 100, initial_indent="    ", subsequent_indent="    "),
        ")",
        "```",
        "",
        "The command line is a thin layer over these functions ([command-line reference](cli.md)); a recipe's "
        "sections are the settings classes ([recipe keys](recipe.md)).",
        "",
    ]
    for title, group in groups:
        members = [n for n in group if n in names]
        if not members:
            continue
        out += [f"## {title}", ""]
        for name in members:
            out.append(f"::: {names[name]}.{name}")
            if name == "DiffCXRPipeline":
                out += ["    options:", "      members: [__call__, encode_report, encode_knowledge, knowledge_text]"]
            elif name in SETTINGS_LIKE:
                out += ["    options:", "      members: false"]
            out.append("")
            if name in SETTINGS_LIKE:
                key = section_of.get(name)
                target = f"recipe.md#{_anchor(key)}" if key else "recipe.md"
                what = f"the recipe's `{key}` section" if key else "every section"
                out += [f"Keys, types, defaults: [{what}]({target}).", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------- includes
LEAD = "(lead)"  # PATH#(lead): the text between a file's title and its first section


def _section(text: str, heading: str) -> str:
    lines = text.splitlines()
    if heading == LEAD:
        body = re.sub(r"\A# .*\n+", "", text)
        return re.split(r"^#+\s", body, maxsplit=1, flags=re.M)[0].strip()
    for i, line in enumerate(lines):
        match = re.match(r"^(#+)\s+(.*?)\s*$", line)
        if match and match.group(2) == heading:
            level = len(match.group(1))
            body = []
            for following in lines[i + 1 :]:
                deeper = re.match(r"^(#+)\s", following)
                if deeper and len(deeper.group(1)) <= level:
                    break
                body.append(following)
            return "\n".join(body).strip()
    raise KeyError(f"no heading {heading!r}")


def expand_includes(text: str, page: Path) -> str:
    """Replace each ``<!-- include: PATH[#Heading] -->`` (PATH relative to ``docs/``) with that file's text (less
    its title) or that section's body. A missing file or heading stops the build: the page would lie otherwise."""

    def replace(match: re.Match) -> str:
        source = DOCS / match.group("path")
        if not source.is_file():
            raise FileNotFoundError(f"{page}: include of {match.group('path')}: no such file under docs/")
        content = source.read_text(encoding="utf-8")
        if match.group("heading"):
            try:
                return _section(content, match.group("heading"))
            except KeyError as err:
                raise KeyError(f"{page}: include of {match.group(0)}: {err}") from None
        return re.sub(r"\A# .*\n+", "", content).strip()

    return INCLUDE.sub(replace, text)


def pages_with_includes() -> list[Path]:
    """The hand-written pages holding include markers; the records under ``docs/results/RECORD/`` are left as run."""
    pages = []
    for path in sorted(DOCS.rglob("*.md")):
        parts = path.relative_to(DOCS).parts
        if path.name in NOT_PAGES or (parts[0] == "results" and len(parts) > 2):
            continue
        if INCLUDE.search(path.read_text(encoding="utf-8")):
            pages.append(path)
    return pages


# -------------------------------------------------------------------------------------------------------------- main
def main() -> None:
    import mkdocs_gen_files

    pages = {
        "reference/recipe.md": recipe_reference(),
        "reference/cli.md": cli_reference(),
        "reference/api.md": api_reference(),
        "changelog.md": (REPO / "CHANGELOG.md").read_text(encoding="utf-8"),
    }
    for page in pages_with_includes():
        rel = page.relative_to(DOCS).as_posix()
        pages[rel] = expand_includes(page.read_text(encoding="utf-8"), page)
        mkdocs_gen_files.set_edit_path(rel, rel)
    for rel, text in pages.items():
        with mkdocs_gen_files.open(rel, "w") as handle:
            handle.write(text)


if __name__ in ("__main__", "<run_path>"):  # mkdocs-gen-files runs this file with runpy.run_path
    main()
