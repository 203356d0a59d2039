"""Comparison tables: selection by validation, cost of the whole search, relative compute."""

import statistics

from widthlab.report.compare import compare_results, compare_table, dense_reference, is_compare


def _row(pos, task, arm, role, method, seed, width, *, val, test, flops, wall, weights, status="done",
         metric="accuracy", widths=None):
    summary = {"method": method, "seed": seed, "width": width, "nonzero_weights": weights,
               "train_flops": flops, "wall_seconds": wall, "widths": widths or {"hidden.0": width},
               f"val_{metric}": val, f"test_{metric}": test, "label": f"{task}: {arm} w={width}"}
    return {"run_id": f"r{pos}", "study": "cmp", "position": pos, "status": status, "error": None,
            "config": {"task": task, "arm": arm, "role": role, "seed": seed, "model": {"name": "mlp"},
                       "method": {"name": method}},
            "summary": summary if status == "done" else {}, "wall_seconds": wall}


# (width, seed) -> (val, test, flops, wall); seed 0 prefers width 32, seed 1 ties 16 and 32 on val.
DENSE = {(16, 0): (0.90, 0.88, 1e6, 2.0), (32, 0): (0.95, 0.93, 2e6, 3.0), (64, 0): (0.94, 0.95, 4e6, 5.0),
         (16, 1): (0.96, 0.91, 1e6, 2.5), (32, 1): (0.96, 0.97, 2e6, 3.5), (64, 1): (0.92, 0.90, 4e6, 6.0)}
ADAPTIVE = {0: (0.97, 0.96, 1.5e6, 4.0, 40), 1: (0.93, 0.94, 2.5e6, 5.0, 36)}


def _rows():
    rows, pos = [], 0
    for (w, s), (val, test, flops, wall) in DENSE.items():
        rows.append(_row(pos, "t", "dense", "search", "dense", s, w, val=val, test=test, flops=flops,
                         wall=wall, weights=10 * w))
        pos += 1
    for s, (val, test, flops, wall, width) in ADAPTIVE.items():
        rows.append(_row(pos, "t", "adaptive", "single", "adaptive", s, 16, val=val, test=test, flops=flops,
                         wall=wall, weights=10 * width, widths={"hidden.0": width}))
        pos += 1
    rows.append(_row(pos, "t", "adaptive", "single", "adaptive", 2, 16, val=0, test=0, flops=0, wall=1.0,
                     weights=0, status="failed"))
    return rows


def test_search_picks_best_validation_and_pays_for_every_member():
    rows = _rows()
    assert is_compare(rows)
    arms = {a.arm: a for a in compare_results(rows)["t"]}
    dense = arms["dense"]
    # seed 0: width 32 (val 0.95) although width 64 tests better; seed 1: tie -> the smaller model.
    assert [(c.seed, c.run_id) for c in dense.choices] == [(0, "r1"), (1, "r3")]
    assert [c.test for c in dense.choices] == [0.93, 0.91]
    assert [c.flops for c in dense.choices] == [7e6, 7e6]
    assert [c.wall for c in dense.choices] == [10.0, 12.0]
    assert dense.stat("test").mean == statistics.fmean([0.93, 0.91])
    assert dense.selected_by == "validation"
    ada = arms["adaptive"]
    assert [c.test for c in ada.choices] == [0.96, 0.94] and ada.failed == 1 and ada.selected_by == "only run"
    assert dense_reference(list(arms.values())) is dense


def test_table_shows_relative_compute_against_the_dense_grid():
    header, rows = compare_table(compare_results(_rows())["t"])
    table = {r[0]: dict(zip(header, r)) for r in rows}
    assert list(table) == ["dense grid", "adaptive"]
    assert table["dense grid"]["test acc (%)"] == "92.00 ± 1.41"
    assert table["dense grid"]["FLOPs vs dense grid"] == "1×"
    assert table["adaptive"]["FLOPs vs dense grid"] == f"{2e6 / 7e6:.3g}×"
    assert table["adaptive"]["wall vs dense grid"] == f"{4.5 / 11.0:.3g}×"
    assert table["adaptive"]["selected width"] == "40 · 36 (median 36)" and table["adaptive"]["failed"] == "1"
    assert table["dense grid"]["selected width"] == "32 · 16 (median 16)"
    assert table["dense grid"]["runs/seed"] == "3"


def test_regression_selects_the_lowest_validation_loss():
    rows = [_row(i, "reg", "dense", "search", "dense", 0, w, val=v, test=t, flops=1.0, wall=1.0, weights=w,
                 metric="loss") for i, (w, v, t) in enumerate([(4, 0.5, 0.6), (8, 0.2, 0.3), (16, 0.3, 0.1)])]
    (arm,) = compare_results(rows)["reg"]
    assert arm.metric == "test_loss" and arm.choices[0].test == 0.3 and arm.choices[0].flops == 3.0
    header, _ = compare_table([arm])
    assert "test loss" in header


def test_verdict_names_the_recommended_method_and_its_relative_cost():
    from widthlab.report.verdict import verdicts

    ((v, line),) = verdicts(compare_results(_rows()))
    # adaptive: mean FLOPs 2e6 = 2/7 of the grid's 7e6, mean wall 4.5 s = 4.5/11 of the grid's 11 s;
    # 95.00 ± 1.41 against the grid's 92.00 ± 1.41: 3 points apart, beyond 2 standard errors of the
    # difference (2 x sqrt(1.41²/2 + 1.41²/2) = 2.83).
    assert v.recommended.arm == "adaptive" and not v.ties and [a.arm for a, _ in v.behind] == ["dense"]
    assert line.startswith("t: use adaptive at width 36 (chosen per seed: 40 · 36); test accuracy "
                           "95.00 ± 1.41% over 2 seeds (the best mean). Cost: "
                           f"{2 / 7:.3g}× the dense grid's training FLOPs, {4.5 / 11:.3g}× its wall seconds.")
    assert "Behind, beyond seed noise: dense grid 92.00 ± 1.41% (-3.00 points)." in line


def test_failed_search_members_are_charged_and_flagged():
    rows = _rows()
    # A third dense member for seed 0 that failed after 50 s.
    rows.append(_row(99, "t", "dense", "search", "dense", 0, 128, val=0, test=0, flops=0, wall=50.0,
                     weights=0, status="failed"))
    arms = {a.arm: a for a in compare_results(rows)["t"]}
    seed0 = arms["dense"].choices[0]
    assert seed0.members == 4 and seed0.failed_members == 1
    assert seed0.wall == 10.0 + 50.0 and seed0.flops == 7e6 and seed0.run_id == "r1"
    header, cells = compare_table(list(arms.values()))
    dense = dict(zip(header, cells[0]))
    assert dense["train FLOPs"].startswith("≥ ") and dense["runs/seed"] == "3–4" and dense["failed"] == "1"


def test_the_metric_is_decided_per_task_even_when_the_first_method_failed():
    rows = [_row(0, "t", "dense", "search", "dense", 0, 8, val=0, test=0, flops=0, wall=1.0, weights=0,
                 status="failed"),
            _row(1, "t", "adaptive", "single", "adaptive", 0, 8, val=0.9, test=0.91, flops=1.0, wall=1.0,
                 weights=80)]
    arms = compare_results(rows)["t"]
    assert [a.metric for a in arms] == ["test_accuracy", "test_accuracy"]
    header, cells = compare_table(arms)
    assert "test acc (%)" in header and dict(zip(header, cells[1]))["test acc (%)"] == "91.00 ± –"
