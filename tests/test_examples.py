"""Every script in examples/ runs to completion (exit status 0) on its bundled data.

The scripts are found by glob, so a new example is tested without editing this file. Each runs as a
user would run it (``python examples/NAME.py``), in a fresh process with one torch thread (the
examples are tiny networks, and the suite shares the machine), from an empty working directory so that
an example cannot depend on, or leave files in, the repository.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_"))
TIMEOUT_S = 180  # each example runs in seconds; this only stops a hung one


def test_there_are_examples():
    assert len(EXAMPLES) >= 3, EXAMPLES


def _run(script: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "MPLBACKEND": "Agg"}
    try:
        return subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(e.cmd, -9, str(e.stdout or ""), f"timed out after {TIMEOUT_S}s")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every example run once, as many at a time as there are cores (each uses one thread): the
    scripts spend most of their few seconds importing torch, which parallelises perfectly."""
    dirs = {p.stem: tmp_path_factory.mktemp(p.stem) for p in EXAMPLES}
    with ThreadPoolExecutor(max_workers=max(1, min(len(EXAMPLES), os.cpu_count() or 1))) as pool:
        futures = {p.stem: pool.submit(_run, p, dirs[p.stem]) for p in EXAMPLES}
        return {name: (f.result(), dirs[name]) for name, f in futures.items()}


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(script, results):
    res, cwd = results[script.stem]
    assert res.returncode == 0, (f"{script.name} exited {res.returncode}\n{res.stdout[-3000:]}\n"
                                 f"{res.stderr[-3000:]}")
    assert res.stdout.strip(), f"{script.name} printed nothing"
    assert not list(cwd.iterdir()), f"{script.name} left files in its working directory"
