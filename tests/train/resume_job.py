"""A training job run as a real subprocess by test_resume.py: `python resume_job.py RUN_DIR [resume]`.

It sleeps a little after each epoch so that the test can SIGKILL it mid-training, and writes the final
weights to RUN_DIR/weights.pt.
"""

import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_blobs_task  # noqa: E402
from widthlab.train.config import OptimConfig, ScheduleConfig, TrainConfig  # noqa: E402
from widthlab.train.trainer import Trainer  # noqa: E402


class Slow:
    def on_epoch_end(self, trainer):
        time.sleep(0.3)


class Dropper:
    """Consumes the global RNG every step, so resume must restore RNG state exactly."""

    def on_step_end(self, trainer):
        torch.rand(3)


def main() -> None:
    run_dir = Path(sys.argv[1])
    resume = len(sys.argv) > 2 and sys.argv[2] == "resume"
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))
    cfg = TrainConfig(epochs=8, batch_size=16, progress="none", checkpoint_every=1, seed=3,
                      optimizer=OptimConfig(name="adamw", lr=1e-2, weight_decay=1e-2),
                      schedule=ScheduleConfig(name="onecycle"))
    res = Trainer(model, make_blobs_task(n=512), cfg, [Slow(), Dropper()], run_dir).fit(resume=resume)
    torch.save({k: v for k, v in model.state_dict().items()}, run_dir / "weights.pt")
    print(res.status, res.epochs)


if __name__ == "__main__":
    main()
