"""K-FAC statistics: per-layer factors A = E[a aᵀ] and G = E[e eᵀ], collected by hooks.

For a Linear layer s = W a + b with per-sample input a and per-sample back-propagated output gradient
e = ∂ℓ/∂s, K-FAC approximates the layer's Gauss-Newton block by A ⊗ G (Mitchell et al. 2023). With
``bias=True`` the input carries the homogeneous coordinate, a = [a; 1], so that the bias shares the
factorisation (the official code omits it: ``bias=False``).

Convolutions use the patch factors of K-FAC for convolutions (Grosse & Martens 2016, "KFC"): with
patches a_{n,t} (``unfold``, C_in·kh·kw [+1] entries) at the T output locations and e_{n,t} the
output gradient there (a Linear layer applied to each of T tokens, (N, T, d) inputs, is the same weight
sharing: its rows are the tokens),

    A = (1/(N·T)) Σ_{n,t} a aᵀ,      G = (1/N) Σ_{n,t} e eᵀ,      ḡ = (1/N) Σ_{n,t} a eᵀ,

so that A ⊗ G = E[Σ_t aaᵀ] ⊗ E[(1/T)Σ_t eeᵀ] (KFC's Ω ⊗ Γ) and ḡ is the weight gradient. A Linear
layer is the case T = 1. All three are computed from "rows" (one per sample and location) by
:func:`layer_rows`; scores (``scores.py``) and the K-FAC optimizer only ever see these matrices.

G is taken over cotangent vectors u_{n,k} pushed back from the outputs (``fisher.metric_sqrt``): the
exact expectation of the Gauss-Newton/Fisher under the output metric, rather than a Monte-Carlo sample.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from widthlab.methods.expanding.fisher import metric_sqrt, output_grad

LAYER_TYPES = (nn.Linear, nn.Conv2d)


def kfac_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module of every Linear/Conv2d in the model (the layers K-FAC factorises)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)}


# ----------------------------------------------------------------------------------- capture


@dataclass
class Capture:
    """What a forward pass left at one layer: its input ``a`` and its output ``s`` (still in the graph)."""

    a: torch.Tensor
    s: torch.Tensor


@contextmanager
def capture(modules: dict[str, nn.Module]):
    """Record the input and output of each module during the forward passes inside the block.

    Yields a dict name -> :class:`Capture`, filled by the forward; the outputs stay attached to the
    graph so that :func:`backprop` can take gradients with respect to them.
    """
    store: dict[str, Capture] = {}
    handles = []
    for name, m in modules.items():
        def hook(mod, inputs, output, name=name):
            store[name] = Capture(inputs[0].detach(), output)
        handles.append(m.register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def backprop(out: torch.Tensor, captured: dict[str, Capture], cotangent: torch.Tensor,
             names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Per-sample e = J_sᵀ u at each captured layer for output cotangents u (same shape as ``out``).

    Samples do not interact (no batch norm), so one backward of Σ_n u_nᵀ y_n yields every sample's e_n.
    The graph is retained so that several cotangents can be pushed through one forward.
    """
    names = list(captured) if names is None else list(names)
    grads = torch.autograd.grad(out, [captured[n].s for n in names], grad_outputs=cotangent,
                                retain_graph=True, allow_unused=True)
    return {n: (torch.zeros_like(captured[n].s) if g is None else g) for n, g in zip(names, grads)}


# ----------------------------------------------------------------------------------- rows


def input_rows(module: nn.Module, a: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """The layer's inputs as rows: (N, d[+1]) for Linear, (N·T, C_in·kh·kw[+1]) patches for Conv2d."""
    if isinstance(module, nn.Linear):
        rows = a.reshape(-1, a.shape[-1])
    elif isinstance(module, nn.Conv2d):
        patches = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=conv_padding(module),
                           stride=module.stride)  # (N, C_in·kh·kw, T)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    else:
        raise TypeError(f"K-FAC rows need a Linear or Conv2d, got {type(module).__name__}")
    if bias and module.bias is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1)
    return rows


