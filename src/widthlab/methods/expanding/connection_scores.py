"""Scores of single input connections (rows of a layer's kernel): thaw, freeze and prune.

In the convolutional variant of self-expanding networks (Mitchell et al. 2023, the CNN experiments)
the units that switch on and off are the *input rows* of each layer: a convolution kernel is reshaped
to [C_in, kh·kw·C_out], an inactive row holds zeros and receives no updates, and each row can be thawed
(switched on at zero: the function is unchanged), frozen (switched off) or pruned (zeroed, with the
remaining rows compensating). With K-FAC factors F ≈ A ⊗ G (A over the C_in rows, G over the
kh·kw·C_out columns, and a scalar scale s) and coordinates whitened on the output side,
g̃ = ĝ·s^{-1/2}·G^{-1/2} and θ̃ = θ·G^{1/2}·s^{1/2}, every score is a closed form in A:

* natural gradient of the active rows: n = A_act⁻¹ g̃_act (0 on inactive rows); η = Σ g̃·n;
* thaw (inactive row i): Σ_out (g̃ − A n)_i² / A_ii, the lower bound Δη′ of the natural expansion
  score for the row's feature (the row's own second moment A_ii in place of its Schur complement);
* freeze (active row i): Σ_out n_i² / (A_act⁻¹)_ii, exactly what η loses when row i is removed;
* prune (active row i): Σ_out (n − θ̃)_i² / (A_act⁻¹)_ii, the quadratic-model loss change of zeroing row
  i while the other active rows compensate optimally;
* compensation: θ_act∖i ← θ_act∖i + A_rr⁻¹ A_{r,i} θ_i, the minimiser of (θ′ − θ)ᵀ A (θ′ − θ) (per
  column) over θ′ with θ′_i = 0.

Each computation has its FLOP count in closed form next to it (``*_flops``), in the convention of
:mod:`.cost` (products 2·m·n·k, Cholesky n³/3, inverse from a factor n³, inverse by LU 2n³, LU solve
2n³/3 + 2n²k, triangular solves n²k; elementwise work not counted), so that a run can charge the
method's per-step work without measuring it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

__all__ = ["ConnectionScores", "NaturalGradient", "connection_scores", "connection_scores_flops",
           "freeze_prune_flops", "freeze_prune_scores", "natural_gradient", "natural_gradient_flops",
           "prune_row", "prune_row_flops", "thaw_flops", "thaw_scores", "whiten"]


@dataclass
class ConnectionScores:
    """Per-row scores of one layer (rows: input connections). Inapplicable entries are NaN (thaw on
    active rows, freeze and prune on inactive ones)."""

    eta: torch.Tensor  # scalar
    n: torch.Tensor  # (C_in, K) natural gradient of the active rows
    thaw: torch.Tensor  # (C_in,)
    freeze: torch.Tensor  # (C_in,)
    prune: torch.Tensor  # (C_in,)
    cholesky: bool = True  # A_act factorised by Cholesky (else solved by LU), for the FLOP count


def _inv_sqrt(M: torch.Tensor, power: float) -> torch.Tensor:
    w, V = torch.linalg.eigh(M)
    return (V * w.clamp_min(torch.finfo(M.dtype).tiny) ** power) @ V.T


def whiten(grad: torch.Tensor, theta: torch.Tensor, G: torch.Tensor, s: float | torch.Tensor = 1.0
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(g̃, θ̃) = (ĝ s^{-1/2} G^{-1/2}, θ G^{1/2} s^{1/2}) for (C_in, K) matrices and a (K, K) factor G."""
    s = torch.as_tensor(s, dtype=grad.dtype)
    return grad @ _inv_sqrt(G, -0.5) / s.sqrt(), theta @ _inv_sqrt(G, 0.5) * s.sqrt()


