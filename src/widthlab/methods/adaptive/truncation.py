"""Post-training truncation, truncation curves and dense export (Errica et al. 2025, truncation and
compression).

Because importance decreases with the unit index, cutting the tail of a trained adaptive layer removes
the units that matter least; no retraining is needed. Two modes (§5, §10):

* ``renormalize=True``: p is renormalised over the surviving units (what the training-time forward
  does at any width);
* ``renormalize=False``: the official eval path -- p keeps the values it had over the full width and is
  sliced to the survivors (``AdaptiveScale.support``), so removing a unit whose outgoing weights are zero
  leaves the output unchanged in exact arithmetic; in floating point up to rounding, since the consumer
  then sums one term fewer and BLAS may group the sum differently (not bitwise).

:func:`truncation_curve` measures accuracy against the kept fraction, removing either the tail or random
units (masked in place, so that survivors keep their own importance); :func:`export_dense` folds the
importances into the next layer and returns a plain model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from widthlab.methods.adaptive.layer import AdaptiveScale, AdaptiveSite, collect_sites
from widthlab.methods.adaptive.mlp import AdaptiveMLP, fold_importance
from widthlab.methods.adaptive.resizing import resize_units
from widthlab.nn.resize import ResizeEvent


def kept_width(width: int, fraction: float) -> int:
    """Units kept when keeping ``fraction`` of ``width`` (rounded, at least 1)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"kept fraction must lie in (0, 1], got {fraction}")
    return max(1, round(width * fraction))


def truncate(model: nn.Module, widths: dict[str, int] | None = None, *, fraction: float | None = None,
             renormalize: bool = True) -> ResizeEvent:
    """Remove the tail units of adaptive sites, in place.

    Args:
        model: an adaptive model.
        widths: new width per site name (sites not named keep their width); or
        fraction: keep this fraction of every site's units.
        renormalize: renormalise p over the survivors (True) or slice the full-width p (False).

    Returns:
        The merged resize event (for an optimizer, if training continues).
    """
    if (widths is None) == (fraction is None):
        raise ValueError("give either widths or fraction")
    sites = collect_sites(model)
    names = {s.name for s in sites}
    if widths is not None:
        unknown = sorted(set(widths) - names)
        if unknown:
            raise KeyError(f"no adaptive site(s) {unknown}; the model has {sorted(names)}")
    event = ResizeEvent()
    for s in sites:
        D = s.width
        new = kept_width(D, fraction) if fraction is not None else int(widths.get(s.name, D))
        if not 1 <= new <= D:
            raise ValueError(f"site {s.name!r}: cannot truncate {D} units to {new}")
        if new == D:
            continue
        if not renormalize:
            # p keeps its full-width normalisation: the support it was computed over before the cut.
            s.scale.support = max(s.scale.support or D, D)
        if s.scale.unit_mask is not None:
            s.scale.unit_mask = s.scale.unit_mask[:new]
        event = event.merge(resize_units(s, torch.arange(new), 0, model=model))  # a group: every member
    return event


def mask_units(scale: AdaptiveScale, keep: torch.Tensor, width: int, *, renormalize: bool) -> None:
    """Silence all units of a site except ``keep`` (indices), leaving every survivor's importance as is
    (``renormalize=False``) or renormalising p over the survivors."""
    mask = torch.zeros(width)
    mask[keep] = 1.0
    scale.unit_mask = mask
    scale.renormalize_mask = renormalize


def clear_masks(model: nn.Module) -> None:
    for s in collect_sites(model):
        s.scale.unit_mask = None
        s.scale.renormalize_mask = False


IGNORE_INDEX = -100  # padding targets of token-level tasks (widthlab.data.seq2seq)


@torch.no_grad()
def accuracy(model: nn.Module, x, y: torch.Tensor, batch_size: int = 4096) -> float:
    """Classification accuracy of ``model`` on tensors, or on a list of ``(x, y)`` batches (``x=None``);
    token-level for sequence targets, skipping padding (-100)."""
    was = model.training
    model.eval()
    batches = y if x is None else [(x[i:i + batch_size], y[i:i + batch_size])
                                   for i in range(0, len(y), batch_size)]
    correct = total = 0
    for xb, yb in batches:
        valid = yb != IGNORE_INDEX
        correct += int(((model(xb).argmax(-1) == yb) & valid).sum())
        total += int(valid.sum())
    model.train(was)
    return correct / max(total, 1)


