"""Small study files for the studies tests (iris: 150 rows, so a run takes well under a second)."""

from pathlib import Path

TINY = """\
name: tiny
description: tiny iris study for tests
data: {{name: iris}}
model: {{name: mlp, width: 8}}
method: {{name: dense}}
train: {{epochs: {epochs}, batch_size: 16, optimizer: {{name: adam, lr: 0.01}}}}
seeds: [0, 1]
sweep:
  model.width: [4, 16]
{extra}"""


def tiny_study(tmp: Path, epochs: int = 3, extra: str = "", name: str = "tiny.yaml") -> Path:
    path = tmp / name
    path.write_text(TINY.format(epochs=epochs, extra=extra))
    return path
