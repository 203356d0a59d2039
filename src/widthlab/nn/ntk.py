"""NTK parametrisation: O(1) weights, with the 1/sqrt(fan_in) scale moved into the forward pass.

Under the standard parametrisation a layer computes ``W x + b`` with ``W ~ N(0, 1/fan_in)``; under the
NTK parametrisation (Jacot et al. 2018) it computes ``W x / sqrt(fan_in) + b`` with ``W ~ N(0, 1)``.
Both give the same pre-activations at init, but the gradient of ``W`` differs by a factor ``fan_in``, so
learning rates are on another scale (Golubeva et al. 2021, App. A, use lr up to 875).

The wide & sparse paper's NTK-style MLP (Golubeva et al. 2021, App. A, Fig. 8 MLPs) is

    h = ReLU(W1 x / sqrt(784));   out = W2 h / sqrt(n)

where the prefactor uses the *full* (dense) fan-in, also for a sparse layer.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

NTKInit = Literal["normal", "uniform"]


class NTKLinear(nn.Linear):
    """``y = x W^T / sqrt(fan_in) + b`` with O(1) weights.

    A subclass of :class:`torch.nn.Linear` so that weight counting and width surgery treat it exactly as
    a Linear (same ``weight``/``bias`` parameters, same shapes). ``fan_in`` is read from the weight's
    current shape at every forward, so the scale stays right after width surgery changes the number
    of input columns (``in_features`` is only the construction-time value).

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: whether to learn an additive bias. It starts at zero and is not scaled.
        init: ``"normal"`` draws ``W ~ N(0, 1)``, the paper's and the theory's choice (default).
            ``"uniform"`` draws ``W ~ U(-1, 1)``, what the official wide & sparse code does because its
            ``init_distrib`` flag is never overridden (variance 1/3; Golubeva et al. 2021, App. A, and its
            official code).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 init: NTKInit = "normal", device=None, dtype=None):
        if init not in ("normal", "uniform"):
            raise ValueError(f"NTKLinear init must be 'normal' or 'uniform', got {init!r}")
        # Set before nn.Linear.__init__, which calls reset_parameters().
        self.init = init
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        if self.init == "normal":
            nn.init.normal_(self.weight, 0.0, 1.0)
        else:
            nn.init.uniform_(self.weight, -1.0, 1.0)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @property
    def fan_in(self) -> int:
        """Current number of input columns of ``weight`` (changes under width surgery)."""
        return int(self.weight.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Scale the (usually narrower) output rather than the input; identical up to rounding.
        y = F.linear(x, self.weight) * (1.0 / math.sqrt(self.fan_in))
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, parametrization=ntk, init={self.init}"
