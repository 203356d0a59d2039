"""The verdict per task, on constructed result databases: seed noise (ties), the recommendation (the
cheapest of the methods tied with the best), cost relative to the dense grid and to a search arm, and
its place at the top of report.html and report.md."""

from __future__ import annotations

import math
import statistics

from compare_db import CompareWriter, load

from widthlab.report import comparison_text, verdict_text, write_report
from widthlab.report.compare import compare_results
from widthlab.report.tables import stat
from widthlab.report.verdict import VERDICT_RULE, task_verdict, within_noise

SEEDS = (0, 1, 2)
# Chosen test accuracy per seed, and cost per seed of the whole search.
DENSE = {"test": (0.96, 0.97, 0.98), "widths": (16, 32, 64), "flops": (1e6, 2e6, 4e6)}
ADAPTIVE = {"test": (0.96, 0.965, 0.97), "widths": (40, 36, 44), "flops": 2e6, "wall": 1.0}
SPARSE = {"test": (0.90, 0.905, 0.91), "flops": 1e6}
SEARCH = {"test": (0.964, 0.966, 0.968), "widths": (32, 64), "flops": (2e6, 4e6)}


def _build(out, with_search: bool = True) -> None:
    with CompareWriter(out) as w:
        for s in SEEDS:
            # Dense grid: the member at DENSE["widths"][s] wins validation and tests at DENSE["test"][s].
            for width, flops in zip(DENSE["widths"], DENSE["flops"]):
                best = width == DENSE["widths"][s]
                w.run("t", "dense", s, width=width, val=0.99 if best else 0.9,
                      test=DENSE["test"][s] if best else 0.5, flops=flops, wall=flops / 1e6,
                      weights=10 * width)
            for width in (32, 64, 128):
                best = width == 64
                w.run("t", "widesparse", s, width=width, val=0.95 if best else 0.9,
                      test=SPARSE["test"][s] if best else 0.5, flops=SPARSE["flops"], wall=1.0, weights=160)
            w.run("t", "adaptive", s, width=None, role="single", total_width=ADAPTIVE["widths"][s],
                  val=0.97, test=ADAPTIVE["test"][s], flops=ADAPTIVE["flops"], wall=ADAPTIVE["wall"],
                  weights=10 * ADAPTIVE["widths"][s])
            if with_search:
                for width, flops in zip(SEARCH["widths"], SEARCH["flops"]):
                    best = width == 64
                    w.run("t", "search", s, width=width, method="dense", val=0.98 if best else 0.9,
                          test=SEARCH["test"][s] if best else 0.5, flops=flops, wall=flops / 1e6,
                          weights=10 * width)


def _independent_tie(a: tuple, b: tuple) -> bool:
    """|mean a - mean b| <= 2 sqrt(s_a^2/n_a + s_b^2/n_b), recomputed from the numbers."""
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return abs(statistics.fmean(a) - statistics.fmean(b)) <= 2 * se


def test_within_noise_follows_the_stated_rule():
    for a, b in ((DENSE["test"], ADAPTIVE["test"]), (DENSE["test"], SPARSE["test"]),
                 (DENSE["test"], SEARCH["test"]), (ADAPTIVE["test"], SPARSE["test"])):
        assert within_noise(stat(list(a)), stat(list(b))) == _independent_tie(a, b)
    assert _independent_tie(DENSE["test"], ADAPTIVE["test"]) and not _independent_tie(DENSE["test"],
                                                                                      SPARSE["test"])
    one, other = stat([0.9]), stat([0.95])
    assert within_noise(one, other) is None  # one seed each: the noise is unknown
    # One seed on one side borrows the other's spread.
    many = stat([0.94, 0.95, 0.96])
    assert within_noise(one, many) == (abs(0.9 - 0.95) <= 2 * math.sqrt(0.01**2 / 1 + 0.01**2 / 3))


