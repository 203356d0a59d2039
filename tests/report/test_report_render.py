"""report.html / report.md from the database alone: embedded plots, offline, reproducible, robust."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from report_db import make_study_dir

from widthlab.report import format_results_table, write_report
from widthlab.studies.store import ResultStore


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    return make_study_dir(tmp_path_factory)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMG_RE = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
EXPECTED_PLOTS = {"wsmnist-vs-width", "wsmnist-vs-weights", "wsmnist-learning-curves", "wsmnist-width",
                  "linreg-vs-width", "linreg-vs-weights", "linreg-learning-curves"}


@pytest.fixture(scope="module")
def rendered(study_dir):
    out, _ = study_dir
    html_path, md_path = write_report(out)
    return out, html_path, md_path


def _check_png(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # decodes every pixel: a truncated file raises here
        return im.size


def test_every_plot_is_embedded_as_a_valid_png(rendered):
    out, html_path, _ = rendered
    text = html_path.read_text()
    images = IMG_RE.findall(text)
    assert text.count("<img") == len(images) == len(EXPECTED_PLOTS)
    assert text.count("<figcaption>") == len(images)
    for data in images:
        w, h = _check_png(base64.b64decode(data, validate=True))
        assert w > 300 and h > 200
    ids = set(re.findall(r'<figure id="([^"]+)">', text))
    assert ids == EXPECTED_PLOTS


def test_html_is_self_contained(rendered):
    _, html_path, _ = rendered
    text = html_path.read_text()
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower() and "<link" not in text.lower()
    # Every src/href points into the page itself.
    assert all(ref.startswith("data:") for ref in re.findall(r'(?:src|href)="([^"]*)"', text))


def test_html_and_markdown_content(rendered):
    out, html_path, md_path = rendered
    md, text = md_path.read_text(), html_path.read_text()
    with ResultStore(out, create=False) as store:
        runs = store.runs()
    for study in ("wsmnist", "linreg"):  # the same tables as the terminal printout, one per study
        assert f"### {study}\n\n" + format_results_table([r for r in runs if r["study"] == study]) in md
    assert "31 runs: 29 done, 1 failed, 1 running, 0 pending." in md
    assert "31 runs: 29 done, 1 failed, 1 running, 0 pending." in text
    for doc in (md, text):
        assert "linreg, wsmnist" in doc  # study names in the title
        assert "loss is nan at epoch 2 (diverged)" in doc and "dense-128-0" in doc
        assert "80.13 ± 0.12" in doc
    for name in EXPECTED_PLOTS:
        assert f"](plots/{name}.png)" in md
        _check_png((out / "plots" / f"{name}.png").read_bytes())


def test_rerender_from_database_alone_is_identical(rendered, tmp_path):
    out, html_path, md_path = rendered
    before = (html_path.read_bytes(), md_path.read_bytes())
    html_path.unlink()
    md_path.unlink()
    for p in (out / "plots").glob("*.png"):
        p.unlink()
    (out / "summary.json").unlink()  # not an input of the report
    assert write_report(out) == (html_path, md_path)
    assert (html_path.read_bytes(), md_path.read_bytes()) == before
    assert not list(out.glob(".*.tmp")) and not list((out / "plots").glob(".*.tmp"))


def test_empty_database(tmp_path):
    ResultStore(tmp_path).close()
    html_path, md_path = write_report(tmp_path)
    text, md = html_path.read_text(), md_path.read_text()
    assert "No finished runs yet" in text and "No finished runs yet" in md
    assert "0 runs" in md and "<img" not in text
    assert not (tmp_path / "plots").exists()


def test_only_failed_runs(tmp_path):
    with ResultStore(tmp_path) as store:
        for i in range(2):
            store.register(f"r{i}", "broken", i, {"model": {"name": "mlp", "width": 8}, "seed": i,
                                                 "method": {"name": "dense"}})
            store.mark_running(f"r{i}")
            store.finish(f"r{i}", "failed", {}, error=f"CUDA out of memory <{i}>")
    html_path, md_path = write_report(tmp_path)
    text, md = html_path.read_text(), md_path.read_text()
    assert "2 runs: 0 done, 2 failed" in md
    assert "CUDA out of memory &lt;1&gt;" in text  # escaped, not markup
    assert "CUDA out of memory <0>" in md and "<img" not in text


def test_missing_database_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.sqlite"):
        write_report(tmp_path)
    assert not (tmp_path / "report.html").exists()


def test_report_leaves_the_pyplot_backend_alone(study_dir, tmp_path):
    # A user who picked a backend keeps it: the report never imports pyplot nor calls matplotlib.use.
    out, _ = study_dir
    code = ("import sys, matplotlib; matplotlib.use('svg'); from widthlab.report import write_report; "
            f"write_report({str(out)!r}); assert matplotlib.get_backend() == 'svg'; "
            "assert 'matplotlib.pyplot' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent, timeout=120)