@dataclass
class NaturalGradient:
    """The natural gradient of one layer's active rows ``act`` (sorted indices), ``n_act = A_act⁻¹ g̃_act``,
    and η = Σ g̃_act·n_act, kept in the factored form the scores need.

    The whitened gradient is g̃ = ĝ·diag(w) for a column weight w (``w`` None: ``g_act`` came whitened).
    With the Cholesky factor L of A_act only y = L⁻¹ĝ_act is solved for: η = Σ_k w_k²‖y_k‖², and a thaw
    score needs A_{i,act}A_act⁻¹ĝ_act = (L⁻¹A_{act,i})ᵀy, a solve on one column per scored row. ``n_act``
    itself (freeze and prune scores) costs the second triangular solve, on demand. Where rounding leaves
    A_act indefinite, it is solved by LU instead and A_act⁻¹ĝ_act is kept."""

    act: torch.Tensor
    eta: torch.Tensor  # scalar
    w: torch.Tensor | None  # column weights of the whitening (None: the gradient came whitened)
    _A_act: torch.Tensor
    _chol: torch.Tensor | None  # Cholesky factor L of A_act, or None where A_act was solved by LU
    _y: torch.Tensor | None  # L⁻¹ ĝ_act (Cholesky), or A_act⁻¹ ĝ_act (LU)

    @property
    def cholesky(self) -> bool:
        """Whether A_act was factorised by Cholesky (else it was solved by LU, see ``natural_gradient``)."""
        return self._chol is not None

    def _solved(self) -> torch.Tensor:
        """A_act⁻¹ ĝ_act (unweighted)."""
        if self._chol is None:
            return self._y
        return torch.linalg.solve_triangular(self._chol.mT, self._y, upper=True)

    @cached_property
    def n_act(self) -> torch.Tensor:
        """A_act⁻¹ g̃_act (on the Cholesky path the second triangular solve, done on first use)."""
        n = self._solved()
        return n if self.w is None else n * self.w

    def predict(self, A_act_rows: torch.Tensor) -> torch.Tensor:
        """A_{rows,act} A_act⁻¹ ĝ_act, (R, K), from the columns A_{act,rows} (n, R)."""
        if self._chol is None:
            return A_act_rows.mT @ self._y
        return torch.linalg.solve_triangular(self._chol, A_act_rows, upper=False).mT @ self._y

    def inverse_diagonal(self) -> torch.Tensor:
        """diag(A_act⁻¹), for the freeze and prune scores."""
        if self._chol is not None:
            return torch.cholesky_inverse(self._chol).diagonal()
        return torch.linalg.inv(self._A_act).diagonal()