def test_verdict_recommends_the_cheapest_method_tied_with_the_best(tmp_path):
    _build(tmp_path)
    arms = compare_results(*load(tmp_path))["t"]
    v = task_verdict("t", arms)
    assert v.best.arm == "dense"  # best mean test accuracy, 0.97
    # adaptive (0.965) and the search arm (0.966) are within seed noise of it and cheaper; adaptive is
    # the cheapest (2e6 FLOPs per seed against the grid's 7e6 and the search's 6e6).
    assert v.recommended.arm == "adaptive"
    assert {a.arm for a in v.ties} == {"dense", "search"}
    assert [(a.arm, round(g, 6)) for a, g in v.behind] == [("widesparse", round(0.905 - 0.965, 6))]
    assert v.width == 40  # median of 40, 36, 44
    text = _line(tmp_path)
    assert text.startswith("t: use adaptive at width 40 (chosen per seed: 40 · 36 · 44); test accuracy "
                           "96.50 ± 0.50% over 3 seeds (ties with the best mean, dense grid, and is "
                           "cheaper).")
    assert f"{2 / 7:.3g}× the dense grid's training FLOPs" in text
    assert f"{2 / 6:.3g}× the search arm's training FLOPs" in text
    assert f"{2 / 7:.3g}× the dense grid's training FLOPs, {1.0 / 7.0:.3g}× its wall seconds;" in text
    assert "Tie (within seed noise): dense grid 97.00 ± 1.00%, search arm 96.60 ± 0.20%." in text
    assert "Behind, beyond seed noise: widesparse family 90.50 ± 0.50% (-6.00 points)." in text


def _line(out) -> str:
    (line,) = verdict_text(out).split("\n\n")[1:]
    return line


def test_without_a_search_arm_the_cost_is_relative_to_the_dense_grid_only(tmp_path):
    _build(tmp_path, with_search=False)
    text = _line(tmp_path)
    assert "search arm" not in text and "the dense grid's training FLOPs" in text


def test_verdict_beyond_noise_recommends_the_best(tmp_path):
    with CompareWriter(tmp_path) as w:
        for s, (d, a) in enumerate(((0.95, 0.90), (0.96, 0.91))):
            w.run("t", "dense", s, width=32, val=0.9, test=d, flops=7.0, wall=1.0, weights=320)
            w.run("t", "dense", s, width=16, val=0.8, test=0.5, flops=3.0, wall=1.0, weights=160)
            w.run("t", "adaptive", s, width=None, role="single", total_width=20, val=0.9, test=a,
                  flops=1.0, wall=1.0, weights=200)
    v = task_verdict("t", compare_results(*load(tmp_path))["t"])
    assert v.recommended.arm == v.best.arm == "dense" and not v.ties
    text = _line(tmp_path)
    assert "t: use dense grid at width 32; test accuracy 95.50 ± 0.71% over 2 seeds (the best mean)." in text
    assert "Cost: it is the dense grid." in text and "Behind, beyond seed noise: adaptive" in text


def test_one_seed_each_says_the_noise_is_unknown(tmp_path):
    with CompareWriter(tmp_path) as w:
        w.run("t", "dense", 0, width=32, val=0.9, test=0.95, flops=7.0, wall=1.0, weights=320)
        w.run("t", "adaptive", 0, width=None, role="single", total_width=20, val=0.9, test=0.94, flops=1.0,
              wall=1.0, weights=200)
    assert "One seed each, noise unknown: adaptive 94.00 ± –% (-1.00 points)." in _line(tmp_path)


def test_verdict_sits_at_the_top_of_both_reports_and_in_the_cli_text(tmp_path):
    _build(tmp_path)
    html_path, md_path = write_report(tmp_path)
    md, page = md_path.read_text(), html_path.read_text()
    line = _line(tmp_path)
    assert md.index("## Verdict") < md.index("## Comparison") < md.index("## All runs")
    assert line in md and VERDICT_RULE in md
    assert page.index('id="verdict"') < page.index('id="comparison"')
    assert "<strong>t</strong>: use adaptive at width 40" in page
    cli = comparison_text(tmp_path)
    assert cli.startswith("Verdict\n\n" + line) and "## t" in cli


def test_verdict_of_a_non_comparison_store_is_empty(tmp_path):
    from widthlab.studies.store import ResultStore

    ResultStore(tmp_path).close()
    assert verdict_text(tmp_path) == ""
