"""Where per-epoch numbers go: a progress bar or log lines, metrics.jsonl, and TensorBoard if present."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, TextIO


class Progress:
    """A tqdm bar over an epoch's batches on a terminal; one plain line per epoch otherwise."""

    def __init__(self, mode: str, epochs: int, stream: TextIO | None = None, label: str = ""):
        stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if stream.isatty() else "log"
        self.mode, self.epochs, self.stream, self.label = mode, epochs, stream, label
        self._bar = None

    def epoch_start(self, epoch: int, steps: int) -> None:
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=steps, desc=f"{self.label}epoch {epoch + 1}/{self.epochs}",
                             leave=False, file=self.stream, dynamic_ncols=True)

    def step(self, n: int = 1, **postfix: float) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def epoch_end(self, record: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.mode == "none":
            return
        keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_accuracy", "test_loss")
        parts = [f"{k} {record[k]:.4f}" for k in keys if k in record and record[k] is not None]
        print(f"{self.label}epoch {record['epoch']}/{self.epochs} " + " ".join(parts)
              + f" ({record.get('epoch_seconds', 0):.1f}s)", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.mode != "none":
            print(f"{self.label}{text}", file=self.stream, flush=True)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


class MetricsLog:
    """Appends one JSON object per epoch to ``metrics.jsonl``; rewritten from history on resume."""

    def __init__(self, path: Path | None):
        self.path = path

    def rewrite(self, history: list[dict]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as f:
            for rec in history:
                f.write(json.dumps({k: _jsonable(v) for k, v in rec.items()}) + "\n")
        tmp.replace(self.path)

    def append(self, record: dict) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")


class TensorBoard:
    """Scalar logging through torch.utils.tensorboard when the tensorboard package is installed."""

    def __init__(self, logdir: Path | None, enabled: bool | None):
        self.writer = None
        if logdir is None or enabled is False:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if enabled:
                raise ImportError("train.tensorboard is on but tensorboard is not installed "
                                  "(pip install 'widthlab[tensorboard]')") from None
            return
        self.writer = SummaryWriter(log_dir=str(logdir))

    def log(self, record: dict) -> None:
        if self.writer is None:
            return
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "epoch" and v is not None:
                self.writer.add_scalar(k, v, record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
