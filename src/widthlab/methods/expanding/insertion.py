"""Commit step of self-expansion: function-preserving insertion of neurons, channels and layers.

* Neurons / channels (Mitchell et al. 2023): the new units' incoming weights, bias and rational
  coefficients come from the chosen candidate; their outgoing weights in the consuming layer are zero, so
  the network computes the same function and the old parameters get the same gradients (exactly in
  exact arithmetic; in floating point up to rounding, as the consumer's sums gain exact-zero terms that
  BLAS may block differently, depending on the CPU's instruction set). Built on
  :func:`widthlab.nn.surgery.resize_site` plus :func:`resize_rational` for the per-unit (v, c, l).
* Layers (Mitchell et al. 2023): a new hidden layer of width k right before ``layers[position]``, with an
  identity rational activation. ``basis=None`` gives kernel I and bias 0, exact bit for bit (every
  product is x·1 or x·0); a basis B
  (and shift β) gives the official "basis change" z = B h + β with the successor rewritten as
  W_s ← W_s B⁻¹, b_s ← b_s − W_s B⁻¹ β, exact up to rounding when B is invertible.

Every function returns a :class:`~widthlab.nn.resize.ResizeEvent` for the optimizer surgery.
"""

from __future__ import annotations

import torch
from torch import nn

from widthlab.nn.rational import RationalActivation
from widthlab.nn.resize import ParamResize, ResizeEvent
from widthlab.nn.surgery import resize_site


def resize_rational(act: RationalActivation, prefix: str, n_new: int,
                    values: dict[str, torch.Tensor] | None = None) -> list[ParamResize]:
    """Append ``n_new`` units to a :class:`RationalActivation` (survivors keep their coefficients).

    Args:
        act: edited in place (its ``v``, ``c``, ``l`` become new Parameters).
        prefix: the module's qualified name, for the event (``"acts.0"``).
        n_new: number of units to append.
        values: ``{"v": (n_new,), "c": ..., "l": ...}`` for the new units; default identity (0, 0, 1).
    """
    values = values or {}
    fill = {"v": 0.0, "c": 0.0, "l": 1.0}
    out = []
    for name in ("v", "c", "l"):
        old = getattr(act, name)
        new_vals = values.get(name)
        if new_vals is None:
            new_vals = old.new_full((n_new,), fill[name])
        new_vals = new_vals.detach().to(dtype=old.dtype, device=old.device).reshape(n_new)
        param = nn.Parameter(torch.cat([old.detach(), new_vals]), requires_grad=old.requires_grad)
        if old.grad is not None:
            param.grad = torch.cat([old.grad, old.grad.new_zeros(n_new)])
        setattr(act, name, param)
        out.append(ParamResize(f"{prefix}.{name}", old, param, 0, torch.arange(old.shape[0]), n_new))
    act.num_units = int(act.v.shape[0])
    return out


def insert_units(model: nn.Module, index: int, weight: torch.Tensor, bias: torch.Tensor | None,
                 rational: dict[str, torch.Tensor] | None = None) -> ResizeEvent:
    """Append k neurons (MLP) or channels (CNN) to hidden layer ``index`` with zero outgoing weights.

    Args:
        model: an :class:`~.model.ExpandableMLP` or :class:`~.model.ExpandableCNN` (``width_sites()``
            and ``acts``).
        index: the hidden layer (width site) to grow.
        weight: incoming weights of the new units, (k, fan_in) or (k, C_in, kh, kw).
        bias: their biases (k,), or None for zeros.
        rational: their activation coefficients ``{"v", "c", "l"}`` of shape (k,); default identity.
    """
    site = model.width_sites()[index]
    k = weight.shape[0]

    def init_in(w_block: torch.Tensor, b_block: torch.Tensor | None) -> None:
        w_block.copy_(weight.reshape(w_block.shape))
        if b_block is not None:
            b_block.copy_(bias if bias is not None else torch.zeros_like(b_block))

    event = resize_site(site, None, k, init_in=init_in, init_out="zeros", model=model)
    params = resize_rational(model.acts[index], f"acts.{index}", k, rational)
    return ResizeEvent(params=event.params + tuple(params), description=f"{event.description} (insert)",
                       widths=dict(model.widths()))