def conv_padding(module: nn.Conv2d) -> tuple[int, int]:
    """Explicit zero padding of a Conv2d (``"same"`` resolved for odd kernels), for ``unfold``."""
    if module.groups != 1 or module.padding_mode != "zeros":
        raise ValueError("K-FAC patch factors need groups=1 and zero padding")
    pad = module.padding
    if pad == "valid":
        return (0, 0)
    if pad == "same":
        if any(k % 2 == 0 for k in module.kernel_size):
            raise ValueError("K-FAC patch factors: padding='same' with an even kernel is asymmetric")
        return tuple(d * (k - 1) // 2 for k, d in zip(module.kernel_size, module.dilation))
    return tuple(pad)


def output_rows(e: torch.Tensor) -> torch.Tensor:
    """Output gradients as rows, in the order of :func:`input_rows`: (N·T, m) for a Linear layer (units
    on the last axis; T = 1 for (N, m), the tokens for (N, T, m)) and for a Conv2d ((N, m, H, W),
    T = H·W locations)."""
    if e.dim() == 4:
        return e.flatten(2).transpose(1, 2).reshape(-1, e.shape[1])
    return e.reshape(-1, e.shape[-1])


def locations(module: nn.Module, s: torch.Tensor) -> int:
    """T, the number of output locations per sample: H·W for a Conv2d, the tokens (1 for (N, m)) for a
    Linear layer."""
    if isinstance(module, nn.Conv2d):
        return s.shape[2] * s.shape[3]
    return s[..., 0].numel() // s.shape[0]


def weight_gradient_matrix(module: nn.Module, bias: bool = True) -> torch.Tensor | None:
    """The layer's ``.grad`` as the (d[+1], m) matrix ḡ of K-FAC (rows = inputs, columns = outputs)."""
    if module.weight.grad is None:
        return None
    gw = module.weight.grad.reshape(module.weight.shape[0], -1).T  # (d, m)
    if bias and module.bias is not None:
        gb = module.bias.grad if module.bias.grad is not None else torch.zeros_like(module.bias)
        gw = torch.cat([gw, gb[None]], 0)
    return gw


def weight_matrix(module: nn.Module, bias: bool = True) -> torch.Tensor:
    """The layer's parameters in the same (d[+1], m) layout as :func:`weight_gradient_matrix`."""
    w = module.weight.reshape(module.weight.shape[0], -1).T
    if bias and module.bias is not None:
        w = torch.cat([w, module.bias[None]], 0)
    return w


def set_from_matrix(module: nn.Module, mat: torch.Tensor, bias: bool = True) -> tuple[torch.Tensor, ...]:
    """Split a (d[+1], m) matrix back into (weight-shaped, bias-shaped or None) tensors."""
    if bias and module.bias is not None:
        w, b = mat[:-1], mat[-1]
    else:
        w, b = mat, None
    return w.T.reshape(module.weight.shape), b


@dataclass
class LayerFactors:
    """K-FAC factors of one layer from one batch; float64 unless the inputs were otherwise.

    Attributes:
        A: (d, d) input second moment, d including the homogeneous coordinate when ``bias``.
        G: (m, m) output-gradient second moment (summed over cotangents and locations, / N).
        n: number of samples N; ``t``: locations per sample T.
    """

    A: torch.Tensor
    G: torch.Tensor
    n: int
    t: int = 1


def factors_from_rows(a_rows: torch.Tensor, e_rows: Sequence[torch.Tensor], n: int) -> LayerFactors:
    """A = aᵀa/(N·T), G = Σ_k e_kᵀe_k/N from rows (see the module docstring)."""
    t = a_rows.shape[0] // n
    A = a_rows.T @ a_rows / (n * t)
    G = sum(e.T @ e for e in e_rows) / n
    return LayerFactors(A, G, n, t)


def gradient_from_rows(a_rows: torch.Tensor, e_rows: torch.Tensor, n: int) -> torch.Tensor:
    """ḡ = aᵀe/N, the (d, m) weight gradient of the batch-mean loss."""
    return a_rows.T @ e_rows / n


# ----------------------------------------------------------------------------------- running averages


class KFACStatistics:
    """Running (EMA) K-FAC factors per named layer, with damped inverses (Mitchell et al. 2023).

    ``update(name, factors)`` blends a batch's factors in: A ← ρ A + (1 − ρ) A_batch with ρ = ``decay``
    (the first batch, or a batch after the layer changed shape, replaces the factors outright, which is
    the official code's ``tau=None`` when ``decay=0``).

    Damping follows Martens & Grosse (2015, §6.3): (A ⊗ G + λI) ≈ (A + π√λ I) ⊗ (G + √λ/π I) with
    π = √((tr A / d) / (tr G / m)), which splits λ between the factors by their scales.
    """

    def __init__(self, decay: float = 0.95):
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.A: dict[str, torch.Tensor] = {}
        self.G: dict[str, torch.Tensor] = {}
        self.updates: dict[str, int] = {}

    def update(self, name: str, f: LayerFactors) -> None:
        A, G = f.A.detach(), f.G.detach()
        old_a, old_g = self.A.get(name), self.G.get(name)
        if old_a is None or old_a.shape != A.shape or old_g.shape != G.shape or self.decay == 0:
            self.A[name], self.G[name], self.updates[name] = A.clone(), G.clone(), 1
            return
        self.A[name] = ema_(old_a, A, self.decay)
        self.G[name] = ema_(old_g, G, self.decay)
        self.updates[name] += 1

    def forget(self, names: Iterable[str] | None = None) -> None:
        """Drop the factors of ``names`` (all if None), e.g. after their layer was resized."""
        for n in list(self.A) if names is None else list(names):
            self.A.pop(n, None)
            self.G.pop(n, None)
            self.updates.pop(n, None)

    def has(self, name: str, d: int, m: int) -> bool:
        a = self.A.get(name)
        return a is not None and a.shape[0] == d and self.G[name].shape[0] == m

    def damped_inverses(self, name: str, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
        """((A + π√λ I)⁻¹, (G + √λ/π I)⁻¹) for one layer."""
        return damped_inverses(self.A[name], self.G[name], damping)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "A": dict(self.A), "G": dict(self.G), "updates": dict(self.updates)}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.A, self.G = dict(state["A"]), dict(state["G"])
        self.updates = {k: int(v) for k, v in state["updates"].items()}


def ema_(old: torch.Tensor, new: torch.Tensor, decay: float) -> torch.Tensor:
    """old ← decay·old + (1 − decay)·new, in place."""
    return old.mul_(decay).add_(new, alpha=1 - decay)


def damped_inverses(A: torch.Tensor, G: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factored Tikhonov damping with π-splitting (see :class:`KFACStatistics`)."""
    d, m = A.shape[0], G.shape[0]
    ta, tg = A.diagonal().mean().clamp_min(1e-30), G.diagonal().mean().clamp_min(1e-30)
    pi = (ta / tg).sqrt()
    root = damping ** 0.5
    eye_a = torch.eye(d, dtype=A.dtype, device=A.device)
    eye_g = torch.eye(m, dtype=G.dtype, device=G.device)
    return spd_inverse(A + pi * root * eye_a), spd_inverse(G + root / pi * eye_g)


def spd_inverse(M: torch.Tensor) -> torch.Tensor:
    """M⁻¹ for a symmetric positive definite M by Cholesky (about a third of the flops of an LU
    inverse); the pseudo-inverse if M is only semi-definite (zero damping on a rank-deficient factor)."""
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) != 0:  # one host read per inversion, which happens every ``inv_every`` steps
        return torch.linalg.pinv(M, hermitian=True)
    return torch.cholesky_inverse(L)


# ----------------------------------------------------------------------------------- one scoring pass

G_ESTIMATORS = ("exact", "sampled", "normalized", "empirical")


@dataclass
class LayerObservation:
    """One layer on the observed batch.

    Attributes:
        a: the raw input the forward pass gave the layer (N, ...), detached.
        a_rows: input rows (with the homogeneous coordinate when ``bias``), see :func:`input_rows`.
        e_rows: name of residual -> back-propagated rows (N·T, m) of that output residual.
        factors: A and G of this batch.
    """

    a: torch.Tensor
    a_rows: torch.Tensor
    e_rows: dict[str, torch.Tensor]
    factors: LayerFactors


@dataclass
class Observation:
    """Everything the expansion scores need from one pass over a batch (the official ``kfac_observe``).

    Attributes:
        out: network outputs (N, C), detached.
        grad_out: ∇_y ℓ_n (N, C).
        loss_sqnorm: E‖∇_y ℓ‖², the absolute score's normaliser.
        layers: name -> :class:`LayerObservation`.
    """

    out: torch.Tensor
    grad_out: torch.Tensor
    loss_sqnorm: torch.Tensor
    layers: dict[str, LayerObservation]

    @property
    def n(self) -> int:
        return self.out.shape[0]


def g_cotangents(loss: str, out: torch.Tensor, grad_out: torch.Tensor, metric: str, estimator: str
                 ) -> list[torch.Tensor]:
    """Output vectors whose back-propagations make up G (list of (N, C) tensors).

    ``exact``: the columns of a square root of the output metric (exact expectation, C vectors);
    ``sampled``: one Monte-Carlo vector u = H^{1/2}ξ with E[uuᵀ] = H (for softmax cross-entropy
    u = p − onehot(ŷ), ŷ ~ p: the sampled Fisher of K-FAC; global RNG, so checkpoints resume it);
    ``normalized``: ∇_y ℓ/‖∇_y ℓ‖ per sample (official code: rank one, scale-free); ``empirical``:
    ∇_y ℓ itself (the empirical Fisher).
    """
    if estimator == "exact":
        u = metric_sqrt(loss, out, metric)  # (N, K, C)
        return [u[:, k] for k in range(u.shape[1])]
    if estimator == "sampled":
        if metric == "fisher" and loss == "cross_entropy":
            p = torch.softmax(out, 1)
            draw = torch.multinomial(p.detach().float(), 1).squeeze(1)
            return [p - torch.nn.functional.one_hot(draw, p.shape[1]).to(p.dtype)]
        u = metric_sqrt(loss, out, metric)  # (N, K, C)
        xi = torch.randn(u.shape[:2], dtype=u.dtype, device=u.device)
        return [torch.einsum("nk,nkc->nc", xi, u)]
    if estimator == "normalized":
        norm = grad_out.norm(dim=1, keepdim=True)
        return [torch.where(norm > 0, grad_out / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0)]
    if estimator == "empirical":
        return [grad_out]
    raise ValueError(f"g_estimator must be one of {G_ESTIMATORS}, got {estimator!r}")


def observe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str, *, metric: str = "fisher",
            g_estimator: str = "exact", bias: bool = True, residuals: dict[str, torch.Tensor] | None = None,
            modules: dict[str, nn.Module] | None = None, dtype: torch.dtype = torch.float64) -> Observation:
    """One forward pass with hooks, then back-propagation of the G cotangents and of the residuals.

    Args:
        model: the network (its Linear/Conv2d layers are observed unless ``modules`` is given).
        x, y: the batch.
        loss: the trainer's loss name.
        metric: output metric (``fisher`` or ``identity``) for the ``exact`` G estimator.
        g_estimator: see :func:`g_cotangents`.
        bias: homogeneous coordinate in A.
        residuals: extra output residuals ρ (N, C) to back-propagate, by name; ``"grad"`` (= ∇_y ℓ) is
            always included.
        dtype: of the returned statistics (float64: the scores involve ill-conditioned solves).
    """
    modules = kfac_layers(model) if modules is None else modules
    with torch.enable_grad(), capture(modules) as cap:
        out = model(x)
        grad_out = output_grad(loss, out.detach(), y)
        names = [n for n in modules if n in cap]
        res = {"grad": grad_out, **(residuals or {})}
        e_res = {k: backprop(out, cap, r.to(out.dtype), names) for k, r in res.items()}
        e_g = [backprop(out, cap, u.to(out.dtype), names)
               for u in g_cotangents(loss, out.detach(), grad_out, metric, g_estimator)]
    layers = {}
    n = x.shape[0]
    for name in names:
        m = modules[name]
        a_rows = input_rows(m, cap[name].a, bias).to(dtype)
        e_rows = {k: output_rows(e[name]).to(dtype) for k, e in e_res.items()}
        factors = factors_from_rows(a_rows, [output_rows(e[name]).to(dtype) for e in e_g], n)
        layers[name] = LayerObservation(cap[name].a, a_rows, e_rows, factors)
    grad_out = grad_out.to(dtype)
    return Observation(out.detach().to(dtype), grad_out, grad_out.pow(2).sum(1).mean(), layers)


def grown_passes(model: nn.Module, x: torch.Tensor, consumer: str, *, bias: bool = True,
                 residuals: dict[str, torch.Tensor] | None = None,
                 modules: dict[str, nn.Module] | None = None, dtype: torch.dtype = torch.float64
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """The computations of :func:`grown_observation`: one forward pass (with the backward passes of
    ``residuals``, if any), the consumer's input, its rows and A = aᵀa/(N·T). Returns (a, a_rows, A,
    {residual: {layer: e rows}})."""
    modules = kfac_layers(model) if modules is None else modules
    residuals = residuals or {}
    watch = modules if residuals else {consumer: modules[consumer]}
    with torch.enable_grad() if residuals else torch.no_grad(), capture(watch) as cap:
        out = model(x)
        names = [n for n in modules if n in cap]
        e_new = {k: backprop(out, cap, r.to(out.dtype), names) for k, r in residuals.items()}
    a = cap[consumer].a
    a_rows = input_rows(modules[consumer], a, bias).to(dtype)
    A = a_rows.T @ a_rows / a_rows.shape[0]
    return a, a_rows, A, {k: {n: output_rows(e[n]).to(dtype) for n in names} for k, e in e_new.items()}


def grown_observation(obs: Observation, model: nn.Module, x: torch.Tensor, grown: str, consumer: str,
                      added: int, *, bias: bool = True, keep: Sequence[str] = ("grad",),
                      residuals: dict[str, torch.Tensor] | None = None,
                      modules: dict[str, nn.Module] | None = None, dtype: torch.dtype = torch.float64
                      ) -> Observation:
    """What :func:`observe` would return after ``added`` units were appended to the outputs of layer
    ``grown`` with zero outgoing weights in ``consumer``, its only reader, computed from ``obs`` (the
    observation before) with one forward pass instead of a backward pass per cotangent.

    Such units leave the network's function unchanged (Mitchell et al. 2023, function-preserving
    insertion), hence every layer's output gradients e and every G; the new units' own e are zero (they
    reach the output through zero weights only). So ``grown`` gains zero columns in its e rows and a
    zero row and column in G, ``consumer`` gets the new inputs (its rows a and its A afresh), and every
    other layer keeps its statistics. Residual rows named in ``keep`` are carried over; ``residuals``
    (output vectors, e.g. a natural-gradient residual that moved with the new parameters) are
    back-propagated afresh through the grown network. Equal to a fresh :func:`observe` up to rounding.
    """
    a_new, rows_new, A_new, e_new = grown_passes(model, x, consumer, bias=bias, residuals=residuals,
                                                 modules=modules, dtype=dtype)
    layers = {}
    for name, lay in obs.layers.items():
        e_rows = {k: lay.e_rows[k] for k in keep}
        f = lay.factors
        if name == grown:
            e_rows = {k: F.pad(e, (0, added)) for k, e in e_rows.items()}
            f = LayerFactors(f.A, F.pad(f.G, (0, added, 0, added)), f.n, f.t)
        a, a_rows = lay.a, lay.a_rows
        if name == consumer:
            a, a_rows, f = a_new, rows_new, LayerFactors(A_new, f.G, f.n, f.t)
        e_rows.update({k: e[name] for k, e in e_new.items()})
        layers[name] = LayerObservation(a, a_rows, e_rows, f)
    return Observation(obs.out, obs.grad_out, obs.loss_sqnorm, layers)
