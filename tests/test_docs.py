"""The documentation site builds offline with ``mkdocs build --strict``, and its references cannot go stale.

The staleness checks read the code, not a list kept here: every field of the study-file schema (plain
and ``kind: compare``), every option of every dataset, model and method (with its default), and every
subcommand and flag of the ``widthlab`` parser must appear in the pages that document them. A new key
added to the code without a line in the docs fails here.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
STUDY_REF = DOCS / "reference" / "study-files.md"
CLI_REF = DOCS / "reference" / "cli.md"
METHOD_GUIDES = {"widesparse": DOCS / "guides" / "widesparse.md", "adaptive": DOCS / "guides" / "adaptive.md",
                 "expanding": DOCS / "guides" / "expanding.md"}


# ------------------------------------------------------------------------------------------- helpers


def sections(path: Path, level: int) -> dict[str, str]:
    """Markdown headings of ``level`` (``###`` = 3) -> the text up to the next heading of that level or
    above; the heading's first backticked word is the key (``### `digits` ...`` -> ``digits``)."""
    out: dict[str, str] = {}
    key, buf = None, []
    for line in path.read_text().splitlines():
        m = re.match(r"^(#+)\s+(.*)$", line)
        if m and len(m.group(1)) <= level:
            if key is not None:
                out[key] = "\n".join(buf)
            key, buf = None, []
            if len(m.group(1)) == level:
                word = re.search(r"`([^`]+)`", m.group(2))
                key = word.group(1) if word else m.group(2).strip()
            continue
        buf.append(line)
    if key is not None:
        out[key] = "\n".join(buf)
    return out


def table_rows(text: str) -> dict[str, list[str]]:
    """``| `key` | cell | ... |`` rows of the markdown tables in ``text``: key -> the other cells."""
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^\|\s*`([^`]+)`\s*\|(.*)\|\s*$", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in m.group(2).split("|")]
    return rows


def yaml_default(v: Any) -> str:
    """A default as the docs write it: YAML spelling (``null``, ``true``, ``[16, 16, 16]``)."""
    if v is inspect.Parameter.empty:
        return "required"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(yaml_default(x) for x in v) + "]"
    if isinstance(v, float):
        return re.sub(r"e([+-])0*(\d)", r"e\1\2", repr(v))  # 1e-08 -> 1e-8
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {yaml_default(x)}" for k, x in v.items()) + "}"
    if v == "":
        return '""'
    return str(v)


def documented_default(cell: str) -> str:
    return cell.replace("`", "").strip()


def check_options(where: str, text: str, options: dict[str, Any]) -> list[str]:
    """Problems: an option without a table row in ``text``, or whose row gives another default."""
    rows = table_rows(text)
    problems = []
    for key, default in options.items():
        if key not in rows:
            problems.append(f"{where}: option {key!r} has no table row")
        elif documented_default(rows[key][0]) != yaml_default(default):
            problems.append(f"{where}: option {key!r}: docs say default {rows[key][0]!r}, the code has "
                            f"{yaml_default(default)!r}")
    return problems


