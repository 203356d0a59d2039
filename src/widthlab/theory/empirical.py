"""The finite-width kernel Theta of one network instance, and its distance to Theta_inf.

Spec widesparse §5.1 and §5.5. For f(x) = (n d)^{-1/2} v^T [u x]_+ (NTK parametrisation, no biases),
the GP kernel is the last-layer gradient kernel

    Theta(x, y) = grad_v f(x) . grad_v f(y) = (1 / (n d)) sum_i [u_i.x]_+ [u_i.y]_+,

which depends on the first-layer weights u (n, d) only (the sparsity of v is irrelevant). Its
infinite-width dense limit is Theta_inf(x, y) = K_1(x, y) / d (``arccos.py``), and the empirical
kernel distance of the instance is the pair average of (Theta - Theta_inf)^2 (Golubeva et al. 2021, App. A,
Fig. 8).

Normalisation. Theorem 1 takes u_ij = 0 with probability 1 - p and N(0, 1/p) otherwise, so that
E[u_ij^2] = 1 at every connectivity. A stored first-layer weight W (zeros where masked) is mapped to
that convention by u = W / weight_std, where weight_std^2 = E[W_ij^2] over *all* entries (masked
ones included) under the layer's initialisation law:

* theorem convention (NTK layer storing u, forward divides by sqrt(d)), N(0, 1/p) slab: 1;
* NTK-style MLP of Fig. 8 (Golubeva et al. 2021, App. A, Fig. 8), slab U(+-1/sqrt(c)): E[W^2] = c * 1/(3c) =
1/3, so 3 ** -0.5;
* standard parametrisation (forward W x) with the fan-in corrected init U(+-1/sqrt(d c)) of spec
  §3.4: E[W^2] = 1 / (3 d), so (3 d) ** -0.5; a N(0, 1/(d p)) slab gives d ** -0.5;
* ``"rms"``: the instance's own root mean square, sqrt(mean(W^2)); it removes the instance's overall
  scale, e.g. after training, and compares only the shape of the kernel.

A uniform slab changes the finite-d kernel only at O(1/(d p)) (the mask-averaged fourth moments);
the limit Theta_inf is the same by the central limit theorem. Biases of the first layer are ignored:
the kernel is that of the bias-free network of the theorem with the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from widthlab.theory.arccos import infinite_width_theta
from widthlab.theory.pairs import sample_pairs


def last_layer_kernel(u: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Theta(x, y) = (1/(n d)) sum_i [u_i.x]_+ [u_i.y]_+ (Golubeva et al. 2021, §3), batched over networks
    and pairs.

    Args:
        u: first-layer weights in the theorem's convention, shape (..., n, d).
        x: inputs, shape (P, d).
        y: inputs, shape (P, d).

    Returns:
        Theta per network and pair, shape (..., P).
    """
    n, d = u.shape[-2:]
    hx = torch.relu(u @ x.T)  # (..., n, P)
    hy = torch.relu(u @ y.T)  # (..., n, P)
    return (hx * hy).sum(-2) / (n * d)


def _holds_weight(m: torch.nn.Module) -> bool:
    """A layer with a 2-D weight in any storage: a dense ``.weight`` or a sparse layer's ``to_dense()``."""
    if callable(getattr(m, "to_dense", None)) and hasattr(m, "in_features"):
        return True
    return isinstance(getattr(m, "weight", None), Tensor) and m.weight.dim() == 2