def dataset_batches(dataset, collate=None, batch_size: int = 1024, device=None) -> list[tuple]:
    """All of ``dataset`` as a list of ``(x, y)`` batches on ``device`` (for :func:`accuracy`)."""
    from torch.utils.data import DataLoader, TensorDataset

    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors[:2]
        out = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)]
    else:
        out = list(DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate))
    return [(xb.to(device), yb.to(device)) for xb, yb in out] if device is not None else out


def truncation_curve(model: nn.Module, x, y: torch.Tensor, fractions: Sequence[float], *,
                     mode: str = "tail", renormalize: bool = False, seed: int = 0,
                     metric: Callable[[nn.Module, object, torch.Tensor], float] = accuracy) -> list[dict]:
    """Accuracy (or ``metric``) after keeping each fraction of every adaptive site's units.

    Args:
        model: a trained adaptive model (not modified: each point works on a copy).
        x, y: evaluation inputs and labels (or ``x=None`` and ``y`` a list of batches, see
            :func:`accuracy`).
        fractions: kept fractions in (0, 1].
        mode: ``"tail"`` (cut the least important units, by surgery) or ``"random"`` (remove a random
            subset of the same size per site, by masking, so survivors keep their importance).
        renormalize: see the module docstring.
        seed: seed of the random subsets.

    Returns:
        One record per fraction: ``{"kept_fraction", "widths", "metric"}``.
    """
    if mode not in ("tail", "random"):
        raise ValueError(f"mode must be 'tail' or 'random', got {mode!r}")
    g = torch.Generator().manual_seed(seed)
    out = []
    for f in fractions:
        m = copy.deepcopy(model)
        if mode == "tail":
            truncate(m, fraction=f, renormalize=renormalize)
            widths = {s.name: s.width for s in collect_sites(m)}
        else:
            widths = {}
            for s in collect_sites(m):
                n = kept_width(s.width, f)
                keep = torch.randperm(s.width, generator=g)[:n]
                mask_units(s.scale, keep, s.width, renormalize=renormalize)
                widths[s.name] = n
        out.append({"kept_fraction": float(f), "widths": widths, "metric": float(metric(m, x, y))})
    return out


def removable_fraction(curve: list[dict], tolerance: float = 0.0) -> float:
    """The largest removed fraction r (1 - kept) such that *every* point of the curve that removes at
    most r keeps its metric within ``tolerance`` of the full model's: the removable prefix of the curve,
    walked from the full model towards smaller kept fractions and stopped at the first point that falls
    short (a point further on that recovers does not count). The curve must contain kept fraction 1.
    """
    full = next(r["metric"] for r in curve if math.isclose(r["kept_fraction"], 1.0))
    removable = 0.0
    for r in sorted(curve, key=lambda r: -r["kept_fraction"]):
        if r["metric"] < full - tolerance:
            break
        removable = 1 - r["kept_fraction"]
    return removable


# --------------------------------------------------------------------------------------------- export


@torch.no_grad()
def _fold_into_consumer(s: AdaptiveSite) -> None:
    """Scale the consumer's input units by p (W ← W diag(p)) and drop the scale's pre-hook, if any."""
    p = s.scale.importance(s.width) if s.scale.adapt else torch.ones(s.width)
    consumer = s.site.consumer
    w = consumer.weight
    w.mul_(p.to(w).reshape(1, -1, *([1] * (w.dim() - 2))))
    for key, hook in list(consumer._forward_pre_hooks.items()):
        if getattr(hook, "__self__", None) is s.scale:
            del consumer._forward_pre_hooks[key]


def export_dense(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every importance folded into the weights and no adaptive parameters.

    An :class:`AdaptiveMLP` becomes a plain :class:`widthlab.models.mlp.MLP` (or ``nn.Sequential`` for
    cells); inside composite models each adaptive MLP is replaced the same way and each remaining
    :class:`AdaptiveScale` (adaptive convolution channels) is folded into its consumer and replaced by
    ``nn.Identity``. Truncation settings are folded in too, so a truncated model exports at its width.
    """
    if isinstance(model, AdaptiveMLP):
        return fold_importance(model)
    m = copy.deepcopy(model)
    for s in collect_sites(m):
        if not any(s.scale is sc for mlp in m.modules() if isinstance(mlp, AdaptiveMLP) for sc in mlp.scales):
            _fold_into_consumer(s)
    _replace(m)
    return m


def _replace(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, AdaptiveMLP):
            setattr(module, name, fold_importance(child))
        elif isinstance(child, AdaptiveScale):
            setattr(module, name, nn.Identity())
        else:
            _replace(child)