def schema_fields(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> default of every field of a pydantic schema, nested sections included."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        union = typing.get_origin(ann) in (typing.Union, types.UnionType)
        inner = [a for a in typing.get_args(ann) if union and isinstance(a, type)
                 and issubclass(a, BaseModel)]
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(schema_fields(ann, key + "."))
        elif inner:  # an optional section (``search: null`` or ``search: {...}``): the key and its fields
            out[key] = field.get_default(call_default_factory=True)
            out.update(schema_fields(inner[0], key + "."))
        else:
            out[key] = inspect.Parameter.empty if field.is_required() else field.get_default(
                call_default_factory=True)
    return out


# ----------------------------------------------------------------------------------------- the build


def _have_docs_tools() -> str | None:
    for mod in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(mod) is None:
            return mod
    return None


def test_site_builds_strict_and_offline(tmp_path):
    """``mkdocs build --strict`` (any warning fails: a broken link, a docstring griffe cannot read, a
    missing page) with the network unreachable, and the pages fetch nothing from it when viewed."""
    missing = _have_docs_tools()
    if missing:
        pytest.skip(f"{missing} is not installed: install the docs extra "
                    "(.venv/bin/pip install -c constraints.txt -e '.[docs]'; scripts/setup.sh does)")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "http_proxy": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                          "-d", str(site)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    pages = list(site.rglob("*.html"))
    assert len(pages) > 15
    for page in pages:
        html = page.read_text(errors="replace")
        assert "fonts.googleapis.com" not in html and "fonts.gstatic.com" not in html, page
    # Every API page rendered the objects it names (an unresolvable ``:::`` identifier fails the
    # build above; this checks the pages are not empty shells).
    api = (site / "api" / "widesparse" / "index.html").read_text()
    assert "allocate" in api and "sparsify" in api
    gallery = (site / "examples" / "index.html").read_text()
    for script in sorted((ROOT / "examples").glob("[!_]*.py")):
        assert f'id="{script.stem}"' in gallery, f"{script.name} is not in the examples gallery"


def test_every_page_is_in_the_nav():
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    cfg = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_Loader)
    named: list[str] = []

    def walk(node):
        if isinstance(node, str):
            named.append(node)
        elif isinstance(node, list):
            for n in node:
                walk(n)
        elif isinstance(node, dict):
            for v in node.values():
                walk(v)

    walk(cfg["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(named) == pages
    assert cfg["theme"]["font"] is False  # Material's default loads Google Fonts when a page is viewed


# -------------------------------------------------------------------------------- study-file reference


def test_study_reference_lists_every_schema_key_with_its_default():
    """Every key of a plain study file (``StudySpec``, nested ``train.optimizer``/``train.schedule``
    included) and of a ``kind: compare`` file has a table row with the code's default."""
    from widthlab.studies.compare import CompareSpec, MethodEntry, TaskEntry
    from widthlab.studies.schema import StudySpec

    secs = sections(STUDY_REF, 2)
    problems = []
    for title, schema in (("study", StudySpec), ("compare", CompareSpec), ("task", TaskEntry),
                          ("method-entry", MethodEntry)):
        assert title in secs, f"{STUDY_REF.name}: no '## `{title}` ...' section"
        fields = schema_fields(schema)
        problems += check_options(f"{STUDY_REF.name} section {title}", secs[title], fields)
    assert not problems, "\n".join(problems)


def test_study_reference_documents_every_dataset_and_option():
    """Each dataset has a ``### `name` `` section whose table lists every option it takes (the common
    ones are one table of their own), e.g. the CSV ``target`` column of ``table``."""
    from widthlab.data.registry import COMMON_OPTIONS, DATASETS, dataset_options

    secs = sections(STUDY_REF, 3)
    common = next((v for k, v in secs.items() if k.lower() == "common data options"), "")
    problems = [f"common data options: no row for {k!r}" for k in COMMON_OPTIONS
                if k not in table_rows(common)]
    for name in DATASETS.names():
        if name not in secs:
            problems.append(f"dataset {name!r}: no '### `{name}`' section")
            continue
        own = {k: v for k, v in dataset_options(name).items() if k not in COMMON_OPTIONS}
        problems += check_options(f"dataset {name}", secs[name], own)
    assert not problems, "\n".join(problems)
    assert "target" in table_rows(secs["table"])


def test_study_reference_documents_every_model_and_option():
    from widthlab.models import list_models, model_options

    secs = sections(STUDY_REF, 3)
    problems = []
    for name in list_models():
        if name not in secs:
            problems.append(f"model {name!r}: no '### `{name}`' section")
            continue
        problems += check_options(f"model {name}", secs[name], model_options(name))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("method", sorted(METHOD_GUIDES))
def test_method_guide_lists_every_option_with_its_default(method):
    from widthlab.studies.methods import method_options

    text = METHOD_GUIDES[method].read_text()
    problems = check_options(METHOD_GUIDES[method].name, text, method_options(method))
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------ command line


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_cli_reference_lists_every_subcommand_and_flag():
    """Each subcommand of ``widthlab`` has a ``## `widthlab NAME` `` section naming each of its flags
    (long and short spellings) and positional arguments; the top-level flags are on the page too."""
    from widthlab.cli import build_parser

    parser = build_parser()
    text = CLI_REF.read_text()
    secs = sections(CLI_REF, 2)
    problems = []
    for action in parser._actions:
        for opt in action.option_strings:
            if opt not in ("-h", "--help") and f"`{opt}`" not in text:
                problems.append(f"top-level flag {opt} not on the page")
    subs = _subcommands(parser)
    assert subs
    for name, sub in subs.items():
        key = f"widthlab {name}"
        if key not in secs:
            problems.append(f"no '## `{key}`' section")
            continue
        body = secs[key]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if action.option_strings:
                missing = [s for s in action.option_strings if f"`{s}" not in body]
            else:  # a positional, documented by its metavar in capitals (`STUDY`, `KEY=VALUE`, `DIR`)
                name = (action.metavar or action.dest).upper()
                missing = [] if f"`{name}" in body else [name]
            problems += [f"{key}: {s} not documented" for s in missing]
    extra = set(secs) - {f"widthlab {n}" for n in subs} - {"Exit status"}
    problems += [f"section {s!r} names no subcommand of the parser" for s in sorted(extra)]
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------- study examples


def _yaml_blocks() -> list[tuple[str, str]]:
    out = []
    for page in sorted(DOCS.rglob("*.md")):
        for i, block in enumerate(re.findall(r"```yaml\n(.*?)```", page.read_text(), flags=re.S)):
            if re.search(r"^name:", block, flags=re.M):  # a whole study file, not a fragment
                out.append((f"{page.relative_to(DOCS)}#{i}", block))
    return out


@pytest.mark.parametrize("where, text", _yaml_blocks(), ids=[w for w, _ in _yaml_blocks()])
def test_study_files_shown_in_the_docs_validate(where, text, tmp_path, monkeypatch):
    """Every complete study file the docs show loads, with every run checked (no data file is read; a
    ``custom`` model's factory file is written here: a small MLP taking ``width``)."""
    from widthlab.studies.load import expand_runs, load_study

    monkeypatch.chdir(tmp_path)
    for file, fn in re.findall(r'factory: "([^":]+\.py):(\w+)"', text):
        (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / file).write_text(
            "import math\nfrom torch import nn\n\n\n"
            f"def {fn}(input_shape, num_outputs, width=16):\n"
            "    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(),\n"
            "                         nn.Linear(width, num_outputs))\n")
    path = tmp_path / "study.yaml"
    path.write_text(text)
    try:
        spec = load_study(str(path))
    except Exception as e:
        if "optuna" in str(e).lower() and importlib.util.find_spec("optuna") is None:
            pytest.skip("the search extra (optuna) is not installed")
        raise
    assert expand_runs(spec)


def test_pages_cite_papers_not_developer_specs():
    """The site is for users, who have the papers, not the developers' spec files."""
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text()
        assert not re.search(r"specs/|spec §|\bspec\.md", text), page
