"""Plots from partial data: the right figures appear, the rest are skipped, nothing raises."""

from __future__ import annotations

import io

from PIL import Image

from widthlab.report.plots import epoch_curve, make_plots, width_changes
from widthlab.report.tables import aggregate


def _row(run_id, seed, summary, study="s"):
    cfg = {"model": {"name": "mlp", "width": summary.get("width")}, "method": {"name": summary["method"]},
           "seed": seed, "axes": {"seed": seed}}
    return {"run_id": run_id, "study": study, "status": "done", "config": cfg, "summary": summary}


def test_epoch_curve_means_over_runs_and_reads_widths_dicts():
    runs = [[{"epoch": 1, "val_accuracy": 0.5}, {"epoch": 2, "val_accuracy": 0.7}],
            [{"epoch": 1, "val_accuracy": 0.7}, {"epoch": 2}, {"epoch": 3, "val_accuracy": "inf"}]]
    assert epoch_curve(runs, "val_accuracy") == ([1, 2], [0.6, 0.7])
    # Width recorded only per site: the total is their sum.
    grow = [[{"epoch": 1, "widths": {"a": 4, "b": 4}}, {"epoch": 2, "widths": {"a": 6, "b": 4}}]]
    assert epoch_curve(grow, "total_width") == ([1, 2], [8.0, 10.0])
    assert width_changes(grow) and not width_changes([[{"epoch": 1, "total_width": 8}] * 3])
    assert epoch_curve([[{}], []], "test_loss") == ([], [])


def test_plots_are_skipped_without_data():
    rows = [_row("a", 0, {"method": "dense", "width": 8, "test_accuracy": 0.9}),
            _row("b", 1, {"method": "dense", "width": 8, "test_accuracy": 0.8})]
    # No weight counts, no epochs, no width change: only accuracy vs width can be drawn.
    plots = make_plots(aggregate(rows), {})
    assert [p.name for p in plots] == ["s-vs-width"]
    assert make_plots(aggregate([]), {}) == []
    # Nothing but failed or metric-less runs: no plots at all.
    assert make_plots(aggregate([_row("c", 0, {"method": "dense", "width": 8})]), {}) == []


def test_expanding_run_gets_a_width_plot():
    summary = {"method": "expanding", "width": 8, "widths": {"h1": 12, "h2": 10}, "test_loss": 0.3,
               "nonzero_weights": 300, "group": "e", "label": "expanding mlp w=8"}
    epochs = {"e0": [{"epoch": 1, "total_width": 16, "val_loss": 0.5},
                     {"epoch": 2, "total_width": 22, "val_loss": 0.3}]}
    plots = make_plots(aggregate([_row("e0", 0, summary, study="Grow Study")]), epochs)
    assert [p.name for p in plots] == ["grow-study-vs-width", "grow-study-vs-weights",
                                       "grow-study-learning-curves", "grow-study-width"]
    for p in plots:
        with Image.open(io.BytesIO(p.png)) as im:
            im.load()
        assert p.caption and p.title.startswith("Grow Study")


def test_site_curves_average_each_layer_over_runs():
    from widthlab.report.plots import site_curves

    runs = [[{"epoch": 1, "widths": {"a": 10, "b": 4}}, {"epoch": 2, "widths": {"a": 12, "b": 6}}],
            [{"epoch": 1, "widths": {"a": 20, "b": 4}}, {"epoch": 2, "widths": {"a": 14, "b": 8}}]]
    curves = site_curves(runs)
    assert curves == {"a": ([1, 2], [15.0, 13.0]), "b": ([1, 2], [4.0, 7.0])}
