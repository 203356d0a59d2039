"""MkDocs hook: the examples gallery lists every ``examples/*.py`` with its docstring and source.

Built from the files at each build, so a new example appears in the gallery without editing the page,
and the page cannot name an example that no longer exists. Each entry's anchor is the file's stem
(``examples.md#widesparse_your_mlp``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
MARKER = "<!-- gallery -->"
# The gallery's reading order; files not listed follow in name order.
ORDER = ("widesparse_your_mlp", "adaptive_cnn_plain_loop", "self_expanding_plain_loop",
         "self_expanding_trainer", "residual_network", "transformer_ffn_width", "compare_your_csv")


def example_files() -> list[Path]:
    files = {p.stem: p for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    ranked = [files.pop(s) for s in ORDER if s in files]
    return ranked + [files[s] for s in sorted(files)]


def entry(path: Path) -> str:
    source = path.read_text()
    doc = ast.get_docstring(ast.parse(source)) or ""
    title, _, body = doc.partition("\n")
    title = title.strip().rstrip(".") or path.stem
    fence = "````" if "```" in source else "```"
    return "\n".join([
        f"## {title} {{#{path.stem}}}", "",
        f"`examples/{path.name}` — run it with `.venv/bin/python examples/{path.name}`.", "",
        body.strip(), "",
        '??? example "The whole script"', "",
        f"    {fence}python",
        *(f"    {line}" if line else "" for line in source.splitlines()),
        f"    {fence}", "",
    ])


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != "examples.md" or MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, "\n".join(entry(p) for p in example_files()))
