"""Natural expansion scores as pure functions of K-FAC matrices (Mitchell et al. 2023, the natural expansion
score; the score bound).

Notation (one consuming layer with K-FAC factors, conventions of ``kfac.py``; T = 1 for Linear):

* a: the layer's input rows, e: the back-propagated residual rows, N samples, T locations each;
* A = aᵀa/(NT), G the output factor, ḡ = aᵀe/N (d × m);
* η_l = tr(ḡᵀ A⁻¹ ḡ G⁻¹) = vec(ḡ)ᵀ (A ⊗ G)⁻¹ vec(ḡ)                                   (layer score)
* r_⊥ = e − a (aᵀa)⁻¹ aᵀe = e − a A⁻¹ḡ/T   (residual rows; E[a r_⊥ᵀ] = 0)
* candidate units with rows f (k features, zero outgoing weights):
  C = fᵀ r_⊥ / N,  A_f = fᵀf/(NT),  A_fa = fᵀa/(NT),  S = A_f − A_fa A⁻¹ A_af (Schur complement)
* Δη  = tr(Cᵀ S⁻¹ C G⁻¹)    exact K-FAC increase: η_l(augmented) − η_l = Δη
* Δη′ = tr(Cᵀ A_f⁻¹ C G⁻¹)  the cheap lower bound (A_f ⪰ S), needing no solve against A.

The absolute score Δη′ / E‖∇_y ℓ‖² is scale-free; with the identity output metric η ≤ E‖∇_y ℓ‖², so it
lies in [0, 1] and at most about 1/α units pass the threshold α per event (Mitchell et al. 2023, the score
bound).

Every function takes and returns tensors and batches over leading dimensions where noted; no state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def psd_pinv(M: torch.Tensor, rtol: float = 1e-10) -> torch.Tensor:
    """Pseudo-inverse of a symmetric PSD matrix (batched); eigenvalues below rtol·max are dropped."""
    return torch.linalg.pinv(M, hermitian=True, rtol=rtol)


def damp(M: torch.Tensor, relative: float) -> torch.Tensor:
    """M + relative·(tr M / m)·I: the official code's damping of G in Δη′ (relative = 0.1)."""
    if relative == 0:
        return M
    m = M.shape[-1]
    eye = torch.eye(m, dtype=M.dtype, device=M.device)
    return M + relative * M.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * eye


def layer_eta(gbar: torch.Tensor, A_inv: torch.Tensor, G_inv: torch.Tensor,
              A_inv_gbar: torch.Tensor | None = None) -> torch.Tensor:
    """η_l = tr(ḡᵀ A⁻¹ ḡ G⁻¹) for ḡ (d, m), given the (pseudo-)inverses (and A⁻¹ḡ, where the caller
    has it)."""
    solved = A_inv @ gbar if A_inv_gbar is None else A_inv_gbar
    return (gbar * (solved @ G_inv)).sum()


def residual_rows(a_rows: torch.Tensor, e_rows: torch.Tensor, A_pinv: torch.Tensor,
                  gbar: torch.Tensor, t: int = 1, A_pinv_gbar: torch.Tensor | None = None) -> torch.Tensor:
    """r_⊥ = e − a A⁻¹ḡ / T: what the layer's existing inputs cannot explain (least squares); A⁻¹ḡ is
    ``A_pinv_gbar`` where the caller has it."""
    solved = A_pinv @ gbar if A_pinv_gbar is None else A_pinv_gbar
    return e_rows - a_rows @ solved / t


@dataclass
class CandidateStats:
    """Moments of candidate features against a consuming layer (batched over leading dims of f).

    Attributes:
        C: (..., k, m) = fᵀ r_⊥ / N.
        A_f: (..., k, k) = fᵀ f / (NT).
        A_fa: (..., k, d) = fᵀ a / (NT).
    """

    C: torch.Tensor
    A_f: torch.Tensor
    A_fa: torch.Tensor | None = None


def candidate_stats(f_rows: torch.Tensor, r_perp: torch.Tensor, n: int,
                    a_rows: torch.Tensor | None = None) -> CandidateStats:
    """C, A_f (and A_fa if ``a_rows`` is given) for candidate rows ``f_rows`` (..., NT, k)."""
    nt = f_rows.shape[-2]
    ft = f_rows.transpose(-1, -2)
    C = ft @ r_perp / n
    A_f = ft @ f_rows / nt
    A_fa = ft @ a_rows / nt if a_rows is not None else None
    return CandidateStats(C, A_f, A_fa)


