"""Record the GP-kernel distance of a run's network: ``method: {name: widesparse, kernel: {...}}``.

For a one-hidden-layer ReLU MLP f(x) = v^T [u x]_+ (NTK-style, Golubeva et al. 2021, §3; App. A, Fig. 8) the
GP kernel Theta depends on the first-layer weights u only. :class:`KernelRecorder` writes into the
run's summary, on one fixed set of P input pairs drawn from a data split:

* the exact Theorem 1 distance D(n, p) = bias^2 + variance/n (Golubeva et al. 2021, Theorem 1), with p the
  first layer's connectivity and n its width, by Monte Carlo over masks
  (``theory.distance.theorem1_distance``); this is a property of the family member, not of the instance;
* the empirical distance mean_j (Theta(x_j, y_j) - Theta_inf(x_j, y_j))^2 of *this instance* at
  initialisation (Golubeva et al. 2021, App. A, Fig. 8; averaging over seeds averages over initialisations)
  and, with ``after_training``, of the trained instance, measured in the same units (the init law's weight
  scale, not re-normalised), so it shows how far training moved the kernel.

Options (the ``kernel`` mapping): ``pairs`` (10,000 as in Golubeva et al. 2021, App. A, Fig. 8), ``masks``
(Monte-Carlo masks per block of pairs for D), ``split`` (``test`` as in the paper, or ``train``/``val``),
``pair_seed`` (the same pairs for every width and seed, so widths are compared on identical inputs; the
mask Monte Carlo uses the run's seed, so seeds give independent estimates of D), ``after_training``.

Summary keys (all ``kernel_*``): ``kernel_p``, ``kernel_d``, ``kernel_split``, ``kernel_pairs``,
``kernel_masks``, ``kernel_D``, ``kernel_D_se`` (mask Monte Carlo, pairs fixed), ``kernel_D_pairs_se``
(as an estimate over the input law), ``kernel_bias_sq``, ``kernel_variance_term``,
``kernel_D_empirical_init`` (+ ``_se``, over pairs), ``kernel_D_empirical_final`` (+ ``_se``),
``kernel_weight_std``, ``kernel_seconds``.

The recorder fills the summary dict it is given, which is the method plan's summary: the runner
merges that dict into the run's entry after the fit, so values written by the fit hooks arrive.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from widthlab.data.base import TaskData
from widthlab.models.mlp import MLP
from widthlab.nn.ntk import NTKLinear
from widthlab.theory.distance import theorem1_distance
from widthlab.theory.empirical import empirical_distance_on_pairs, layer_weight
from widthlab.theory.empirical import first_layer as _theory_first_layer
from widthlab.theory.pairs import sample_pairs

SPLITS = ("test", "train", "val")


@dataclass(frozen=True)
class KernelOptions:
    """The ``kernel`` option of the wide & sparse method, validated (see the module docstring)."""

    pairs: int = 10_000
    masks: int = 512
    split: str = "test"
    pair_seed: int = 0
    after_training: bool = True

    @classmethod
    def parse(cls, raw: Any) -> KernelOptions:
        """From the study's mapping; ``True`` means all defaults.

        Raises:
            ValueError: not a mapping, an unknown key or a bad value (named as ``kernel.<key>``).
        """
        if raw is True:
            return cls()
        if not isinstance(raw, dict):
            raise ValueError(f"option 'kernel' must be a mapping such as {{pairs: 10000}}, got {raw!r}")
        known = set(cls.__dataclass_fields__)
        for key in raw:
            if key not in known:
                raise ValueError(f"option 'kernel.{key}' is unknown; known: {', '.join(sorted(known))}")
        opts = cls(**raw)
        for key, lo in (("pairs", 2), ("masks", 2), ("pair_seed", 0)):
            v = getattr(opts, key)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
                raise ValueError(f"option 'kernel.{key}' must be an integer >= {lo}, got {v!r}")
        if opts.split not in SPLITS:
            raise ValueError(f"option 'kernel.split' must be one of {', '.join(SPLITS)}; got {opts.split!r}")
        if not isinstance(opts.after_training, bool):
            raise ValueError(f"option 'kernel.after_training' must be true or false, got "
                             f"{opts.after_training!r}")
        return opts


def check_kernel_model(model: nn.Module) -> None:
    """Theorem 1 is about f = v^T [u x]_+: a widthlab MLP with one hidden ReLU layer.

    Raises:
        ValueError: any other model (biases are allowed and ignored: the kernel is that of the
            bias-free network with the same weights, ``theory/empirical.py``).
    """
    cfg = getattr(model, "config", None)
    if not isinstance(model, MLP) or len(cfg.widths) != 1 or cfg.activation != "relu":
        raise ValueError("option 'kernel' needs a one-hidden-layer ReLU MLP (Theorem 1 of Golubeva "
                         "et al. 2021), e.g. model: {name: mlp, width: 8, parametrization: ntk, bias: false}")


def first_layer(model: nn.Module) -> nn.Module:
    """u of Theorem 1: the model's first layer by role, whatever its implementation (dense, masked
    or CSR; :func:`widthlab.theory.empirical.first_layer`)."""
    try:
        return _theory_first_layer(model)
    except TypeError as e:
        raise ValueError(str(e)) from None


def layer_connectivity(layer: nn.Module) -> float:
    """p = free weights / dense weights of the layer (1 for a layer without a mask)."""
    nonzero = getattr(layer, "num_nonzero_weights", None)
    counted = getattr(layer, "num_counted_weights", None)
    if callable(nonzero) and callable(counted):
        return nonzero() / counted()
    return 1.0


def init_weight_std(layer: nn.Module, init: str = "fan_in_corrected") -> float:
    """sqrt(E[W_ij^2]) over all entries (masked ones included) under the layer's initialisation law,
    which maps W to Theorem 1's u (E[u_ij^2] = 1; ``theory/empirical.py`` derives the cases).

    * NTK layer, N(0, 1/c) on the mask (``sparsify``'s fan-in correction, the official code's fan-in
    correction; App. A, Fig. 8): 1;
      U(+-1/sqrt(c)) (official code's uniform): c / (3c) = 1/3.
    * Standard Linear, U(+-1/sqrt(fan_in c)) (the official code's fan-in correction) or PyTorch's default
    U(+-1/sqrt(fan_in)):
      1 / (3 fan_in).
    * ``init="none"`` masks without the variance correction: c times the dense value.
    """
    if isinstance(layer, NTKLinear):
        var = 1.0 if layer.init == "normal" else 1.0 / 3.0
    else:
        var = 1.0 / (3.0 * layer_weight(layer).shape[1])  # fan-in d
    if init == "none":
        var *= layer_connectivity(layer)
    return math.sqrt(var)


def split_inputs(data: TaskData, split: str) -> torch.Tensor:
    """All inputs of one split as a (N, ...) tensor (a TensorDataset's first tensor, else stacked)."""
    ds = getattr(data, split)
    if len(ds) < 2:
        raise ValueError(f"option 'kernel.split={split}': the {split} split has fewer than two inputs")
    tensors = getattr(ds, "tensors", None)
    return tensors[0] if tensors else torch.stack([ds[i][0] for i in range(len(ds))])


class KernelRecorder:
    """Trainer callback recording the kernel distances of the module docstring into ``summary``.

    Args:
        summary: the dict to fill (the method plan's summary).
        inputs: the split's inputs (N, ...); pairs are drawn once, here.
        options: the parsed ``kernel`` option.
        seed: the run's seed (mask Monte Carlo of D).
        init: the ``init`` option the layer was sparsified with (weight scale, :func:`init_weight_std`).
    """

    def __init__(self, summary: dict[str, Any], inputs: torch.Tensor, options: KernelOptions, *, seed: int,
                 init: str = "fan_in_corrected"):
        self.summary, self.options, self.seed, self.init = summary, options, int(seed), init
        self.x, self.y = sample_pairs(options.pairs, inputs=inputs, seed=options.pair_seed)
        self.weight_std: float | None = None

    def _empirical(self, layer: nn.Module):
        return empirical_distance_on_pairs(layer_weight(layer), self.x, self.y, weight_std=self.weight_std)

    def on_fit_start(self, trainer: Any) -> None:
        # Called before a checkpoint is restored, so on resume the model is again at its
        # initialisation (same seed, same masks) and the values are recomputed identically.
        t0 = time.perf_counter()
        layer = first_layer(trainer.model)
        n, d = layer_weight(layer).shape
        p = layer_connectivity(layer)
        self.weight_std = init_weight_std(layer, self.init)
        exact = theorem1_distance(self.x, self.y, n, p, num_masks=self.options.masks, seed=self.seed)
        emp = self._empirical(layer)
        self.summary.update(
            kernel_p=p, kernel_d=int(d), kernel_split=self.options.split, kernel_pairs=self.options.pairs,
            kernel_masks=exact.num_masks, kernel_D=exact.D, kernel_D_se=exact.D_se,
            kernel_D_pairs_se=exact.pairs_se, kernel_bias_sq=exact.bias_sq,
            kernel_variance_term=exact.variance_term, kernel_D_empirical_init=emp.D,
            kernel_D_empirical_init_se=emp.D_se, kernel_weight_std=self.weight_std,
            kernel_seconds=time.perf_counter() - t0)

    def on_fit_end(self, trainer: Any) -> None:
        if not self.options.after_training or self.weight_std is None:
            return
        t0 = time.perf_counter()
        emp = self._empirical(first_layer(trainer.model))
        self.summary.update(kernel_D_empirical_final=emp.D, kernel_D_empirical_final_se=emp.D_se,
                            kernel_seconds=self.summary.get("kernel_seconds", 0.0) + time.perf_counter() - t0)
