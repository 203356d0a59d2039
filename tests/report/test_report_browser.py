"""report.html in a real browser: headless Chromium loads every embedded plot, offline.

Needs Chromium (Debian: ``apt-get install -y chromium``); deselected by default, run with
``pytest -m browser tests/report``. Set ``WIDTHLAB_SCREENSHOT=path.png`` to keep the screenshot and look
at the layout.

The report itself has no scripts. To ask the browser whether each image decoded, the test adds a tiny
script to a *copy* of the page that writes ``loaded/total`` into the title once the page has loaded,
and reads the title back from ``--dump-dom``. A copy with one deliberately broken image checks that
the probe can fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from report_db import make_study_dir

from widthlab.report import write_report


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    return make_study_dir(tmp_path_factory)

pytestmark = pytest.mark.browser

PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter((i) => i.complete && i.naturalWidth > 0).length;
  document.title = "images-loaded " + ok + "/" + imgs.length;
});
</script>"""
BROKEN_IMG = '<img src="data:image/png;base64,iVBORw0KGgoAAAAA" alt="broken on purpose">'


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if Path("/usr/bin/chromium").exists():
        return "/usr/bin/chromium"
    pytest.skip("headless Chromium not found; install it with: apt-get install -y chromium")


def _run(chromium: str, profile: Path, *args: str) -> str:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={profile}",
             # Lets the load event and image decoding finish before the dump, without sleeping.
             "--virtual-time-budget=10000"]
    res = subprocess.run([chromium, *flags, *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def _images_loaded(chromium: str, html: str, tmp: Path, name: str) -> tuple[int, int]:
    page = tmp / f"{name}.html"
    page.write_text(html.replace("</body>", PROBE + "</body>"))
    dom = _run(chromium, tmp / f"profile-{name}", "--dump-dom", page.as_uri())
    m = re.search(r"<title>images-loaded (\d+)/(\d+)</title>", dom)
    assert m, f"probe did not run; DOM starts with {dom[:300]!r}"
    return int(m.group(1)), int(m.group(2))


def test_report_renders_in_chromium(study_dir, tmp_path):
    chromium = _chromium()
    out, _ = study_dir
    html_path, _ = write_report(out)
    html = html_path.read_text()
    n_img = html.count("<img")
    assert n_img >= 6

    assert _images_loaded(chromium, html, tmp_path, "report") == (n_img, n_img)
    broken = html.replace("<h2>Plots</h2>", "<h2>Plots</h2>" + BROKEN_IMG)
    assert _images_loaded(chromium, broken, tmp_path, "control") == (n_img, n_img + 1)

    # The untouched report, as a user sees it: a tall screenshot that is not blank.
    shot = Path(os.environ.get("WIDTHLAB_SCREENSHOT") or tmp_path / "report.png")
    _run(chromium, tmp_path / "profile-shot", "--window-size=1280,5200", f"--screenshot={shot}",
         html_path.as_uri())
    with Image.open(shot) as im:
        im = im.convert("L")
        assert im.size == (1280, 5200)
        # Text, tables and plots give many grey levels and a good share of non-white pixels.
        assert len(im.getcolors(256) or []) > 50
        dark = sum(count for count, level in im.getcolors(256) if level < 200)
        assert dark > 0.01 * im.size[0] * im.size[1]
