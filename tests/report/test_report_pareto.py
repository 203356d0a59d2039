"""The Pareto view: the front against an independent brute-force computation, every member of every
method in it, the chosen models flagged, and comparison plots whose bars never leave a log axis."""

from __future__ import annotations

import random

import pytest
from compare_db import CompareWriter, load
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from widthlab.report.compare import compare_results
from widthlab.report.compare_plots import compare_plots, draw_metric_vs, draw_pareto
from widthlab.report.pareto import Point, front, points


def _brute_front(pts: list[Point], maximise: bool) -> set[int]:
    """Indices of the points that no other point dominates (as cheap or cheaper and as good or better,
    strictly in one): every pair compared."""
    sign = 1 if maximise else -1
    out = set()
    for i, p in enumerate(pts):
        dominated = any(q.cost <= p.cost and sign * q.value >= sign * p.value
                        and (q.cost < p.cost or sign * q.value > sign * p.value) for q in pts)
        if not dominated:
            out.add(i)
    return out


@pytest.mark.parametrize("maximise", [True, False])
@pytest.mark.parametrize("seed", range(20))
def test_front_matches_brute_force(seed, maximise):
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    # Small integer grids force ties in cost, in value and identical points.
    pts = [Point(float(rng.randint(1, 8)), rng.randint(0, 6) / 6, "a", f"r{i}", 0, False) for i in range(n)]
    got = front(pts, maximise)
    assert sorted(p.run_id for p in got) == sorted(pts[i].run_id for i in _brute_front(pts, maximise))
    assert [p.cost for p in got] == sorted(p.cost for p in got)


def _study(out):
    with CompareWriter(out) as w:
        for s in (0, 1):
            for width in (8, 32, 128, 512):
                w.run("t", "dense", s, width=width, val=0.8 + width / 10_000 + 0.001 * s,
                      test=0.80 + 0.03 * (width.bit_length() - 4) - 0.01 * s, flops=1e5 * width,
                      wall=1.0, weights=80 * width)
            w.run("t", "adaptive", s, width=None, role="single", total_width=50 + 10 * s, val=0.9,
                  test=0.88 + 0.01 * s, flops=2e6, wall=1.0, weights=4000 + 800 * s)
            w.run("t", "widesparse", s, width=64, val=0.85, test=0.84, flops=5e5, wall=1.0, weights=640)


def test_every_member_of_every_method_is_a_point_and_the_chosen_ones_are_flagged(tmp_path):
    _study(tmp_path)
    runs, epochs = load(tmp_path)
    arms = compare_results(runs, epochs)["t"]
    for cost, key in (("flops", "train_flops"), ("weights", "nonzero_weights")):
        pts = points(arms, cost)
        assert sorted(p.run_id for p in pts) == sorted(r["run_id"] for r in runs)
        by_id = {r["run_id"]: r["summary"] for r in runs}
        assert all(p.cost == by_id[p.run_id][key] and p.value == by_id[p.run_id]["test_accuracy"]
                   for p in pts)
        chosen = {c.run_id for a in arms for c in a.choices}
        assert {p.run_id for p in pts if p.chosen} == chosen and len(chosen) == 6
        # Front from the store's rows alone, brute force.
        assert {p.run_id for p in front(pts, True)} == {pts[i].run_id for i in _brute_front(pts, True)}


def test_pareto_plots_are_in_the_report(tmp_path):
    _study(tmp_path)
    runs, epochs = load(tmp_path)
    names = [p.name for p in compare_plots(compare_results(runs, epochs), epochs, "cmp")]
    assert "cmp-pareto-flops" in names and "cmp-pareto-weights" in names


# ------------------------------------------------------------------------- bars stay on the log axes

def _segments(ax):
    """Every (x, y) vertex the axes draw: lines, error-bar segments, markers."""
    for line in ax.get_lines():
        xs, ys = line.get_data()
        yield from zip(map(float, xs), map(float, ys))
    for coll in ax.collections:
        if isinstance(coll, LineCollection):
            for seg in coll.get_segments():
                yield from ((float(x), float(y)) for x, y in seg)
        else:
            yield from ((float(x), float(y)) for x, y in coll.get_offsets())


