"""How a comparison selects and shows its choices, on constructed result databases: the tie rule and
its report, per-seed widths (never a mean), the width at the end of training and the settled flag, the
small-validation warning, pruned trials, CPU seconds."""

from __future__ import annotations

import pytest
from compare_db import CompareWriter, load

from widthlab.report import write_report
from widthlab.report.compare import compare_results
from widthlab.report.compare_tables import (
    TIE_RULE,
    compare_table,
    format_comparison,
    per_seed,
    task_notes,
)
from widthlab.report.settle import SETTLE_NOTE, SETTLE_TOLERANCE, width_path
from widthlab.report.validation import inferred_size, split_size

N_VAL = 144  # validation split of the digits-sized task


def acc(k: int, n: int = N_VAL) -> float:
    return k / n


def _table(arms) -> dict[str, dict[str, str]]:
    header, rows = compare_table(arms)
    return {r[0]: dict(zip(header, r)) for r in rows}


# ------------------------------------------------------------------------------------------ tie rule

def test_tie_keeps_the_cheaper_model_and_is_reported(tmp_path):
    # A wide & sparse family: every member has the same nonzero weights. Members 64 and 32 tie on
    # validation (same count of correct examples) and come first in the study; 32 costs fewer FLOPs.
    with CompareWriter(tmp_path) as w:
        for width, k, flops in ((64, 140, 4e6), (32, 140, 3e6), (16, 130, 1e6)):
            w.run("t", "widesparse", 0, width=width, val=acc(k), test=0.9, flops=flops, wall=1.0,
                  weights=500, train_flops_dense=flops * 2)
    runs, epochs = load(tmp_path)
    (arm,) = compare_results(runs, epochs)["t"]
    (c,) = arm.choices
    assert c.width == 32 and c.selected_by == "validation"
    assert [m["width"] for m in c.ties] == [64]
    assert _table([arm])["widesparse family"]["val ties"] == "1"
    notes = " ".join(task_notes([arm]))
    assert "w=64 tie with the kept w=32 at validation 97.22%" in notes
    md = write_report(tmp_path)[1].read_text()
    assert TIE_RULE in md and "Ties on validation" in md


def test_no_tie_reported_when_validation_separates(tmp_path):
    with CompareWriter(tmp_path) as w:
        for width, k in ((16, 100), (32, 120), (64, 110)):
            w.run("t", "dense", 0, width=width, val=acc(k), test=0.9, flops=1.0, wall=1.0, weights=width)
    (arm,) = compare_results(*load(tmp_path))["t"]
    assert arm.choices[0].width == 32 and arm.choices[0].ties == []
    assert "val ties" not in compare_table([arm])[0]
    assert not any("tie" in n for n in task_notes([arm]))


# ------------------------------------------------------------------------------------ per-seed widths

