"""Training jobs of test_ddp_methods.py, run as one rank of a data-parallel job or in-process.

As a rank: ``python ddp_methods_job.py TASKS.json`` with the environment torchrun would set (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); it joins the gloo group through the library's own
``init_from_env`` and runs every task in order. In-process (the 1-process reference): ``run_task(task)``.

A task trains one method on a small blobs task through the real Trainer and writes this rank's result
to ``OUT/rank<r>.pt``: final model state, the widths after every optimizer step, per-epoch training
loss, and the error message if the fit raised (the disagreement tasks expect one).
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_blobs_task  # noqa: E402
from widthlab.methods.adaptive.layer import collect_sites  # noqa: E402
from widthlab.models import create_model  # noqa: E402
from widthlab.nn.masked import masked_layers  # noqa: E402
from widthlab.studies.methods import build_method  # noqa: E402
from widthlab.train import distributed  # noqa: E402
from widthlab.train.config import OptimConfig, TrainConfig  # noqa: E402
from widthlab.train.trainer import Trainer, seed_everything  # noqa: E402

SEED = 3
METHODS = {
    # method options; an optimizer under which each method does something in a few epochs
    "widesparse": ({"base_width": 8}, OptimConfig(name="sgd", lr=0.1, momentum=0.9)),
    # lambda0 0.2 -> D = 12 units; Adam at lr 0.05 moves lam across width thresholds within an epoch.
    "adaptive": ({"lambda0": 0.2, "sigma_theta": 1.0}, OptimConfig(name="adam", lr=0.05)),
}


class WidthTrace:
    """Every site's width after each optimizer step (after the method's resize, which comes first)."""

    def __init__(self):
        self.widths: list[list[int]] = []

    def on_step_end(self, trainer):
        self.widths.append(list(trainer.model.widths().values()))


def corrupt(method: str, model: torch.nn.Module) -> None:
    """Make this rank's model disagree with the others the way a seeding bug would."""
    if method == "widesparse":  # move one free weight of the first masked layer elsewhere
        _, layer = next(iter(masked_layers(model)))
        m = layer.weight_mask.clone().view(-1)
        on, off = int(m.nonzero()[0]), int((~m).nonzero()[0])
        m[on], m[off] = False, True
        layer.set_mask(m.view_as(layer.weight_mask))
    else:  # another lam: a different target width at fit start
        with torch.no_grad():
            for s in collect_sites(model):
                for p in s.scale.dist.parameters():
                    p.mul_(0.5)


def run_task(task: dict) -> dict:
    """Build, fit, and write this rank's result; returns it too."""
    method, out = task["method"], Path(task["out"])
    options, optim = METHODS[method]
    seed_everything(SEED)
    data = make_blobs_task(n=256, d=8)
    model = create_model("mlp", input_shape=data.input_shape, num_outputs=data.num_outputs, width=16, depth=2)
    plan = build_method(method, options, model, data, seed=SEED)
    ctx = distributed.current()
    if task.get("corrupt") and ctx.rank == 1:
        corrupt(method, plan.model)
    # batch 25 over 2 ranks: slices of 13 and 12 rows, and a last batch of 6
    cfg = TrainConfig(epochs=task["epochs"], batch_size=25, optimizer=optim, select_best=False,
                      checkpoint_every=1, progress="none", seed=SEED)
    trace = WidthTrace()
    result: dict = {"error": None}
    try:
        res = Trainer(plan.model, data, cfg, [*plan.callbacks, trace], run_dir=task["run_dir"]).fit(
            resume=task.get("resume", False))
        result["train_loss"] = [h["train_loss"] for h in res.history]
    except distributed.RankMismatch as e:
        result["error"] = str(e)
    result["model"] = {k: v.detach().clone() for k, v in plan.model.state_dict().items()}
    result["widths"] = trace.widths
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result, out / f"rank{ctx.rank}.pt")
    return result


def main() -> None:
    torch.set_num_threads(1)
    ctx = distributed.init_from_env(torch.device("cpu"))
    assert ctx.active, "run me with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set (see test_ddp_methods.py)"
    for task in json.loads(Path(sys.argv[1]).read_text()):
        run_task(task)
    distributed.shutdown()


if __name__ == "__main__":
    main()
