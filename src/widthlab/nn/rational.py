"""Per-neuron normalised rational activation of self-expanding networks (Mitchell et al. 2023, the rational
activation).

    σ(x) = [ l·x + (2v·x + c) / (1 + x²) ] / ‖(v, c, l)‖

The basis {x, 2x/(1+x²), 1/(1+x²)} spans the identity (v = c = 0, l = 1) and smooth bumps; dividing by
the norm of the coefficient vector makes σ invariant to rescaling (v, c, l), so only its direction
matters. SENN inserts new layers with identity activations, so identity must give σ(x) == x exactly.

How the norm is guarded against (v, c, l) = 0 -- the ``eps_mode`` choice:

* ``"floor"`` (default): ‖·‖ = sqrt(max(v² + c² + l², eps)). At identity v² + c² + l² is exactly 1.0 in
  every float format, so the denominator is exactly 1 and σ(x) == x bitwise, in float32 and float64.
  Only coefficient vectors with norm below sqrt(eps) (1e-4) behave differently from the official code.
* ``"add"`` (official senn_mlp code): ‖·‖ = sqrt(v² + c² + l² + eps). In float32 1 + 1e-8 rounds to 1 so
  identity is still exact, but in float64 the output is x / sqrt(1 + 1e-8) (Mitchell et al. 2023, official
  code).

Exactness caveat shared by both modes: the bump term adds +0.0, so an input of -0.0 comes back as +0.0
(equal as floats, different sign bit), and ±inf inputs give NaN (0·inf in 2v·x).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

EpsMode = Literal["floor", "add"]


def rational(x: torch.Tensor, v: torch.Tensor, c: torch.Tensor, l: torch.Tensor, *, eps: float = 1e-8,
             eps_mode: EpsMode = "floor", dim: int = -1) -> torch.Tensor:
    """Apply σ (Mitchell et al. 2023, the rational activation) with one (v, c, l) triple per unit along
    ``dim`` of ``x``.

    Args:
        x: pre-activations, any shape with ``x.shape[dim] == len(v)``.
        v, c, l: coefficient vectors of shape ``(num_units,)``.
        eps: guard of the normalisation (see the module docstring).
        eps_mode: ``"floor"`` (exact identity in every dtype) or ``"add"`` (official code).
        dim: the unit dimension of ``x`` (``-1`` for MLPs, ``1`` for (B, C, H, W) feature maps).

    Returns:
        σ(x), same shape and dtype as ``x``.
    """
    shape = [1] * x.dim()
    shape[dim] = -1
    v, c, l = v.view(shape), c.view(shape), l.view(shape)
    q = v * v + c * c + l * l
    if eps_mode == "floor":
        norm = q.clamp_min(eps).sqrt()
    elif eps_mode == "add":
        norm = (q + eps).sqrt()
    else:
        raise ValueError(f"eps_mode must be 'floor' or 'add', got {eps_mode!r}")
    # Written as l·x + bump so that at identity the bump is exactly +0 and the sum is exactly x.
    return (l * x + (2 * v * x + c) / (1 + x * x)) / norm


class RationalActivation(nn.Module):
    """Trainable rational activation with its own (v, c, l) per unit (Mitchell et al. 2023, the rational
    activation).

    Args:
        num_units: number of units (neurons or channels), each with its own coefficients.
        init: ``"normal"`` draws v, c, l ~ N(0, 1) independently (as the official code does for every
            new layer and neuron); ``"identity"`` sets v = c = 0, l = 1 so σ(x) == x exactly.
        eps: normalisation guard; see the module docstring.
        eps_mode: ``"floor"`` (default, exact identity in every dtype) or ``"add"`` (official code).
        dim: dimension of the input that indexes units (``-1`` for (B, units), ``1`` for (B, C, H, W)).
        generator: optional torch.Generator for the ``"normal"`` draw.
        dtype, device: of the parameters.
    """

    def __init__(self, num_units: int, init: Literal["normal", "identity"] = "normal", *, eps: float = 1e-8,
                 eps_mode: EpsMode = "floor", dim: int = -1, generator: torch.Generator | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        if init not in ("normal", "identity"):
            raise ValueError(f"init must be 'normal' or 'identity', got {init!r}")
        if eps_mode not in ("floor", "add"):
            raise ValueError(f"eps_mode must be 'floor' or 'add', got {eps_mode!r}")
        self.num_units, self.eps, self.eps_mode, self.dim = num_units, eps, eps_mode, dim
        kw = {"dtype": dtype, "device": device}
        self.v = nn.Parameter(torch.empty(num_units, **kw))
        self.c = nn.Parameter(torch.empty(num_units, **kw))
        self.l = nn.Parameter(torch.empty(num_units, **kw))
        self.reset_parameters(init, generator=generator)

    @torch.no_grad()
    def reset_parameters(self, init: Literal["normal", "identity"] = "normal",
                         generator: torch.Generator | None = None) -> None:
        """Re-draw (``"normal"``) or reset to identity (``"identity"``) all coefficients in place."""
        if init == "identity":
            self.v.zero_()
            self.c.zero_()
            self.l.fill_(1.0)
        else:
            for p in (self.v, self.c, self.l):
                p.normal_(0.0, 1.0, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rational(x, self.v, self.c, self.l, eps=self.eps, eps_mode=self.eps_mode, dim=self.dim)

    def extra_repr(self) -> str:
        return f"{self.num_units}, eps={self.eps}, eps_mode={self.eps_mode!r}, dim={self.dim}"
