"""Linear and convolution layers with a static binary mask on the weight (wide & sparse, Golubeva et al.
2021, §2.3).

A masked layer holds a bool buffer ``weight_mask`` with the weight's shape (True = free weight,
False = removed). The buffer is part of the state dict, so a checkpoint carries its masks.

Design: the forward pass computes with ``W ⊙ M`` *and* the stored ``W`` is kept exactly zero where
``M`` is False (gradients and optimizer state of masked weights are zeroed as well).

* ``W ⊙ M`` in the forward makes the layer's function depend on the mask alone: weights that leak in
  at masked positions (a dense checkpoint loaded by hand, an optimizer whose update does not vanish
  at w = 0, code writing to ``weight``) cannot change the output. Autograd then gives
  ``dL/dW = dL/d(W ⊙ M) ⊙ M``, so masked gradients are exactly zero with no tensor hook to lose
  under ``deepcopy`` or parameter replacement. The cost is one element-wise product of the weight per
  forward and backward, small next to the matmul/conv over a batch.
* Keeping ``W`` itself zero (:meth:`MaskedMixin.apply_mask_` after every optimizer step, done by the
  wide & sparse callback, and after every ``load_state_dict``) makes counts of nonzero weights, CSR
  conversion and optimizer state exact: SGD with momentum, Nesterov and coupled weight decay sees
  ``g + λw = 0``; Adam/AdamW see ``g = 0`` so both moments stay 0 and AdamW's decoupled decay keeps
  ``0``. Mixed precision changes nothing: a zero gradient stays zero when scaled and unscaled.

The classes subclass :class:`torch.nn.Linear`, :class:`torch.nn.Conv2d` and
:class:`~widthlab.nn.ntk.NTKLinear`, so weight counting, ``isinstance`` checks and parameter names
(``weight``, ``bias``) are unchanged. Width surgery does not resize masks: sparsify after the
architecture is final.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from widthlab.nn.ntk import NTKLinear


class MaskedMixin:
    """The mask buffer and its upkeep, shared by the masked layer classes.

    The host class must be an ``nn.Module`` with a ``weight`` parameter; call :meth:`_init_mask`
    at the end of its ``__init__``.
    """

    weight: nn.Parameter
    weight_mask: torch.Tensor
    # Opt-in marker read by widthlab.models.counting (already implied by the nn.Linear/Conv2d base).
    counted_weight = True

    def _init_mask(self, mask: torch.Tensor | None) -> None:
        if mask is None:
            mask = torch.ones(self.weight.shape, dtype=torch.bool, device=self.weight.device)
        self.register_buffer("weight_mask", self._checked(mask))
        self.apply_mask_()
        # Loading a state dict writes the weight and the mask independently; re-zero afterwards so a
        # dense checkpoint loaded into a masked layer still satisfies "stored W is zero off the mask".
        self.register_load_state_dict_post_hook(_remask_after_load)

    def _checked(self, mask: torch.Tensor) -> torch.Tensor:
        if tuple(mask.shape) != tuple(self.weight.shape):
            raise ValueError(f"{type(self).__name__}: mask shape {tuple(mask.shape)} != weight shape "
                             f"{tuple(self.weight.shape)}")
        return mask.to(device=self.weight.device, dtype=torch.bool)

    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the mask (same shape as the weight) and zero the weight off it."""
        self.weight_mask = self._checked(mask)
        self.apply_mask_()

    def masked_weight(self) -> torch.Tensor:
        """``W ⊙ M``: what the forward pass multiplies with."""
        return self.weight * self.weight_mask

    @torch.no_grad()
    def apply_mask_(self) -> None:
        """Set the stored weight to exactly zero where the mask is False (in place)."""
        if self.weight.device.type != "meta":
            self.weight.masked_fill_(~self.weight_mask, 0.0)

    @torch.no_grad()
    def mask_grad_(self) -> None:
        """Zero the weight's gradient off the mask (in place); a no-op without a gradient.

        Autograd already gives exact zeros there; this is for gradients written by other means
        (e.g. a penalty added to ``weight.grad`` by hand), and is safe on scaled AMP gradients.
        """
        g = self.weight.grad
        if g is not None:
            g.masked_fill_(~self.weight_mask, 0.0)

    def num_counted_weights(self) -> int:
        """N_l: entries of the dense weight tensor (the paper counts the dense size)."""
        return int(self.weight.numel())

    def num_nonzero_weights(self) -> int:
        """N_l - k_l: free (trainable) entries, i.e. True entries of the mask.

        Counting the mask rather than ``count_nonzero(W)`` keeps the count exact even if a free
        weight happens to be exactly 0.0.
        """
        return int(self.weight_mask.sum())

    @property
    def connectivity(self) -> float:
        """c_l = 1 - k_l / N_l."""
        return self.num_nonzero_weights() / max(1, self.num_counted_weights())

    def _mask_repr(self) -> str:
        if self.weight_mask.device.type == "meta":
            return "masked"
        return f"connectivity={self.connectivity:.4g}"


