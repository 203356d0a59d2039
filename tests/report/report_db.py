"""A results database written through ResultStore the way the runner writes it, with known numbers.

Study ``wsmnist`` (classification): dense MLPs at widths 8..64 x 3 seeds, a wide & sparse family at the
weight count of width 8 (widths 16..64 x 3 seeds, plus 128 whose dense reference failed), an adaptive
run whose width shrinks, a failed dense run and a run still in flight. Study ``linreg`` (regression):
dense MLPs at widths 4 and 8 x 2 seeds. ``expected`` holds every number written, so tests recompute
the statistics independently.

Not a ``conftest.py``: other test folders import the top-level ``conftest`` by name, and a second
module of that name would shadow it.
"""

from __future__ import annotations

from pathlib import Path

from widthlab.studies.store import ResultStore

SEEDS = (0, 1, 2)
DENSE_WIDTHS = (8, 16, 32, 64)
SPARSE_WIDTHS = (16, 32, 64, 128)
BASE = 8
EPOCHS = 3


def dense_acc(w: int, seed: int) -> float:
    return 0.80 + 0.02 * DENSE_WIDTHS.index(w) + 0.003 * seed - 0.001 * seed * seed


def sparse_acc(w: int, seed: int) -> float:
    return 0.81 + 0.012 * SPARSE_WIDTHS.index(w) + 0.004 * ((seed * 7) % 3)


def _config(method: dict, w: int, seed: int, data: str = "mnist") -> dict:
    return {"data": {"name": data}, "model": {"name": "mlp", "width": w}, "method": method,
            "train": {"epochs": EPOCHS}, "seed": seed, "axes": {"model.width": w, "seed": seed}}


class Writer:
    """Registers and finishes runs the way the runner does; remembers what it wrote."""

    def __init__(self, store: ResultStore):
        self.store = store
        self.position = 0
        self.expected: dict[str, dict] = {}  # group -> {"label", "runs": [summary, ...]}

    def run(self, study: str, run_id: str, config: dict, summary: dict, epochs: list[dict],
            status: str = "done", error: str | None = None) -> None:
        self.store.register(run_id, study, self.position, config)
        self.position += 1
        self.store.mark_running(run_id)
        for e in epochs:
            self.store.add_epoch(run_id, e["epoch"], e)
        full = {"run_id": run_id, "study": study, "status": status, "error": error, **summary}
        self.store.finish(run_id, status, full, error=error, wall_seconds=summary.get("wall_seconds"))
        if status == "done":
            self.expected.setdefault(summary["group"], {"label": summary["label"], "runs": []})
            self.expected[summary["group"]]["runs"].append(full)


def _curve(final: float, key: str = "accuracy") -> list[dict]:
    # Validation slightly off test, so the two lines are distinguishable.
    out = []
    for ep in range(1, EPOCHS + 1):
        # Accuracy rises to its final value, loss falls to it.
        v = final + (0.05 if key == "loss" else -0.05) * (EPOCHS - ep)
        out.append({"epoch": ep, "step": 10 * ep, "lr": 0.1, "train_loss": 1.0 / ep,
                    f"val_{key}": v - 0.01, f"test_{key}": v, "epoch_seconds": 0.5})
    return out


