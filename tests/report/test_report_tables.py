"""Results-table statistics, recomputed independently from the numbers the fixture wrote."""

from __future__ import annotations

import statistics

import pytest
from report_db import BASE, SPARSE_WIDTHS, dense_acc, make_study_dir, sparse_acc

from widthlab.report import format_results_table
from widthlab.report.tables import aggregate, failed_runs, status_counts, width_fraction
from widthlab.studies.store import ResultStore


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    return make_study_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def runs(study_dir):
    out, _ = study_dir
    with ResultStore(out, create=False) as store:
        return store.runs()


@pytest.fixture(scope="module")
def groups(runs):
    return {g.group: g for g in aggregate(runs)}


def test_means_and_sample_stds_match_statistics(groups, study_dir):
    _, expected = study_dir
    checked = 0
    for gid, exp in expected.items():
        g = groups[gid]
        assert g.label == exp["label"]
        assert g.n == len(exp["runs"])
        for key in ("test_accuracy", "test_loss", "train_accuracy", "nonzero_weights", "total_width",
                    "wall_seconds"):
            xs = [r[key] for r in exp["runs"] if r.get(key) is not None]
            if not xs:
                assert g.stats[key].mean is None
                continue
            assert g.stats[key].mean == pytest.approx(statistics.mean(xs), rel=1e-12)
            if len(xs) > 1:
                assert g.stats[key].std == pytest.approx(statistics.stdev(xs), rel=1e-12)
            else:
                assert g.stats[key].std is None
            checked += 1
    assert checked > 50


def test_headline_metric_is_accuracy_or_loss(groups):
    assert groups["dense-8"].metric == "test_accuracy"
    assert groups["reg-4"].metric == "test_loss"


def test_width_fraction_closed_form(groups):
    base = statistics.mean(dense_acc(BASE, s) for s in range(3))
    for w in SPARSE_WIDTHS[:-1]:
        sparse = statistics.mean(sparse_acc(w, s) for s in range(3))
        dense = statistics.mean(dense_acc(w, s) for s in range(3))
        assert groups[f"ws-{w}"].width_fraction == pytest.approx((sparse - base) / (dense - base), rel=1e-9)
    # Dense w=128 only failed: no reference, no fraction; dense groups never get one.
    assert groups["ws-128"].width_fraction is None
    assert all(g.width_fraction is None for g in groups.values() if g.method != "widesparse")


def test_width_fraction_matches_the_paper_imagenet_numbers():
    # Golubeva et al. 2021, Table 1: ImageNet top-1, base 68.03; (sparse, dense) at widths 90, 128, 181, 256.
    pairs = [(69.56, 69.11), (70.02, 70.22), (70.66, 70.91), (70.53, 71.89)]
    got = [round(width_fraction(s, 68.03, d), 2) for s, d in pairs]
    assert got == [1.42, 0.91, 0.91, 0.65]
    assert width_fraction(70.0, 68.0, 68.0) is None


def test_failed_and_running_runs_are_counted_and_listed(runs, groups):
    assert status_counts(runs) == {"done": 29, "failed": 1, "running": 1, "pending": 0}
    (failed,) = failed_runs(runs)
    assert failed["run_id"] == "dense-128-0" and "nan" in failed["error"]
    assert groups["dense-128"].failed == 1 and groups["dense-128"].n == 0
    assert not any("256" in gid for gid in groups)  # still running: not in the table


def test_format_results_table(runs, groups):
    text = format_results_table([r for r in runs if r["study"] == "wsmnist"])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1  # padded: columns line up in a terminal
    assert lines[0].startswith("| group") and set(lines[1]) <= set("|-:")
    assert len(lines) == 2 + sum(g.study == "wsmnist" for g in groups.values())
    dense8 = next(line for line in lines if "dense mlp w=8 " in line)
    xs = [100 * dense_acc(8, s) for s in range(3)]
    assert f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" in dense8
    adaptive = next(line for line in lines if "adaptive" in line)
    assert "83.00 ± –" in adaptive  # one seed: no std
    fraction = groups["ws-16"].width_fraction
    assert f"{fraction:.2f}" in next(line for line in lines if "w=16 (c=" in line)
    # Columns follow the task: accuracy here, loss for the regression study.
    assert "test acc (%)" in lines[0] and "test loss" not in lines[0]
    both = format_results_table(runs)
    assert "## linreg" in both and "## wsmnist" in both and text in both
    linreg = both.split("## linreg")[1].split("## wsmnist")[0]
    assert "test loss" in linreg and "test acc" not in linreg


def test_empty_and_partial_rows_never_crash():
    assert format_results_table([]) == "(no finished runs yet)"
    rows = [
        {"run_id": "a", "study": "s", "status": "done", "config": {"seed": 0}, "summary": None},
        {"run_id": "b", "study": "s", "status": "done", "config": {"seed": 1}, "summary": {}},
        {"run_id": "c", "study": "s", "status": "failed", "error": "boom", "config": {"model": {"name": "x"}},
         "summary": None},
        {"run_id": "d", "study": "s", "status": "done", "config": {"model": {"name": "mlp", "width": 4}},
         "summary": {"test_accuracy": "inf", "widths": {"a": 3, "b": 5}}},
    ]
    groups = aggregate(rows)
    # a and b differ only by seed: one group.
    assert sorted(g.n for g in groups) == [0, 1, 2]
    d = next(g for g in groups if g.width == 4)
    assert d.stats["test_accuracy"].mean is None and d.stats["total_width"].mean == 8
    assert "boom" in failed_runs(rows)[0]["error"]
    assert "| group" in format_results_table(rows)