def _weighted_sum(sq: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """Σ_k w_k² sq[..., k] over the last (column) dimension."""
    return sq.sum(-1) if w is None else (sq * (w * w)).sum(-1)


def natural_gradient(A: torch.Tensor, g_act: torch.Tensor, act: torch.Tensor,
                     w: torch.Tensor | None = None) -> NaturalGradient:
    """n = A_act⁻¹ g̃_act and η (module docstring) from the gradient rows ``g_act`` of the active rows
    ``act``: whitened, or raw with the whitening's column weights ``w`` (g̃ = ĝ·diag(w)). A_act is
    symmetric positive definite (a moment matrix plus prior precision); by Cholesky, with LU as the
    fallback where rounding leaves it indefinite."""
    A_act = A[act][:, act]
    L, info = torch.linalg.cholesky_ex(A_act)
    if int(info) == 0:
        y = torch.linalg.solve_triangular(L, g_act, upper=False)
        eta = _weighted_sum((y * y).sum(0), w)
    else:
        L, y = None, torch.linalg.solve(A_act, g_act)
        eta = _weighted_sum((g_act * y).sum(0), w)
    return NaturalGradient(act, eta, w, A_act, L, y)


def natural_gradient_flops(n: int, k: int, cholesky: bool = True) -> int:
    """FLOPs of :func:`natural_gradient` on n active rows and k columns: the Cholesky attempt (n³/3),
    then one triangular solve (n²k), or where it failed an LU solve (2n³/3 + 2n²k)."""
    return n ** 3 // 3 + (n * n * k if cholesky else 2 * n ** 3 // 3 + 2 * n * n * k)


def thaw_scores(A: torch.Tensor, g_rows: torch.Tensor, ng: NaturalGradient, rows: torch.Tensor
                ) -> torch.Tensor:
    """Σ_out (g̃ − A n)_i² / A_ii of the inactive ``rows`` (indices), whose gradient rows are ``g_rows``
    (whitened as the ones ``ng`` was solved from)."""
    resid = g_rows - ng.predict(A[ng.act][:, rows])
    return _weighted_sum(resid * resid, ng.w) / A[rows, rows]


def thaw_flops(rows: int, n: int, k: int, cholesky: bool = True) -> int:
    """FLOPs of :func:`thaw_scores` for ``rows`` rows against n active ones: L⁻¹A_{act,rows} (n²·rows,
    Cholesky path) and the product with the solved gradient (2·rows·n·k)."""
    return (n * n * rows if cholesky else 0) + 2 * rows * n * k


def freeze_prune_scores(ng: NaturalGradient, theta: torch.Tensor, rows: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(freeze, prune) scores of the active ``rows`` (indices into the layer's rows); ``theta`` holds
    θ̃ of those rows only, (len(rows), K)."""
    pos = torch.searchsorted(ng.act, rows)  # rows' positions among the active ones
    n = ng.n_act[pos]
    diag = ng.inverse_diagonal()[pos]
    d = n - theta
    return (n * n).sum(1) / diag, (d * d).sum(1) / diag


def freeze_prune_flops(n: int, k: int, cholesky: bool = True) -> int:
    """FLOPs of :func:`freeze_prune_scores` on n active rows and k columns: on the Cholesky path the
    second triangular solve for n_act (n²k) and diag(A_act⁻¹) from the factor (n³); on the LU path an
    inverse by LU (2n³)."""
    return n * n * k + n ** 3 if cholesky else 2 * n ** 3


def connection_scores(A: torch.Tensor, g: torch.Tensor, theta: torch.Tensor, active: torch.Tensor,
                      w: torch.Tensor | None = None) -> ConnectionScores:
    """Thaw, freeze and prune scores of every row (module docstring), from the gradient g (C_in, K),
    whitened or raw with the whitening's column weights ``w`` (see :func:`natural_gradient`), whitened
    θ̃ (C_in, K), the input factor A (C_in, C_in) and the boolean mask of active rows."""
    act, inact = active.nonzero().flatten(), (~active).nonzero().flatten()
    ng = natural_gradient(A, g[act], act, w)
    nan = torch.full((A.shape[0],), float("nan"), dtype=A.dtype, device=A.device)
    n = torch.zeros_like(g)
    n[act] = ng.n_act
    thaw, freeze, prune = nan.clone(), nan.clone(), nan.clone()
    thaw[inact] = thaw_scores(A, g[inact], ng, inact)
    freeze[act], prune[act] = freeze_prune_scores(ng, theta[act], act)
    return ConnectionScores(ng.eta, n, thaw, freeze, prune, ng.cholesky)


def connection_scores_flops(c_in: int, n: int, k: int, cholesky: bool = True) -> int:
    """FLOPs of :func:`connection_scores` on a layer of ``c_in`` rows, n of them active, k columns."""
    return (natural_gradient_flops(n, k, cholesky) + thaw_flops(c_in - n, n, k, cholesky)
            + freeze_prune_flops(n, k, cholesky))  # n_act solved once, for the result and the scores


def prune_row(theta: torch.Tensor, A: torch.Tensor, active: torch.Tensor, i: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero active row ``i`` of θ (C_in, K) and add the compensation A_rr⁻¹ A_{r,i} θ_i to the other
    active rows r; returns the new θ and the new mask."""
    if not bool(active[i]):
        raise ValueError(f"row {i} is not active")
    keep = active.clone()
    keep[i] = False
    r = keep.nonzero().flatten()
    out = theta.clone()
    out[r] = theta[r] + torch.linalg.solve(A[r][:, r], A[r, i:i + 1] @ theta[i:i + 1])
    out[i] = 0
    return out, keep


def prune_row_flops(n: int, k: int) -> int:
    """FLOPs of :func:`prune_row` on a layer with n active rows (n − 1 kept) and k columns: the product
    A_{r,i} θ_i (2(n − 1)k) and the LU solve on the kept rows (2(n − 1)³/3 + 2(n − 1)²k)."""
    r = n - 1
    return 2 * r * k + 2 * r ** 3 // 3 + 2 * r * r * k
