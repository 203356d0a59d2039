"""Weight counts as the wide & sparse paper defines them (Golubeva et al. 2021, §2: weights of Linear and
Conv layers, no biases).

The paper's N counts only the ``weight`` tensors of Linear and convolution layers: the stem conv, every
block conv, 1x1 shortcut convs and the final Linear. Every bias (the classifier's included) and every
normalisation parameter is excluded. ``count_parameters`` is the ordinary total, for comparison.

A layer that is not an ``nn.Linear``/``nn.ConvNd`` subclass (a CSR sparse layer, say) opts in by
declaring the class attribute ``counted_weight = True``. It is then counted by ``weight.numel()`` unless
it defines ``num_counted_weights()`` (its dense size) and, for the nonzero count,
``num_nonzero_weights()`` -- needed when its weight is not stored as one dense tensor.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

_COUNTED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_counted_layer(module: nn.Module) -> bool:
    """Whether ``module``'s weight enters the paper's weight count N."""
    return isinstance(module, _COUNTED_TYPES) or bool(getattr(type(module), "counted_weight", False))


def counted_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(qualified_name, module)`` of every counted layer, in ``named_modules()`` order.

    The order is the model's registration order (for the models here: forward order), which is what a
    per-layer budget allocation walks over.
    """
    for name, m in model.named_modules():
        if is_counted_layer(m):
            yield name, m


def _layer_numel(m: nn.Module) -> int:
    if hasattr(m, "num_counted_weights"):
        return int(m.num_counted_weights())
    return int(m.weight.numel())


def _layer_nonzero(m: nn.Module) -> int:
    if hasattr(m, "num_nonzero_weights"):
        return int(m.num_nonzero_weights())
    return int(torch.count_nonzero(m.weight.detach()))


def count_weights(model: nn.Module) -> int:
    """N: number of entries of the counted layers' weight tensors (no biases, no norm parameters).

    Works on ``meta``-device models, so the count of a 180M-weight network needs no memory.
    """
    return sum(_layer_numel(m) for _, m in counted_layers(model))


def count_nonzero_weights(model: nn.Module) -> int:
    """Nonzero entries of the same weight tensors as :func:`count_weights` (sparse models' true N)."""
    return sum(_layer_nonzero(m) for _, m in counted_layers(model))


def count_parameters(model: nn.Module) -> int:
    """All parameter entries, biases and norm parameters included (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters())