def build_db(out: Path) -> dict[str, dict]:
    """Write the database described in the module docstring to ``out``; return ``expected``."""
    with ResultStore(out) as store:
        wr = Writer(store)
        for w in DENSE_WIDTHS:
            for s in SEEDS:
                acc = dense_acc(w, s)
                wr.run("wsmnist", f"dense-{w}-{s}", _config({"name": "dense"}, w, s), {
                    "method": "dense", "model": "mlp", "dataset": "mnist", "seed": s, "width": w,
                    "widths": {"hidden": w}, "total_width": w, "counted_weights": 794 * w,
                    "nonzero_weights": 794 * w, "total_parameters": 794 * w + w + 10,
                    "test_accuracy": acc, "train_accuracy": min(1.0, acc + 0.05), "val_accuracy": acc - 0.01,
                    "best_epoch": EPOCHS, "epochs": EPOCHS, "wall_seconds": 10.0 + w / 8 + s,
                    "group": f"dense-{w}", "label": f"dense mlp w={w}", "connectivity": 1.0,
                    "base_width": None, "family": None}, _curve(acc))
        for w in SPARSE_WIDTHS:
            for s in SEEDS:
                acc = sparse_acc(w, s)
                method = {"name": "widesparse", "base_width": BASE}
                wr.run("wsmnist", f"ws-{w}-{s}", _config(method, w, s), {
                    "method": "widesparse", "model": "mlp", "dataset": "mnist", "seed": s, "width": w,
                    "widths": {"hidden": w}, "total_width": w, "counted_weights": 794 * w,
                    "nonzero_weights": 794 * BASE, "total_parameters": 794 * w + w + 10,
                    "test_accuracy": acc, "train_accuracy": acc + 0.04, "val_accuracy": acc - 0.01,
                    "best_epoch": EPOCHS, "epochs": EPOCHS, "wall_seconds": 12.0 + s,
                    "group": f"ws-{w}", "label": f"widesparse mlp w={w} (c={BASE / w:.3f})",
                    "connectivity": BASE / w, "base_width": BASE, "family": f"mlp-n{794 * BASE}"},
                    _curve(acc))
        # Adaptive: starts at 64 and learns to shrink; its width is recorded every epoch.
        ad_epochs = _curve(0.83)
        for e, tw in zip(ad_epochs, (64, 40, 30)):
            e.update(widths={"hidden": tw}, total_width=tw)
        wr.run("wsmnist", "adaptive-0", _config({"name": "adaptive"}, 64, 0), {
            "method": "adaptive", "model": "mlp", "dataset": "mnist", "seed": 0, "width": 64,
            "widths": {"hidden": 30}, "total_width": 30, "counted_weights": 794 * 30,
            "nonzero_weights": 794 * 30, "total_parameters": 794 * 30 + 40, "test_accuracy": 0.83,
            "train_accuracy": 0.9, "best_epoch": 3, "epochs": 3, "wall_seconds": 20.0,
            "group": "adaptive-64", "label": "adaptive mlp w=64", "connectivity": 1.0,
            "base_width": None, "family": None}, ad_epochs)
        # A diverged dense run: the dense reference of the w=128 family member is missing.
        wr.run("wsmnist", "dense-128-0", _config({"name": "dense"}, 128, 0), {
            "method": "dense", "model": "mlp", "dataset": "mnist", "seed": 0, "width": 128,
            "group": "dense-128", "label": "dense mlp w=128"}, _curve(0.5)[:1], status="failed",
            error="loss is nan at epoch 2 (diverged)")
        store.register("dense-256-0", "wsmnist", wr.position, _config({"name": "dense"}, 256, 0))
        store.mark_running("dense-256-0")
        for w in (4, 8):
            for s in (0, 1):
                loss = 0.5 / w + 0.01 * s
                wr.run("linreg", f"reg-{w}-{s}", _config({"name": "dense"}, w, s, data="linreg"), {
                    "method": "dense", "model": "mlp", "dataset": "linreg", "seed": s, "width": w,
                    "widths": {"hidden": w}, "total_width": w, "counted_weights": 5 * w,
                    "nonzero_weights": 5 * w, "total_parameters": 6 * w + 1, "test_loss": loss,
                    "epochs": EPOCHS, "wall_seconds": 1.0, "group": f"reg-{w}",
                    "label": f"dense mlp w={w}", "connectivity": 1.0, "base_width": None,
                    "family": None}, _curve(loss, key="loss"))
        store.write_summary()
    return wr.expected


def make_study_dir(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """A fresh output directory holding the database; for module-scoped fixtures of the tests."""
    out = tmp_path_factory.mktemp("study")
    return out, build_db(out)