def schur_complement(A_f: torch.Tensor, A_fa: torch.Tensor, A_pinv: torch.Tensor) -> torch.Tensor:
    """S = A_f − A_fa A⁻¹ A_af: the part of the candidates' second moment not explained by a."""
    return A_f - A_fa @ A_pinv @ A_fa.transpose(-1, -2)


def _solve_psd(M: torch.Tensor, B: torch.Tensor, jitter: float) -> torch.Tensor:
    """M⁻¹ B for PSD M with a tiny relative jitter (differentiable, unlike pinv near rank changes)."""
    if jitter == 0:
        return psd_pinv(M) @ B
    return torch.linalg.solve(damp(M, jitter), B)


def delta_eta_lb(C: torch.Tensor, A_f: torch.Tensor, G_inv: torch.Tensor, *, jitter: float = 0.0
                 ) -> torch.Tensor:
    """Δη′ = tr(Cᵀ A_f⁻¹ C G⁻¹) (batched over leading dims of C, A_f).

    Args:
        jitter: relative Tikhonov term on A_f (``damp``); 0 uses the pseudo-inverse as the official code
            does. A tiny jitter (1e-8) keeps gradients finite for the proposal samplers.
    """
    return (C * (_solve_psd(A_f, C, jitter) @ G_inv)).sum((-1, -2))


def delta_eta(C: torch.Tensor, S: torch.Tensor, G_inv: torch.Tensor, *, jitter: float = 0.0) -> torch.Tensor:
    """Δη = tr(Cᵀ S⁻¹ C G⁻¹): the exact K-FAC increase from adding the candidates (Schur identity)."""
    return (C * (_solve_psd(S, C, jitter) @ G_inv)).sum((-1, -2))


def delta_eta_lb_grad_f(f_rows: torch.Tensor, r_perp: torch.Tensor, G_inv: torch.Tensor, n: int
                        ) -> torch.Tensor:
    """Closed-form ∂Δη′/∂f_n = (2/N) A_f⁻¹ C G⁻¹ (r_⊥,n − Cᵀ A_f⁻¹ f_n), rows (NT, k) (Mitchell et al. 2023,
    the score bound; T = 1).

    The official code back-propagates half of this (its cotangent omits the 2).
    """
    st = candidate_stats(f_rows, r_perp, n)
    P = psd_pinv(st.A_f)
    resid = r_perp - f_rows @ P @ st.C  # (N, m): r_⊥,n − Cᵀ A_f⁻¹ f_n, as rows
    return (2.0 / n) * resid @ G_inv @ st.C.T @ P


def room(r_perp: torch.Tensor, G_inv: torch.Tensor, n: int, t: int = 1) -> torch.Tensor:
    """ρ = (T/N) tr(r_⊥ᵀ r_⊥ G⁻¹): the most that new units at this consumer can add to its η.

    With P_f the projection onto the candidates' rows (sample space), C = fᵀr_⊥/N and A_f = fᵀf/(NT) give
    Δη′ = (T/N) tr(r_⊥ᵀ P_f r_⊥ G⁻¹) ≤ ρ; and units added one after another raise η by exact K-FAC
    increases Δη_j ≥ Δη′_j (Mitchell et al. 2023, Δη′ ≤ Δη) that together project r_⊥ onto a growing
    subspace, so Σ_j Δη_j ≤ ρ. Normalised by the ρ measured before an event, the absolute scores of the
    event's additions at one site therefore sum to at most 1: at most 1/α of them pass α (the paper's
    bound on the rate of additions, here for the K-FAC statistics actually used, any output metric).
    """
    return (r_perp * (r_perp @ G_inv)).sum() * (t / n)


def absolute_score(delta: torch.Tensor, loss_sqnorm: torch.Tensor) -> torch.Tensor:
    """Δη′ / E‖∇_y ℓ‖²: compared with α (Mitchell et al. 2023, the score bound; the expansion loop)."""
    return delta / loss_sqnorm.clamp_min(torch.finfo(loss_sqnorm.dtype).tiny)


def relative_score(delta: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """Δη′ / η: compared with τ (Mitchell et al. 2023, the expansion loop)."""
    return delta / eta.clamp_min(torch.finfo(eta.dtype).tiny)