def _remask_after_load(module: nn.Module, incompatible_keys) -> None:
    module.apply_mask_()


class MaskedLinear(MaskedMixin, nn.Linear):
    """``y = x (W ⊙ M)^T + b`` (Golubeva et al. 2021, §2.3); ``mask=None`` starts fully connected."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 mask: torch.Tensor | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_mask(mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._mask_repr()}"


class MaskedConv2d(MaskedMixin, nn.Conv2d):
    """A Conv2d whose kernel is ``W ⊙ M``; ``mask=None`` starts fully connected."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 mask: torch.Tensor | None = None, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        self._init_mask(mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._mask_repr()}"


class MaskedNTKLinear(MaskedMixin, NTKLinear):
    """NTK-parametrised Linear with a mask: ``y = x (W ⊙ M)^T / sqrt(fan_in) + b``.

    The prefactor keeps the *dense* fan-in, as the wide & sparse NTK-style MLP does (Golubeva et al. 2021,
    App. A).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, init="normal",
                 mask: torch.Tensor | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, init=init, device=device, dtype=dtype)
        self._init_mask(mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.masked_weight()) * (1.0 / math.sqrt(self.fan_in))
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._mask_repr()}"


def to_masked(layer: nn.Module, mask: torch.Tensor) -> nn.Module:
    """A masked copy of ``layer`` that *shares* its weight and bias parameters.

    Sharing the ``nn.Parameter`` objects keeps any optimizer already holding them valid. The weight
    is zeroed off the mask in place.

    Args:
        layer: an ``nn.Linear``, ``nn.Conv2d`` or ``NTKLinear`` (exact types: a subclass with its own
            forward would lose that forward), or an already masked layer (its mask is replaced).
        mask: bool tensor of the weight's shape, True where the weight is kept.

    Raises:
        TypeError: any other layer type.
    """
    if isinstance(layer, MaskedMixin):
        layer.set_mask(mask)
        return layer
    cls = type(layer)
    bias = layer.bias is not None
    if cls is NTKLinear:
        new: nn.Module = MaskedNTKLinear(layer.in_features, layer.out_features, bias, init=layer.init,
                                         device="meta")
    elif cls is nn.Linear:
        new = MaskedLinear(layer.in_features, layer.out_features, bias, device="meta")
    elif cls is nn.Conv2d:
        new = MaskedConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                           layer.padding, layer.dilation, layer.groups, bias, layer.padding_mode,
                           device="meta")
    else:
        raise TypeError(f"cannot mask a {cls.__name__}: only nn.Linear, nn.Conv2d and NTKLinear "
                        f"(exact types) are supported; a subclass with its own forward needs its "
                        f"own masked version")
    new.weight = layer.weight
    new.bias = layer.bias
    new.set_mask(mask)
    new.train(layer.training)
    return new


def masked_layers(model: nn.Module) -> Iterator[tuple[str, MaskedMixin]]:
    """``(qualified_name, layer)`` for every masked layer of ``model``, in ``named_modules`` order."""
    for name, m in model.named_modules():
        if isinstance(m, MaskedMixin):
            yield name, m


def apply_masks_(model: nn.Module) -> None:
    """Re-zero every masked layer's weight off its mask: call after each optimizer step."""
    for _, m in masked_layers(model):
        m.apply_mask_()


def mask_gradients_(model: nn.Module) -> None:
    """Zero every masked layer's gradient off its mask: call after backward (before ``unscale_``
    with a GradScaler, or anywhere before ``step``)."""
    for _, m in masked_layers(model):
        m.mask_grad_()
