"""Estimated floating-point operations of the counted (Linear/Conv) layers of a model.

The estimate counts multiply-adds of weight layers only (activations, norms, pooling and attention
products are ignored, as is usual for width studies, where weight layers dominate): a Linear layer
applied to ``m`` input rows costs ``2 m nnz(W)`` FLOPs, a convolution ``2 H_out W_out nnz(W)`` per
example. ``nnz`` is the number of *nonzero* weights, i.e. the cost of an implementation that skips
masked weights (the CSR path); masked-dense execution costs the dense count. Training costs about
three forward passes per example (forward, input gradient, weight gradient).

How often each layer is applied per example (its "spatial factor": output positions of a conv,
sequence length of a token-wise Linear) is measured once with forward hooks on one example and cached;
widths can then change every step without another forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from widthlab.models.counting import counted_layers

TRAIN_FORWARD_RATIO = 3.0  # forward + backward (input and weight gradients) ~ 3 forward passes


def weight_count(module: nn.Module, nonzero: bool) -> int:
    """Dense or *structurally* nonzero weight count of one counted layer.

    Structural: a masked layer counts its mask, a sparse layer its stored values; a dense layer counts
    every weight even if some happen to be zero (no implementation would skip those).
    """
    if nonzero:
        fn = getattr(module, "num_nonzero_weights", None)
        if callable(fn):
            return int(fn())
        mask = getattr(module, "weight_mask", None)
        if mask is not None:
            return int(mask.sum())
    fn = getattr(module, "num_counted_weights", None)
    return int(fn()) if callable(fn) else int(module.weight.numel())


@torch.no_grad()
def spatial_factors(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Applications per example of each counted layer, measured on ``example`` (one input, no batch)."""
    factors: dict[str, int] = {}
    hooks = []
    for name, module in counted_layers(model):
        def hook(mod, inp, out, name=name):
            out_t = out[0] if isinstance(out, tuple) else out
            per_unit = out_t.numel() // max(out_t.shape[0], 1)  # drop the batch axis
            units = getattr(mod, "out_features", None) or getattr(mod, "out_channels", None) or 1
            factors[name] = factors.get(name, 0) + max(per_unit // max(units, 1), 1)
        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(example.unsqueeze(0))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return factors


def forward_flops(model: nn.Module, factors: dict[str, int], nonzero: bool = True,
                  layers: Iterable[tuple[str, nn.Module]] | None = None) -> int:
    """FLOPs of one forward pass of one example at the model's current widths."""
    total = 0
    for name, module in layers if layers is not None else counted_layers(model):
        total += 2 * factors.get(name, 1) * weight_count(module, nonzero)
    return total