def full_rank(B: torch.Tensor, floor: float = 1e-3) -> torch.Tensor:
    """Clip B's singular values to at least ``floor``·mean (as the official code does before a basis
    change)."""
    u, s, vh = torch.linalg.svd(B)
    return u @ torch.diag(s.clamp_min(floor * s.mean())) @ vh


def insert_layer(model: nn.Module, position: int, *, basis: torch.Tensor | None = None,
                 shift: torch.Tensor | None = None) -> ResizeEvent:
    """Insert an identity-activated hidden layer before ``model.layers[position]`` (an ExpandableMLP).

    Its width k is the successor's fan-in. With ``basis=None`` the layer is z = I h + 0 and nothing else
    changes (exact). With a basis B (k×k, invertible) and shift β the successor is rewritten so that
    W_s' (B h + β) + b_s' = W_s h + b_s.

    Returns:
        The event: the new layer's parameters as ``added``; with a basis, the successor's weight and bias
        as replaced tensors (``dim=None``: same shape, new objects).
    """
    if not 0 <= position <= model.depth:
        raise ValueError(f"position must be in [0, {model.depth}], got {position}")
    succ = model.layers[position]
    k = succ.in_features
    ref = succ.weight
    kw = {"dtype": ref.dtype, "device": ref.device}
    layer = nn.Linear(k, k, **kw)
    act = RationalActivation(k, init="identity", eps_mode=model.eps_mode, **kw)
    params: list[ParamResize] = []
    with torch.no_grad():
        layer.weight.copy_(torch.eye(k, **kw) if basis is None else basis.to(**kw))
        layer.bias.copy_(torch.zeros(k, **kw) if shift is None else shift.to(**kw))
        if basis is not None:
            B = basis.to(**kw)
            beta = torch.zeros(k, **kw) if shift is None else shift.to(**kw)
            w_new = torch.linalg.solve(B.T, succ.weight.T).T  # W_s B⁻¹
            b_new = succ.bias - w_new @ beta
            for attr, val in (("weight", w_new), ("bias", b_new)):
                old = getattr(succ, attr)
                param = nn.Parameter(val.clone(), requires_grad=old.requires_grad)
                setattr(succ, attr, param)
                params.append(ParamResize(f"layers.{position + 1}.{attr}", old, param, None, None))
    model.layers.insert(position, layer)
    model.acts.insert(position, act)
    added = (f"layers.{position}.weight", layer.weight), (f"layers.{position}.bias", layer.bias), \
        *((f"acts.{position}.{n}", getattr(act, n)) for n in ("v", "c", "l"))
    return ResizeEvent(params=tuple(params), added=tuple(added),
                       description=f"layer inserted at {position} (width {k}, "
                                   f"{'identity' if basis is None else 'basis change'})",
                       widths=dict(model.widths()))


def insert_conv_stage(model: nn.Module) -> ResizeEvent:
    """Append an identity stage to an ExpandableCNN, before its head: a 3×3 convolution whose kernel is
    the identity at the centre tap (zero elsewhere, bias 0), the identity rational activation and no
    pooling. With padding 1 it maps every feature map to itself, so the logits are unchanged (bitwise
    up to the convolution's summation of exact zeros)."""
    p, k = model.depth, model.depth_fan_in
    ref = model.head.weight
    kw = {"dtype": ref.dtype, "device": ref.device}
    conv = nn.Conv2d(k, k, 3, padding=1, **kw)
    act = RationalActivation(k, init="identity", eps_mode=model.eps_mode, dim=1, **kw)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, 1, 1].copy_(torch.eye(k, **kw))
        conv.bias.zero_()
    model.convs.append(conv)
    model.acts.append(act)
    model.pools.append(False)
    added = (f"convs.{p}.weight", conv.weight), (f"convs.{p}.bias", conv.bias), \
        *((f"acts.{p}.{n}", getattr(act, n)) for n in ("v", "c", "l"))
    return ResizeEvent(params=(), added=tuple(added), widths=dict(model.widths()),
                       description=f"stage inserted at {p} ({k} channels, identity)")
