"""Token-level loss and accuracy for sequence outputs (B, T, V) with padding targets ignored."""

import pytest
import torch
import torch.nn.functional as F

from widthlab.train.metrics import IGNORE_INDEX, Accumulator, data_loss


def test_sequence_cross_entropy_ignores_padding():
    g = torch.Generator().manual_seed(0)
    out = torch.randn(3, 5, 7, generator=g)
    y = torch.randint(0, 7, (3, 5), generator=g)
    y[0, 3:] = IGNORE_INDEX
    y[2, 1:] = IGNORE_INDEX
    valid = y != IGNORE_INDEX
    want = F.cross_entropy(out[valid], y[valid])
    assert data_loss("cross_entropy", out, y).item() == pytest.approx(want.item(), rel=1e-6)
    # (B, C) outputs are unchanged.
    assert data_loss("cross_entropy", out[:, 0], y[:, 1].clamp(min=0)).item() == pytest.approx(
        F.cross_entropy(out[:, 0], y[:, 1].clamp(min=0)).item())


def test_accumulator_counts_tokens():
    g = torch.Generator().manual_seed(1)
    acc = Accumulator(True, torch.device("cpu"))
    outs, ys = [], []
    for _ in range(3):
        out = torch.randn(4, 6, 5, generator=g)
        y = out.argmax(-1)
        y[:, 4:] = IGNORE_INDEX  # padding
        y[0, 0] = (y[0, 0] + 1) % 5  # one wrong token
        acc.add(data_loss("cross_entropy", out, y), out, y)
        outs.append(out)
        ys.append(y)
    out, y = torch.cat(outs), torch.cat(ys)
    valid = y != IGNORE_INDEX
    res = acc.result("train")
    assert res["train_accuracy"] == pytest.approx(1 - 3 / int(valid.sum()))
    assert res["train_loss"] == pytest.approx(F.cross_entropy(out[valid], y[valid]).item(), rel=1e-6)
    assert acc.count == 12 and int(acc.tokens) == 48
