"""The trainer (knows no method), callbacks, optimizer surgery, checkpoints, metrics."""
