"""Random crop (pad 4) + horizontal flip on batch tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from widthlab.data.augment import CropFlip, crop_flip
from widthlab.data.build import Source, build_task


def _batch(B=48, C=3, H=32, W=32):
    # every pixel distinct, and never 0, so the padding is recognisable
    return torch.arange(1, B * C * H * W + 1, dtype=torch.float32).view(B, C, H, W)


def _explain(out: torch.Tensor, img: torch.Tensor, p: int = 4):
    """The (dy, dx, flipped) for which ``out`` is that crop of the zero-padded ``img``, else None."""
    H, W = img.shape[-2:]
    padded = torch.nn.functional.pad(img, (p, p, p, p))
    for dy in range(2 * p + 1):
        for dx in range(2 * p + 1):
            crop = padded[:, dy:dy + H, dx:dx + W]
            for flipped, cand in ((False, crop), (True, crop.flip(-1))):
                if torch.equal(out, cand):
                    return dy, dx, flipped
    return None


def test_every_output_is_a_zero_padded_crop_possibly_flipped():
    x = _batch()
    out = crop_flip(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    found = [_explain(o, i) for o, i in zip(out, x)]
    assert all(f is not None for f in found)
    flips = [f[2] for f in found]
    assert 0 < sum(flips) < len(flips)  # both flipped and unflipped images occur
    assert len({f[:2] for f in found}) > 10  # many different offsets
    assert torch.equal(x, _batch())  # input untouched


def test_padding_is_zeros_or_the_given_fill():
    x = torch.ones(64, 3, 32, 32)
    out = crop_flip(x, torch.Generator().manual_seed(1))
    assert set(out.unique().tolist()) == {0.0, 1.0}
    fill = torch.tensor([-1.0, -2.0, -3.0])
    out = crop_flip(x, torch.Generator().manual_seed(1), fill=fill)
    for c in range(3):
        assert set(out[:, c].unique().tolist()) <= {1.0, fill[c].item()}
    assert (out != 1).any()


def test_same_generator_state_same_batch():
    x = _batch(16)
    a = crop_flip(x, torch.Generator().manual_seed(5))
    b = crop_flip(x, torch.Generator().manual_seed(5))
    c = crop_flip(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_crop_flip_refuses_non_batches():
    with pytest.raises(ValueError, match="B, C, H, W"):
        crop_flip(torch.zeros(3, 32, 32), torch.Generator())


def test_task_data_augment_pads_with_normalised_black():
    rng = np.random.default_rng(0)
    x = rng.integers(1, 256, size=(40, 3, 32, 32), dtype=np.uint8)
    src = Source(x=x, y=np.arange(40) % 2, task="classification", num_outputs=2, divisor=255.0)
    t = build_task("img", src, seed=0, val_fraction=0.0, test_fraction=0.25, normalize="channel",
                   augment=True)
    assert isinstance(t.augment, CropFlip)
    mean = torch.tensor(t.meta["normalize"]["mean"])
    std = torch.tensor(t.meta["normalize"]["std"])
    assert torch.allclose(t.augment.fill, -mean / std)
    out = t.augment(t.train.tensors[0][:8], torch.Generator().manual_seed(0))
    assert out.shape == (8, 3, 32, 32)
    with pytest.raises(ValueError, match="flattened inputs"):
        build_task("img", src, seed=0, val_fraction=0.0, test_fraction=0.25, normalize="channel",
                   augment=True, flatten=True)
