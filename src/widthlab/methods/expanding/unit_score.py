"""The expansion score of MLP candidate units, batched over candidates *and* over insertion sites.

s(θ) = Δη′(θ) / η = tr(Cᵀ A_f⁻¹ C G⁻¹) / η for k candidate units with parameters θ (incoming weights W,
bias b, rational coefficients v, c, l), features f = σ(h Wᵀ + b) on the inputs h of the layer they would
join, C = fᵀ r_⊥ / N and A_f = fᵀ f / N (Mitchell et al. 2023). A proposal search (MALA, ascent) evaluates
s and ∂s/∂θ thousands of times per expansion event, so this module is the method's inner loop:

* One tensor computation for every candidate of every site. θ holds L·P rows, P candidates per site,
  site-major. Sites differ in fan-in d and in the consumer's width m; rows are padded to the largest d,
  and r_⊥, G⁻¹ to the largest m, with zeros. Zero input columns make the padded weights inert (no
  effect on f, zero gradient), and zero residual columns add nothing to C, so every row scores exactly
  as it would alone. :attr:`UnitScore.mask` marks the real coordinates (samplers keep the rest at 0).
* Features are laid out (site, candidate·unit, sample): h Wᵀ, fᵀ r_⊥ and the weight gradient are then
  one batched matrix product per site with large matrices, instead of P tiny products (batched
  matmuls over many small matrices are slow on CPUs).
* Closed-form gradient, no autograd graph (Mitchell et al. 2023, the score bound): with M = A_f⁻¹ C,
  ∂s/∂f = (2/N)(r_⊥ − f M) G⁻¹ Mᵀ / η, then the chain rule through σ (``nn/rational.py``):
  σ = (l·x + (2v·x + c)/(1 + x²)) / ‖(v, c, l)‖.
* For k = 1 (every width candidate) A_f is a scalar and M = C / A_f: no batched solve.

The float64 reference :func:`delta_eta_rows` scores one candidate at a time with ``scores.delta_eta_lb``;
tests check that the batched score equals it row by row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from widthlab.methods.expanding import scores
from widthlab.methods.expanding.proposals import UnitLayout, unit_features


@dataclass(frozen=True)
class Site:
    """Where candidate units would join: the inputs they read and their consumer's statistics.

    Attributes:
        h: (N, d) inputs of the producing layer.
        r_perp: (N, m) residual rows at the consuming layer (Mitchell et al. 2023, the score bound).
        G_inv: (m, m) inverse of the (damped) output factor of the consumer.
        norm: the score's normaliser (η of the consumer).
    """

    h: torch.Tensor
    r_perp: torch.Tensor
    G_inv: torch.Tensor
    norm: float = 1.0


def _pad(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, cols - t.shape[-1], 0, rows - t.shape[-2]))


class UnitScore:
    """s(θ) and ∂s/∂θ for k-unit MLP candidates at one or several sites (see the module docstring).

    Args:
        k: units per candidate (1 for a neuron, the layer width for a layer candidate).
        sites: the insertion sites; θ rows are site-major, ``rows // len(sites)`` per site.
        n: the number of samples N (the batch-mean convention of C and ∂s/∂f).
        jitter: relative damping of A_f in the solves (``scores.damp``).
        dtype: working precision (float32 is about twice as fast; decisions re-score in float64).
        eps: the rational activation's norm floor (``eps_mode="floor"``).
    """

    def __init__(self, k: int, sites: Sequence[Site], n: int, *, jitter: float = 1e-8,
                 dtype: torch.dtype = torch.float64, eps: float = 1e-8):
        if not sites:
            raise ValueError("UnitScore needs at least one site")
        self.k, self.n, self.jitter, self.eps, self.dtype = int(k), int(n), jitter, eps, dtype
        self.layouts = [UnitLayout(self.k, s.h.shape[1]) for s in sites]
        self.layout = UnitLayout(self.k, max(lay.d for lay in self.layouts))
        d, m = self.layout.d, max(s.r_perp.shape[1] for s in sites)
        N = sites[0].h.shape[0]
        self.hT = torch.stack([_pad(s.h.to(dtype), N, d).T for s in sites])  # (L, d, N)
        self.h = self.hT.transpose(1, 2).contiguous()  # (L, N, d)
        self.r = torch.stack([_pad(s.r_perp.to(dtype), N, m) for s in sites])  # (L, N, m)
        self.rT = self.r.transpose(1, 2).contiguous()  # (L, m, N)
        self.G_inv = torch.stack([_pad(s.G_inv.to(dtype), m, m) for s in sites])  # (L, m, m)
        self.norm = torch.tensor([float(s.norm) for s in sites], dtype=dtype, device=self.h.device)
        ones = [torch.ones(1, lay.size, dtype=dtype, device=self.h.device) for lay in self.layouts]
        self.mask_site = torch.stack([self.pad_rows(o, i)[0] > 0 for i, o in enumerate(ones)])  # (L, D)

    @classmethod
    def single(cls, layout: UnitLayout, h: torch.Tensor, r_perp: torch.Tensor, G_inv: torch.Tensor, n: int,
               norm: float = 1.0, **kw) -> UnitScore:
        """The score at one site (rows of θ are that site's candidates)."""
        if layout.kernel:
            raise ValueError("UnitScore is for MLP units (no kernel)")
        return cls(layout.k, [Site(h.reshape(h.shape[0], -1), r_perp, G_inv, norm)], n, **kw)

    @property
    def sites(self) -> int:
        return self.hT.shape[0]

    def mask(self, rows: int) -> torch.Tensor:
        """(rows, D) True where a coordinate is real (not padding), for site-major θ of ``rows`` rows."""
        return self.mask_site.repeat_interleave(rows // self.sites, 0)

    def pad_rows(self, theta: torch.Tensor, site: int) -> torch.Tensor:
        """Rows in site ``site``'s own layout (P, D_site) -> the padded layout (P, D)."""
        parts = self.layouts[site].split(theta)
        d_pad = self.layout.d - self.layouts[site].d
        parts["W"] = torch.nn.functional.pad(parts["W"], (0, d_pad))
        return self.layout.join(parts)

    def unpad_rows(self, theta: torch.Tensor, site: int) -> torch.Tensor:
        """Padded rows (P, D) -> site ``site``'s own layout (P, D_site)."""
        parts = self.layout.split(theta)
        parts["W"] = parts["W"][..., :self.layouts[site].d]
        return self.layouts[site].join(parts)

    # ----------------------------------------------------------------------------------- evaluation

    def _forward(self, theta: torch.Tensor):
        L, k = self.sites, self.k
        P = theta.shape[0] // L
        p = self.layout.split(theta.to(self.dtype))
        W = p["W"].reshape(L, P * k, self.layout.d)
        v, c, l = (p[x].reshape(L, P * k, 1) for x in "vcl")
        q = v * v + c * c + l * l
        nrm = q.clamp_min(self.eps).sqrt()
        # σ = a·x + (b·x + e)/(1 + x²) with the per-unit coefficients divided by the norm once, so that
        # the (L, P·k, N) arrays see as few operations as possible (this is the search's inner loop)
        a, b, e = l / nrm, 2 * v / nrm, c / nrm
        pre = torch.baddbmm(p["b"].reshape(L, P * k, 1), W, self.hT)  # (L, P·k, N)
        den = (pre * pre).add_(1).reciprocal_()
        pd = pre * den
        f = (a * pre).addcmul_(b, pd).addcmul_(e, den)  # σ(pre)
        C = f @ self.r / self.n  # (L, P·k, m)
        f3, C3 = f.view(L * P, k, -1), C.view(L * P, k, -1)
        if k == 1:  # A_f is 1×1: M = C / (A_f (1 + jitter)), as scores.damp would give
            A_f = (f3 * f3).sum(-1, keepdim=True) / f3.shape[-1]
            M = C3 / (A_f * (1 + self.jitter))
        else:
            A_f = f3 @ f3.transpose(1, 2) / f3.shape[-1]
            M = torch.linalg.solve(scores.damp(A_f, self.jitter), C3)
        MG = M.reshape(L, P * k, -1) @ self.G_inv  # M G⁻¹, (L, P·k, m)
        s = (C * MG).view(L, P, -1).sum(-1) / self.norm[:, None]  # (L, P)
        return s.reshape(L * P), (pre, den, pd, f, M, MG, q, nrm, a, b, e, v, c, l)

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        return self._forward(theta)[0]

    def official_value_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """s and the gradient the official sampler follows: half of ∂s/∂θ with the residual term scaled
        by √η (the code back-propagates A_f⁻¹ c G⁻¹ (r_⊥ − cᵀ A_f⁻¹ f) with c = C/√η)."""
        s, g = self.value_and_grad(theta, residual_scale=self.norm.sqrt())
        return s, 0.5 * g

    @torch.no_grad()
    def value_and_grad(self, theta: torch.Tensor, residual_scale: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """s(θ) and ∂s/∂θ; ``residual_scale`` (per site) multiplies the r_⊥ term of ∂s/∂f."""
        L, k = self.sites, self.k
        P = theta.shape[0] // L
        s, (pre, den, pd, f, M, MG, q, nrm, a, b, e, v, c, l) = self._forward(theta)
        # ∂s/∂fᵀ = (2/N)(M G⁻¹ r_⊥ᵀ − (M G⁻¹ Mᵀ) fᵀ) / η in the (unit, sample) layout; the scale goes on
        # the small factors
        scale = (2.0 / self.n) / self.norm[:, None, None]
        MGs = MG * scale
        MGM = (MGs.view(L * P, k, -1) @ M.transpose(1, 2))  # (L·P, k, k)
        gr = MGs @ self.rT  # (L, P·k, N)
        if residual_scale is not None:
            gr = gr * residual_scale.to(gr.dtype).view(L, 1, 1)
        if k == 1:
            gf = gr.addcmul_(MGM.view(L, P, 1), f, value=-1)
        else:
            gf = torch.baddbmm(gr.view(L * P, k, -1), MGM, f.view(L * P, k, -1), alpha=-1).view_as(f)
        # chain rule through σ: ∂σ/∂x = a + den·(b − 2·pd·(b·x + e))
        dpre = (b * pre).add_(e).mul_(pd).mul_(-2).add_(b).mul_(den).add_(a).mul_(gf)
        s_pre, s_pd, s_den = ((gf * t).sum(-1, keepdim=True) for t in (pre, pd, den))
        # Σ_n gf·σ, and the norm's share of ∂σ/∂(v, c, l) (only where the norm is not floored)
        gff = (a * s_pre + b * s_pd + e * s_den) * (q > self.eps).to(f.dtype) / nrm
        grads = {"W": (dpre @ self.h).reshape(L * P, k, -1),
                 "b": dpre.sum(-1).reshape(L * P, k),
                 "v": ((2 * s_pd - gff * v) / nrm).reshape(L * P, k),
                 "c": ((s_den - gff * c) / nrm).reshape(L * P, k),
                 "l": ((s_pre - gff * l) / nrm).reshape(L * P, k)}
        return s, self.layout.join(grads).to(theta.dtype)


def delta_eta_rows(layout: UnitLayout, theta: torch.Tensor, site: Site, n: int, *, jitter: float = 0.0
                   ) -> torch.Tensor:
    """Reference: Δη′/η of each candidate row, one at a time with ``scores.delta_eta_lb``."""
    out = []
    for row in theta:
        f = unit_features(layout, row[None], site.h)[0]  # (N, k)
        st = scores.candidate_stats(f, site.r_perp, n)
        out.append(scores.delta_eta_lb(st.C, st.A_f, site.G_inv, jitter=jitter) / site.norm)
    return torch.stack(out)