def _grid_256_vs_32(out):
    """The issue's case: seed 0 chooses 256, seed 1 chooses 32 (mean 144, which no run had)."""
    with CompareWriter(out) as w:
        for seed, best in ((0, 256), (1, 32)):
            for width in (8, 32, 256):
                k = 120 + (20 if width == best else width // 32)
                w.run("t", "dense", seed, width=width, val=acc(k), test=0.9 + 0.001 * (width == best),
                      flops=1e6 * width, wall=1.0, weights=74 * width)
        for seed, tw in ((0, 100), (1, 90)):
            w.run("t", "adaptive", seed, width=None, role="single", total_width=tw, val=acc(130),
                  test=0.91, flops=5e6, wall=2.0, weights=74 * tw)


def test_search_widths_are_per_seed_with_a_median_that_some_seed_chose(tmp_path):
    _grid_256_vs_32(tmp_path)
    arms = compare_results(*load(tmp_path))["t"]
    table = _table(arms)
    dense = table["dense grid"]
    # The median of an even count is the lower middle value, a width some seed chose: never 144.
    assert dense["selected width"] == "256 · 32 (median 32)"
    assert dense["nonzero weights"] == f"{74 * 256:,} · {74 * 32:,}"
    assert table["adaptive"]["selected width"] == "100 · 90 (median 90)"
    text = format_comparison(*load(tmp_path))
    assert "144" not in text and "±" not in dense["selected width"] + dense["nonzero weights"]


def test_per_seed_lists_few_seeds_and_summarises_many():
    assert per_seed([32, 256]) == "32 · 256"
    assert per_seed([64, 64, 64]) == "64"
    assert per_seed([None, 8]) == "– · 8"
    assert per_seed([8, 16, 32, 64, 128]) == "median 32 (8–128)"
    assert per_seed([8, 16, 32, 64, 128, 256]) == "median 32 (8–256)"
    assert per_seed([None, None]) == ""


# ----------------------------------------------------------------------------- settled width, end width

def _widths(*ws):
    return [{"total_width": w, "widths": {"hidden.0": w}} for w in ws]


def test_width_path_flags_a_width_still_moving_over_the_last_tenth():
    # 20 epochs: the last tenth is epochs 19-20, compared with epoch 18.
    falling = list(range(300, 100, -10))  # ..., 120, 110 at the end: moved 20/110
    p = width_path(_widths(*falling))
    assert p.end == 110 and p.changes and p.moved == pytest.approx(20 / 110) and p.settled is False
    flat_end = [300, 200, 150] + [100] * 17
    assert width_path(_widths(*flat_end)).settled is True
    # Exactly the tolerance is settled; just above it is not.
    at = [200] * 17 + [105, 100, 100]
    assert width_path(_widths(*at)).moved == pytest.approx(SETTLE_TOLERANCE)
    assert width_path(_widths(*at)).settled is True
    assert width_path(_widths(*[200] * 17 + [106, 100, 100])).settled is False
    # A width that never changed has nothing to settle; no width recorded: nothing known.
    assert width_path(_widths(*[64] * 5)).settled is None
    assert width_path([{"val_accuracy": 0.5}]).end is None


def test_table_reports_selected_and_end_width_and_flags_the_unsettled_seed(tmp_path):
    with CompareWriter(tmp_path) as w:
        # Seed 0 selected at epoch 8 (244 units), still falling at the end (108: 24 units over the last
        # three epochs); seed 1 flat at the end.
        w.run("t", "adaptive", 0, width=None, role="single", total_width=244, val=0.9, test=0.9, flops=1.0,
              wall=1.0, weights=10, best_epoch=8, epochs=_widths(*(300 - 8 * i for i in range(25))))
        w.run("t", "adaptive", 1, width=None, role="single", total_width=150, val=0.9, test=0.9, flops=1.0,
              wall=1.0, weights=10, best_epoch=7, epochs=_widths(*([300, 200] + [150] * 23)))
    arms = compare_results(*load(tmp_path))["t"]
    row = _table(arms)["adaptive"]
    assert row["selected width"] == "244 · 150 (median 150)"
    assert row["selected at epoch"] == "8 · 7 of 25"
    assert row["end width"] == "108 · 150, not settled: seed 0"
    notes = " ".join(task_notes(arms))
    assert "had not settled in 1 of 2 seeds" in notes and "training ended at 108" in notes
    md = write_report(tmp_path)[1].read_text()
    assert SETTLE_NOTE in md and "5%" in SETTLE_NOTE and "10%" in SETTLE_NOTE


def test_search_widths_have_no_end_width(tmp_path):
    _grid_256_vs_32(tmp_path)
    header, _ = compare_table(compare_results(*load(tmp_path))["t"])
    assert "end width" not in header  # nothing in this study changes width over training


# ------------------------------------------------------------------------------ small validation split

def test_split_size_is_inferred_from_accuracies_or_read_when_recorded():
    values = [acc(k) for k in (130, 131, 137, 140, 141, 125, 129, 133)]
    assert inferred_size(values) == N_VAL
    assert inferred_size(values[:3]) is None  # too few values to trust
    assert inferred_size([0.123456789] * 10) is None  # not k / n for any small n
    assert split_size([{"val_examples": 50}], []) == (50, "recorded")
    summaries = [{"val_accuracy": v} for v in values]
    assert split_size(summaries, [[{"val_accuracy": acc(1)}]]) == (144, "inferred")


def test_warns_when_best_and_runner_up_are_one_example_apart(tmp_path):
    with CompareWriter(tmp_path) as w:
        for width, k in ((16, 139), (32, 140), (64, 130)):  # 32 over 16 by one example
            w.run("t", "dense", 0, width=width, val=acc(k), test=0.9, flops=1.0, wall=1.0, weights=width,
                  val_examples=N_VAL)
        for width, k in ((16, 130), (32, 140), (64, 137)):  # 32 over 64 by three: separated
            w.run("t", "dense", 1, width=width, val=acc(k), test=0.9, flops=1.0, wall=1.0, weights=width,
                  val_examples=N_VAL)
    arms = compare_results(*load(tmp_path))["t"]
    (warn,) = [n for n in task_notes(arms) if n.startswith("Warning")]
    assert "144 examples, recorded" in warn
    assert "dense grid seed 0 kept w=32 (97.22%) over w=16 (96.53%), 1 example apart" in warn
    assert "seed 1" not in warn


def test_no_warning_when_the_split_separates_the_candidates(tmp_path):
    with CompareWriter(tmp_path) as w:
        for width, k in ((16, 100), (32, 140), (64, 120)):
            w.run("t", "dense", 0, width=width, val=acc(k, 1000), test=0.9, flops=1.0, wall=1.0,
                  weights=width, val_examples=1000)
    assert not any(n.startswith("Warning") for n in task_notes(compare_results(*load(tmp_path))["t"]))


# ------------------------------------------------------------------------------ pruned trials, CPU time

def test_pruned_trials_are_charged_but_never_chosen(tmp_path):
    with CompareWriter(tmp_path) as w:
        w.run("t", "search", 0, width=16, method="dense", val=acc(120), test=0.90, flops=2.0, wall=1.0,
              weights=16)
        # Pruned after a few epochs with a (lucky) better validation accuracy: charged, not chosen.
        w.run("t", "search", 0, width=64, method="dense", val=acc(141), test=0.95, flops=0.5, wall=0.25,
              weights=64, status="pruned")
    (arm,) = compare_results(*load(tmp_path))["t"]
    (c,) = arm.choices
    assert c.width == 16 and c.members == 2 and c.pruned_members == 1
    assert c.flops == 2.5 and c.wall == 1.25
    assert _table([arm])["search arm"]["pruned"] == "1"


def test_cpu_seconds_are_summed_and_shown_when_recorded(tmp_path):
    with CompareWriter(tmp_path) as w:
        for width in (16, 32):
            w.run("t", "dense", 0, width=width, val=acc(100 + width), test=0.9, flops=1.0, wall=2.0,
                  weights=width, cpu_seconds=1.5)
        w.run("t", "adaptive", 0, width=None, role="single", total_width=20, val=acc(120), test=0.9,
              flops=1.0, wall=1.0, weights=20, cpu_seconds=0.75)
    arms = compare_results(*load(tmp_path))["t"]
    table = _table(arms)
    assert table["dense grid"]["CPU s"] == "3.0 ± –" and table["adaptive"]["CPU vs dense grid"] == "0.25×"
    names = {p.name for p in _plots(tmp_path)}
    assert {"cmp-compare-cpu", "cmp-compare-wall"} <= names


def test_no_cpu_plot_without_cpu_seconds(tmp_path):
    _grid_256_vs_32(tmp_path)
    names = {p.name for p in _plots(tmp_path)}
    assert "cmp-compare-wall" in names and "cmp-compare-cpu" not in names
    assert "CPU s" not in compare_table(compare_results(*load(tmp_path))["t"])[0]


def _plots(out):
    from widthlab.report.compare_plots import compare_plots

    runs, epochs = load(out)
    return compare_plots(compare_results(runs, epochs), epochs, "cmp")