def first_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The layer holding u (paper §3: the first layer), found by role, not by class.

    A model that declares width sites (every widthlab model) names it: the producer of its first
    site, i.e. the layer that reads the input. Otherwise it is the first submodule, in ``modules()``
    order, that holds a 2-D weight in any storage: a dense or masked Linear, or a CSR layer (whose
    free weights live in ``values`` and whose dense form is ``to_dense()``).

    Raises:
        TypeError: no such layer.
    """
    sites = getattr(model, "width_sites", None)
    if callable(sites):
        found = sites()
        if found and _holds_weight(found[0].producer):
            return found[0].producer
    layer = next((m for m in model.modules() if _holds_weight(m)), None)
    if layer is None:
        raise TypeError(f"{type(model).__name__} has no layer with a 2-D weight")
    return layer


def layer_weight(layer: torch.nn.Module) -> Tensor:
    """The layer's dense (out, in) weight with exact zeros off its mask, whatever its storage: a CSR
    layer's ``to_dense()``, a masked layer's W * M, or a plain ``.weight``."""
    if callable(getattr(layer, "to_dense", None)) and hasattr(layer, "in_features"):
        W, _ = layer.to_dense()
        return W
    W = layer.weight
    mask = getattr(layer, "weight_mask", None)
    return W if mask is None else W * mask


def first_layer_weight(model: Tensor | torch.nn.Module) -> Tensor:
    """The first-layer weight (n, d) of a model: a tensor itself, or :func:`layer_weight` of
    :func:`first_layer` (zeros off the mask)."""
    if isinstance(model, Tensor):
        W = model
    else:
        W = layer_weight(model if _holds_weight(model) else first_layer(model))
    if W.dim() != 2:
        raise ValueError(f"first-layer weight must be 2-D (n, d), got shape {tuple(W.shape)}")
    return W


def theorem_weights(
    model: Tensor | torch.nn.Module,
    weight_std: float | str = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """u = (W * mask) / weight_std in float64, the theorem's convention (module docstring).

    Args:
        model: weight tensor (n, d), a layer, or a model whose first layer (:func:`first_layer`) is u.
        weight_std: sqrt(E[W_ij^2]) under the layer's init law, or ``"rms"``.
        mask: optional 0/1 mask (n, d), for layers that keep W dense and mask in forward.

    Returns:
        u, shape (n, d), float64, detached.
    """
    W = first_layer_weight(model).detach().cpu().to(torch.float64)
    if mask is not None:
        W = W * mask.detach().cpu().to(torch.float64)
    if weight_std == "rms":
        std = W.pow(2).mean().sqrt().item()
    elif isinstance(weight_std, str):
        raise ValueError(f"weight_std must be a float or 'rms', got {weight_std!r}")
    else:
        std = float(weight_std)
    if not std > 0:
        raise ValueError(f"weight_std must be positive, got {std}")
    return W / std


def empirical_theta(
    model: Tensor | torch.nn.Module,
    x: Tensor,
    y: Tensor,
    weight_std: float | str = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Theta(x_j, y_j) of one instance (Golubeva et al. 2021, §3), shape (P,); see :func:`theorem_weights`."""
    u = theorem_weights(model, weight_std, mask)
    x = torch.as_tensor(x, dtype=torch.float64).reshape(-1, u.shape[1])
    y = torch.as_tensor(y, dtype=torch.float64).reshape(-1, u.shape[1])
    return last_layer_kernel(u, x, y)


@dataclass(frozen=True)
class EmpiricalDistance:
    """Empirical kernel distance of one instance over sampled pairs (Golubeva et al. 2021, App. A, Fig. 8).

    Attributes:
        D: mean over pairs of (Theta - Theta_inf)^2.
        D_se: its standard error over the pair sampling (the instance held fixed).
        num_pairs: P.
        width: n, rows of the first layer.
        d: input dimension.
        connectivity: fraction of nonzero first-layer weights of the instance.
    """

    D: float
    D_se: float
    num_pairs: int
    width: int
    d: int
    connectivity: float


def empirical_kernel_distance(
    model: Tensor | torch.nn.Module,
    inputs: Tensor | None = None,
    pairs: int = 1000,
    seed: int | torch.Generator = 0,
    weight_std: float | str = 1.0,
    mask: Tensor | None = None,
) -> EmpiricalDistance:
    """Distance of an actual instance's kernel Theta to the dense Theta_inf = K_1/d (Golubeva et al. 2021,
    App. A, Fig. 8).

    Any width and any connectivity: the instance is whatever its weights are. Average over several
    initialisations (Golubeva et al. 2021, App. A, Fig. 8 uses 10) to estimate the Theorem 1 distance of the
    family.

    Args:
        model: first-layer weight (n, d), a layer, or a model (its :func:`first_layer`).
        inputs: real inputs, shape (N, ...) with N x d entries; None draws Gaussian pairs.
        pairs: number of pairs P, sampled as in :func:`~widthlab.theory.pairs.sample_pairs`.
        seed: seed or generator for the pair sampling.
        weight_std: normalisation of W to the theorem's convention (module docstring).
        mask: optional 0/1 mask applied to W.

    Returns:
        An :class:`EmpiricalDistance`.
    """
    d = first_layer_weight(model).shape[1]
    x, y = sample_pairs(pairs, d=d, inputs=inputs, seed=seed)
    return empirical_distance_on_pairs(model, x, y, weight_std=weight_std, mask=mask)


def empirical_distance_on_pairs(
    model: Tensor | torch.nn.Module,
    x: Tensor,
    y: Tensor,
    weight_std: float | str = 1.0,
    mask: Tensor | None = None,
) -> EmpiricalDistance:
    """:func:`empirical_kernel_distance` on given pairs (x_j, y_j), e.g. the pairs on which the
    Theorem 1 distance of the same family is evaluated, so that the two are directly comparable.

    Args:
        model: first-layer weight (n, d), a layer, or a model (its :func:`first_layer`).
        x: inputs, shape (P, ...) with d features each.
        y: inputs, same shape as x.
        weight_std, mask: as in :func:`theorem_weights`.

    Returns:
        An :class:`EmpiricalDistance`.
    """
    u = theorem_weights(model, weight_std, mask)
    n, d = u.shape
    x = torch.as_tensor(x, dtype=torch.float64).reshape(-1, d)
    y = torch.as_tensor(y, dtype=torch.float64).reshape(-1, d)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    P = x.shape[0]
    sq = (last_layer_kernel(u, x, y) - infinite_width_theta(x, y)) ** 2  # (P,)
    se = sq.std().item() / P**0.5 if P > 1 else float("nan")
    return EmpiricalDistance(sq.mean().item(), se, P, n, d, (u != 0).double().mean().item())
