"""Random crop with padding and horizontal flip on a batch tensor: the CIFAR/SVHN training augmentation.

Errica et al. 2025 and Golubeva et al. 2021 (App. A) both train with RandomCrop(32, padding=4) and a random
horizontal flip (p = 1/2). Here both are one gather over the padded batch, with no Python loop over
images, so the transform runs on the batch's device inside the training step. Randomness comes only
from the ``torch.Generator`` passed in, so a fixed generator state gives the same augmented batch.
"""

from __future__ import annotations

import torch


def crop_flip(x: torch.Tensor, generator: torch.Generator, *, padding: int = 4,
              fill: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Pad by ``padding``, crop back to (H, W) at a uniform random offset, flip half the images.

    Args:
        x: batch (B, C, H, W).
        generator: source of the B crop offsets (rows, then columns) and B flip coins, drawn in that
            order on the generator's device and moved to ``x``'s device.
        padding: pixels of padding on every side; offsets are uniform in ``[0, 2·padding]``.
        fill: padding value: a scalar, or a (C,) tensor of per-channel values.

    Returns:
        a new (B, C, H, W) tensor; ``x`` is not modified.
    """
    if x.dim() != 4:
        raise ValueError(f"crop_flip needs a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    B, C, H, W = x.shape
    p = padding
    # Pad onto an explicit canvas because F.pad takes one scalar and the fill may be per channel.
    fill_c = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
    if fill_c.shape[0] not in (1, C):
        raise ValueError(f"fill has {fill_c.shape[0]} values for {C} channels")
    padded = fill_c.expand(B, C, H + 2 * p, W + 2 * p).clone()
    padded[:, :, p:p + H, p:p + W] = x

    gdev = generator.device
    offsets = torch.randint(0, 2 * p + 1, (2, B), generator=generator, device=gdev).to(x.device)
    flip = (torch.rand(B, generator=generator, device=gdev) < 0.5).to(x.device)
    ar_h = torch.arange(H, device=x.device)
    ar_w = torch.arange(W, device=x.device)
    rows = offsets[0, :, None] + ar_h                                           # (B, H)
    cols = offsets[1, :, None] + torch.where(flip[:, None], W - 1 - ar_w, ar_w)  # (B, W)
    # One gather over the flattened padded plane, shared by all channels of an image.
    flat = (rows[:, :, None] * (W + 2 * p) + cols[:, None, :]).view(B, 1, H * W)
    out = padded.view(B, C, -1).gather(2, flat.expand(B, C, H * W))
    return out.view(B, C, H, W)


class CropFlip:
    """The ``TaskData.augment`` callable: ``(x, generator) -> x`` with fixed padding and fill.

    Args:
        padding: pixels of padding on every side (4 in both specs).
        fill: per-channel padding values. The specs pad raw pixels with black *before* normalising;
            this transform runs on normalised tensors, so pass the normalised value of a black pixel
            (``-mean / std``) to reproduce that exactly, or 0 to pad with the channel mean.
    """

    def __init__(self, padding: int = 4, fill: float | torch.Tensor = 0.0):
        self.padding = padding
        self.fill = torch.as_tensor(fill, dtype=torch.float32).reshape(-1)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return crop_flip(x, generator, padding=self.padding, fill=self.fill)

    def __repr__(self) -> str:
        return f"CropFlip(padding={self.padding}, fill={[round(v, 4) for v in self.fill.tolist()]})"
