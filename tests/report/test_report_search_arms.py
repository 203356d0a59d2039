"""Search arms (Optuna TPE, random search) and fixed retrain controls in the comparison report:
names read from the runs' tags, row order, the verdict's reference search arm."""

from widthlab.report.compare import compare_results, search_reference
from widthlab.report.compare_tables import compare_table
from widthlab.report.verdict import task_verdict, verdict_line


def _row(pos, arm, seed, width, *, val, test, flops, status="done", **tags):
    role = "search" if "sampler" in tags or arm == "dense" else "single"
    method = tags.pop("method", "dense")
    summary = {"method": method, "seed": seed, "width": width, "nonzero_weights": 10 * width,
               "train_flops": flops, "wall_seconds": 1.0, "widths": {"hidden.0": width},
               "val_accuracy": val, "test_accuracy": test, "epochs": 10, "best_epoch": 10}
    return {"run_id": f"r{pos}", "study": "cmp", "position": pos, "status": status, "error": None,
            "config": {"task": "t", "arm": arm, "role": role, "seed": seed, "model": {"name": "mlp"},
                       "method": {"name": method}, **tags},
            "summary": summary, "wall_seconds": 1.0}


def _rows():
    rows = []
    for seed in (0, 1):
        rows += [_row(len(rows), "dense", seed, w, val=0.9 + w / 1000, test=0.9, flops=w * 1e6)
                 for w in (8, 64)]
        rows.append(_row(len(rows), "adaptive", seed, 40, val=0.95, test=0.91, flops=5e7, method="adaptive"))
    for seed in (0, 1):  # the dynamic runs come after the fixed ones in the study's order
        for n, w in enumerate((16, 32)):
            rows.append(_row(len(rows), "random_search", seed, w, val=0.9, test=0.9, flops=w * 1e6,
                             sampler="random", pruner="hyperband", trial=n))
            rows.append(_row(len(rows), "search", seed, w, val=0.9 + w / 1000, test=0.92, flops=w * 1e6,
                             sampler="tpe", pruner="hyperband", trial=n,
                             status="pruned" if n == 1 and seed == 1 else "done"))
        rows.append(_row(len(rows), "adaptive_retrain", seed, 40, val=0.94, test=0.9, flops=4e7,
                         retrain_of="adaptive"))
    return rows


def test_search_arms_are_named_by_sampler_and_pruner_and_retrain_follows_its_arm():
    arms = compare_results(_rows())["t"]
    _, cells = compare_table(arms)
    assert [r[0] for r in cells] == ["dense grid", "adaptive", "adaptive → fixed retrain",
                                     "random_search (random sampling + Hyperband)",
                                     "search (Optuna TPE + Hyperband)"]


def test_the_reference_search_arm_is_the_model_based_one():
    arms = compare_results(_rows())["t"]
    assert search_reference(arms).arm == "search"  # random search comes first in order, TPE is the reference
    search = next(a for a in arms if a.arm == "search")
    # Seed 1's width-32 trial was pruned: charged (16 + 32 MFLOPs) but the kept model is width 16.
    assert [c.width for c in search.choices] == [32, 16]
    assert [c.flops for c in search.choices] == [48e6, 48e6]
    assert [c.pruned_members for c in search.choices] == [0, 1]


def test_verdict_states_cost_against_the_search_arm_and_names_the_retrain():
    arms = compare_results(_rows())["t"]
    v = task_verdict("t", arms)
    line = verdict_line(v, arms)
    # Every arm has 2 seeds with zero spread: the best mean (search, 92%) is beyond noise of the rest.
    assert v.recommended.arm == "search"
    assert "it is the search arm" in line
    assert "adaptive → fixed retrain 90.00" in line


def test_a_fixed_retrain_is_charged_the_run_that_found_its_width():
    arms = {a.arm: a for a in compare_results(_rows())["t"]}
    retrain, found = arms["adaptive_retrain"], arms["adaptive"]
    # Its own 40 MFLOPs plus the adaptive run's 50 MFLOPs, per seed; wall seconds likewise (1 s each).
    assert [c.flops for c in retrain.choices] == [9e7, 9e7]
    assert [c.wall for c in retrain.choices] == [2.0, 2.0]
    assert [c.members for c in retrain.choices] == [2, 2]
    assert [c.flops for c in found.choices] == [5e7, 5e7]  # the arm itself is unchanged