def _assert_on_axes(ax):
    xlo, xhi = ax.get_xlim()
    ylo, yhi = ax.get_ylim()
    pts = list(_segments(ax))
    assert pts
    for x, y in pts:
        if ax.get_xscale() == "log":
            assert x > 0
        if ax.get_yscale() == "log":
            assert y > 0
        assert xlo <= x <= xhi and ylo <= y <= yhi


def _issue_grid(out, metric="accuracy"):
    """Seed 0's grid picks 256 (18,944 weights), seed 1's picks 32 (2,368): the mean ± std of the
    weights, 10,656 ± 11,721, starts below zero."""
    with CompareWriter(out) as w:
        for s, best in ((0, 256), (1, 32)):
            for width in (8, 32, 256):
                good = width == best
                w.run("t", "dense", s, width=width, val=0.97 if good else 0.9,
                      test=(0.96 if s == 0 else 0.93) if good else 0.9, flops=1e6 * width, wall=1.0 + s,
                      weights=74 * width, metric=metric)
            w.run("t", "adaptive", s, width=None, role="single", total_width=100, val=0.9, test=0.95,
                  flops=2e8 * (1 + 9 * s), wall=1.0, weights=7400 * (1 + 9 * s), metric=metric)


@pytest.mark.parametrize("key,member", [("weights", "nonzero_weights"), ("flops", "flops"),
                                        ("wall", "wall_seconds")])
def test_no_bar_runs_off_a_log_axis(tmp_path, key, member):
    _issue_grid(tmp_path)
    arms = compare_results(*load(tmp_path))["t"]
    dense = next(a for a in arms if a.arm == "dense")
    w = [c.weights for c in dense.choices]
    assert sum(w) / 2 - abs(w[0] - w[1]) / 2 ** 0.5 < 0  # a mean ± std bar would cross zero
    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    assert draw_metric_vs(ax, arms, key, member)
    fig.canvas.draw()
    assert ax.get_xscale() == "log"
    _assert_on_axes(ax)


def test_no_bar_runs_off_a_log_loss_axis(tmp_path):
    # Regression: test losses on a log y axis; a spread of 0.9 and 0.01 has mean - std < 0.
    with CompareWriter(tmp_path) as w:
        for s, loss in ((0, 0.9), (1, 0.01)):
            w.run("t", "adaptive", s, width=None, role="single", total_width=10, val=loss, test=loss,
                  flops=1e6, wall=1.0, weights=100, metric="loss")
            w.run("t", "dense", s, width=8, val=loss, test=loss * 2, flops=1e6, wall=1.0, weights=80,
                  metric="loss")
    arms = compare_results(*load(tmp_path))["t"]
    for draw in (lambda ax: draw_metric_vs(ax, arms, "flops", "flops"),
                 lambda ax: draw_pareto(ax, arms, "flops")):
        fig = Figure()
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        assert draw(ax)
        fig.canvas.draw()
        assert ax.get_yscale() == "log"
        _assert_on_axes(ax)


def test_the_note_counts_each_methods_models_on_the_front(tmp_path):
    from widthlab.report.compare_tables import pareto_note, task_notes

    _study(tmp_path)
    arms = compare_results(*load(tmp_path))["t"]
    pts = points(arms, "flops")
    on = [pts[i] for i in _brute_front(pts, True)]
    names = {a.arm: a.name for a in arms}
    counts = ", ".join(f"{names[arm]} {sum(p.arm == arm for p in on)}"
                       for arm in dict.fromkeys(p.arm for p in sorted(on, key=lambda p: p.cost)))
    note = pareto_note(arms)
    assert f"against training FLOPs, {len(on)} models ({counts}; {sum(p.chosen for p in on)} of them" in note
    assert note in task_notes(arms)
