"""Every command the README shows works as shown.

Commands are read from the README itself (fenced blocks and inline code), so a new or edited example is
tested without touching this file:

* a synopsis line (placeholders such as ``STUDY|FILE.yaml``, ``DIR``, ``[--workers N]``) and a bare
  ``widthlab SUB`` reference must name a subcommand that exists;
* a concrete ``widthlab run`` / ``torchrun ... -m widthlab.cli run`` line must parse, and its study with
  its overrides must validate (``widthlab show`` with the same arguments exits 0); the local runs are
  executed for real, to their end, by the ``slow`` test below (output folders under a temporary path);
* ``widthlab show``, ``widthlab studies`` and ``widthlab kernel`` lines run as they are;
* a ``$ widthlab ...`` line followed by an error line must fail with exit 2 and print that error.

``bash scripts/*.sh`` lines are the README's set-up and test commands, which CI itself runs.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from widthlab.cli import build_parser, main

README = Path(__file__).resolve().parents[1] / "README.md"
PLACEHOLDER = re.compile(r"^\[|^[A-Z][A-Z_]*([|.][A-Za-z_.]+)*$|^k=v$|^KEY=VALUE$")


CMD = re.compile(r"^(?:torchrun .*?-m widthlab\.cli|widthlab|\.venv/bin/widthlab)\s+(.*)$")


def _split(text: str, line: int) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as e:
        raise ValueError(f"README line {line}: cannot split {text!r}: {e}") from None


def _commands() -> list[tuple[int, list[str], str | None]]:
    """(line number, argv after `widthlab`, the next line when the command is a `$ ` transcript)."""
    lines = README.read_text().splitlines()
    found = []
    fenced = False
    prose: list[tuple[int, str]] = []  # inline code may wrap over lines: scan each paragraph whole

    def scan_prose():
        text = " ".join(t for _, t in prose)
        for snip in re.findall(r"`([^`]*)`", text):
            m = CMD.match(snip.strip())
            if m:
                line = next((n for n, t in prose if snip.split()[1] in t), prose[0][0])
                found.append((line, _split(m.group(1), line), None))
        prose.clear()

    skip_next = False
    for i, line in enumerate(lines, start=1):
        if line.startswith("```"):
            scan_prose()
            fenced = not fenced
            continue
        if not fenced:
            if line.strip():
                prose.append((i, line))
            else:
                scan_prose()
            continue
        if skip_next:  # the output line of a `$ ` transcript
            skip_next = False
            continue
        # A synopsis line carries its description after a run of spaces, a shell line its comment.
        text = re.split(r"\s{3,}|\s+#\s", line)[0].strip()
        transcript = text.startswith("$ ")
        m = CMD.match(text.removeprefix("$ "))
        if m:
            nxt = lines[i] if transcript and i < len(lines) else None
            skip_next = nxt is not None
            found.append((i, _split(m.group(1), i), nxt))
    scan_prose()
    return found


COMMANDS = _commands()
SUBCOMMANDS = set(build_parser()._subparsers._group_actions[0].choices)


def _is_synopsis(argv: list[str]) -> bool:
    return len(argv) <= 1 or any(PLACEHOLDER.match(a) for a in argv[1:])


def _id(cmd) -> str:
    return f"README:{cmd[0]}"


def test_the_readme_shows_commands():
    concrete = [c for c in COMMANDS if not _is_synopsis(c[1])]
    assert len(COMMANDS) >= 20 and len(concrete) >= 10, (len(COMMANDS), len(concrete))


@pytest.mark.parametrize("cmd", COMMANDS, ids=_id)
def test_readme_command_parses_and_validates(cmd, capsys, tmp_path):
    line, argv, transcript = cmd
    assert argv and argv[0] in SUBCOMMANDS, f"README line {line}: no such subcommand: {argv[:1]}"
    if _is_synopsis(argv):
        return
    sub = argv[0]
    if transcript is not None and "error" in transcript:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, f"README line {line}: expected exit 2, got {code}"
        shown = transcript.split("...")[0].split(": ", 1)[1]  # the error text before the README's "..."
        shown = shown.split("(with overrides): ", 1)[-1]
        assert shown.strip() in err, f"README line {line}: stderr {err!r} lacks {shown!r}"
        return
    if sub == "run":
        args = build_parser().parse_args(argv)
        code = main(["show", str(args.study), *args.overrides])
        assert code == 0, f"README line {line}: {capsys.readouterr().err}"
    elif sub in ("show", "studies", "kernel"):
        assert main(argv) == 0, f"README line {line}: {capsys.readouterr().err}"
    else:
        build_parser().parse_args(argv)


def _local_runs():
    out = []
    for line, argv, _ in COMMANDS:
        if argv and argv[0] == "run" and not _is_synopsis(argv) and "ray" not in argv:
            out.append((line, argv))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("cmd", _local_runs(), ids=lambda c: f"README:{c[0]}")
def test_readme_run_commands_run_to_the_end(cmd, tmp_path, monkeypatch):
    """The README's local `run` lines, executed as shown (torchrun lines on one process), each in a
    fresh working folder so that relative --out paths and resumes behave as they do for a reader."""
    line, argv = cmd
    monkeypatch.chdir(tmp_path)
    argv = [a if not a.startswith("/tmp/") else str(tmp_path / a[5:]) for a in argv]
    if "--resume" in argv and not Path(argv[argv.index("--out") + 1]).exists():
        # A resume line continues the line before it in the README; run that one first.
        assert main([a for a in argv if a != "--resume"]) == 0, f"README line {line}"
    assert main(argv) == 0, f"README line {line}"


def _python_blocks() -> list[tuple[int, str]]:
    """(first line, code) of every fenced ```python block of the README."""
    blocks, code, start = [], None, 0
    for i, line in enumerate(README.read_text().splitlines(), start=1):
        if code is None and line.strip() == "```python":
            code, start = [], i + 1
        elif code is not None and line.startswith("```"):
            blocks.append((start, "\n".join(code)))
            code = None
        elif code is not None:
            code.append(line)
    return blocks


def test_readme_has_the_three_plain_loop_snippets():
    text = "\n".join(code for _, code in _python_blocks())
    for api in ("widthlab.sparsify(", "widthlab.AdaptiveWidth(", "widthlab.SelfExpanding("):
        assert api in text, api


@pytest.mark.parametrize("start, code", [pytest.param(n, c, id=f"line{n}") for n, c in _python_blocks()])
def test_readme_python_block_runs(start, code, tmp_path):
    """Each Python snippet runs as a script, as a user would paste it (fresh process, its own folder)."""
    import subprocess
    import sys

    script = tmp_path / f"readme_line{start}.py"
    script.write_text(code + "\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"README line {start}:\n{proc.stderr[-3000:]}"
