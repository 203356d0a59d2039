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
        return s.reshape(L * P), (pre, den, pd, f, M, MG, q, nrm, a, b, e, v, c, l, C3, A_f)

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        return self._forward(theta)[0]

    def moments(self, theta: torch.Tensor) -> BlockMoments:
        """s(θ) with the statistics C, A_f of every row's k units, for :func:`single_unit_scores` and
        :func:`greedy_gains` (one site)."""
        if self.sites != 1:
            raise ValueError("moments scores the candidates of one site")
        s, cache = self._forward(theta)
        return BlockMoments(s, cache[-2], cache[-1], self.G_inv[0], 1, float(self.norm[0]), self.jitter)

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
        s, (pre, den, pd, f, M, MG, q, nrm, a, b, e, v, c, l, _, _) = self._forward(theta)
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


@dataclass(frozen=True)
class BlockMoments:
    """The scores of P candidates of k units each and what they were computed from: C = fᵀr_⊥/N
    (P, K, m), A_f (P, K, K), ``cols`` consecutive features per unit (K = k·cols), G⁻¹, η and the
    jitter of A_f."""

    score: torch.Tensor  # (P,) s = tr(Cᵀ A_f⁻¹ C G⁻¹)/η
    C: torch.Tensor
    A_f: torch.Tensor
    G_inv: torch.Tensor
    cols: int
    norm: float
    jitter: float

    def single(self) -> torch.Tensor:
        """(P, k) :func:`single_unit_scores`."""
        return single_unit_scores(self.C, self.A_f, self.G_inv, self.cols, self.norm, self.jitter)

    def gains(self, row: int) -> tuple[list[int], torch.Tensor]:
        """:func:`greedy_gains` of candidate ``row``."""
        return greedy_gains(self.C[row], self.A_f[row], self.G_inv, self.cols, self.norm, self.jitter)


def single_unit_scores(C: torch.Tensor, A_f: torch.Tensor, G_inv: torch.Tensor, cols: int, norm: float,
                       jitter: float = 0.0) -> torch.Tensor:
    """s({u}) of every unit u of P candidates of k units, (P, k): each unit scored alone, from its own
    rows of C (P, K, m) and its diagonal block of A_f (P, K, K), ``cols`` features per unit. With k = 1
    this is the candidates' score."""
    P, K, m = C.shape
    k = K // cols
    A_u = A_f.view(P, k, cols, k, cols).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)  # (P, k, cols, cols)
    C_u = C.view(P, k, cols, m)
    if cols == 1:
        M = C_u / (A_u * (1 + jitter))
    else:
        M = torch.linalg.solve(scores.damp(A_u, jitter), C_u)
    return (C_u * (M @ G_inv)).sum((2, 3)) / norm


def single_unit_flops(rows: int, k: int, cols: int, m: int) -> int:
    """FLOPs of :func:`single_unit_scores` (``cost.counted``'s convention)."""
    solve = rows * k * (2 * cols ** 3 // 3 + 2 * cols * cols * m) if cols > 1 else 0
    return solve + 2 * rows * k * cols * m * m


def greedy_gains(C: torch.Tensor, A_f: torch.Tensor, G_inv: torch.Tensor, cols: int, norm: float,
                 jitter: float = 0.0) -> tuple[list[int], torch.Tensor]:
    """Order the units of one k-unit candidate greedily and give each its marginal gain.

    The score of a subset S of the units is s(S) = tr(C_Sᵀ A_S⁻¹ C_S G⁻¹)/η, C_S and A_S the rows (and
    columns) of C = fᵀr_⊥/N and A_f of the units' features (``cols`` consecutive features per unit):
    the lower bound Δη′ of adding S alone (Mitchell et al. 2023, the score bound). A unit's gain is
    s(S ∪ {u}) − s(S), S the units before it; greedy: each step takes the unit of largest gain. The
    gains sum to the whole candidate's score. They need not decrease (two units can be worth more
    together than apart), so callers keep the prefix whose gains pass. (The one-unit loop would score u
    after committing S with the residual projected off S's features, the same quantity when S's
    features are orthogonal to the layer's other inputs; this one needs no new observation.)

    Returns:
        the units in greedy order and their gains (k,), in units of s.
    """
    k = C.shape[0] // cols  # (no FLOP meter here: the callers charge greedy_gains_flops)
    chosen: list[int] = []
    gains = []
    last = 0.0
    for _ in range(k):
        best, best_u = None, None
        for u in range(k):
            if u in chosen:
                continue
            idx = torch.cat([torch.arange(w * cols, (w + 1) * cols) for w in (*chosen, u)])
            Cs, As = C[idx], A_f[idx][:, idx]
            M = torch.linalg.solve(scores.damp(As, jitter), Cs)
            val = float((Cs * (M @ G_inv)).sum()) / norm
            if best is None or val > best:
                best, best_u = val, u
        chosen.append(best_u)
        gains.append(best - last)
        last = best
    return chosen, torch.tensor(gains, dtype=torch.float64)


def greedy_gains_flops(k: int, cols: int, m: int) -> int:
    """FLOPs of :func:`greedy_gains` (``cost.counted``'s convention: a solve as LU, 2K³/3, plus its
    triangular solves, 2K²m; then M G⁻¹ and the trace), summed over the subsets it scores."""
    total = 0
    for size in range(1, k + 1):
        K = size * cols
        total += (k - size + 1) * (2 * K ** 3 // 3 + 2 * K * K * m + 2 * K * m * m)
    return total


def delta_eta_rows(layout: UnitLayout, theta: torch.Tensor, site: Site, n: int, *, jitter: float = 0.0
                   ) -> torch.Tensor:
    """Reference: Δη′/η of each candidate row, one at a time with ``scores.delta_eta_lb``."""
    out = []
    for row in theta:
        f = unit_features(layout, row[None], site.h)[0]  # (N, k)
        st = scores.candidate_stats(f, site.r_perp, n)
        out.append(scores.delta_eta_lb(st.C, st.A_f, site.G_inv, jitter=jitter) / site.norm)
    return torch.stack(out)


class ChannelScore:
    """s(θ) and ∂s/∂θ for k-channel candidates of a CNN stage, in closed form (no autograd graph).

    The same score as ``proposals.unit_score_fn`` over ``proposals.conv_unit_features``: candidate
    channels σ(conv(h, W) + b) (rational σ), then the stage's 2×2 max-pool, read by the consumer as its
    K-FAC rows, patches of a Conv2d (f (N·T, k·kh·kw)) or global averages for the Linear head
    (f (N, k)); s = tr(Cᵀ A_f⁻¹ C G⁻¹)/η with C = fᵀ r_⊥/N and A_f = fᵀ f/(N·T) (Mitchell et al.
    2023, the score bound and its CNN variant). Its gradient with M = A_f⁻¹ C is
    ∂s/∂f = (2/N)(r_⊥ − f M/T) G⁻¹ Mᵀ/η; it goes back through the patches (the adjoint of the
    patch extraction), the pooling (to the arg-max of each window), σ and the convolution, which is one
    matrix product with the producer's input patches, taken once per search instead of at every
    evaluation. Like :class:`UnitScore` the jitter of A_f is treated as a constant in the gradient.

    Layout (this is a search's inner loop, so few and cheap operations): feature maps are kept
    location-major, (candidate, y, x, sample), i.e. channels-last with the samples as channels, where
    max-pooling and its backward pass are fast; the sums over rows in C, A_f and ∂s/∂f do not depend on
    the row order, so the consumer's rows are taken in (location, sample) order with r_⊥ reordered to
    match once. On small maps the consumer's patches are one product with a fixed 0/1 matrix (and
    their adjoint one product with its transpose), otherwise shifted slices (stride 1) or ``unfold``.
    Neighbouring patches share map entries (a 3×3 consumer reads each entry up to 9 times), so where it
    is cheaper A_f, and its term of ∂s/∂f, are taken through the (k·S)² Gram of the maps themselves
    (S locations) and a fixed contraction with the patch structure, instead of over the T·N patch rows.

    Args:
        layout: the candidates' layout (k channels, C_in inputs, the producer's kernel).
        h: (N, C_in, H, W) input of the producing convolution.
        consumer: the consuming Conv2d or Linear head.
        pool: whether the stage max-pools (2×2, ceil mode) before the consumer.
        r_perp, G_inv, n, norm: the consumer's residual rows, damped G⁻¹, N and η.
    """

    # patches as a product with a 0/1 matrix while it has at most this many entries
    SMALL_PATCH_MATRIX = 16384

    def __init__(self, layout: UnitLayout, h: torch.Tensor, consumer: torch.nn.Module, pool: bool,
                 r_perp: torch.Tensor, G_inv: torch.Tensor, n: int, norm: float = 1.0, *,
                 jitter: float = 1e-8, dtype: torch.dtype = torch.float64, eps: float = 1e-8):
        import torch.nn.functional as F

        from widthlab.methods.expanding.kfac import conv_padding

        self.layout, self.consumer, self.pool = layout, consumer, bool(pool)
        self.n, self.norm, self.jitter, self.eps, self.dtype = int(n), float(norm), jitter, eps, dtype
        self.conv = isinstance(consumer, torch.nn.Conv2d)
        if not self.conv and not isinstance(consumer, torch.nn.Linear):
            raise TypeError(f"channel candidates feed a Conv2d or Linear, got {type(consumer).__name__}")
        N, _, H, W = h.shape
        self.N, self.H, self.W = N, H, W
        pad = tuple(s // 2 for s in layout.kernel)
        cols = F.unfold(h.to(dtype), layout.kernel, padding=pad)  # (N, C_in·kh·kw, H·W)
        self.hcols = cols.permute(1, 2, 0).reshape(cols.shape[1], -1).contiguous()  # (C_in·kh·kw, H·W·N)
        self.hcolsT = self.hcols.T.contiguous()
        self.hp, self.wp = ((H + 1) // 2, (W + 1) // 2) if self.pool else (H, W)
        r = r_perp.to(dtype)
        self.U = self.V = None
        if self.conv:
            self.unfold_kw = dict(kernel_size=consumer.kernel_size, dilation=consumer.dilation,
                                  padding=conv_padding(consumer), stride=consumer.stride)
            S = self.hp * self.wp
            eye = torch.eye(S, dtype=dtype, device=h.device).view(S, 1, self.hp, self.wp)
            probe = F.unfold(eye, **self.unfold_kw)  # (S, kk, T): which input each patch entry reads
            self.kk, self.t = probe.shape[1], probe.shape[2]
            if probe.numel() <= self.SMALL_PATCH_MATRIX:
                self.U = probe.permute(1, 2, 0).reshape(self.kk * self.t, S).contiguous()  # (kk·T, S)
                self.UT = self.U.T.contiguous()
                # A_f from the maps' Gram where that is cheaper: per pair of channels S²·(N + kk²)
                # multiply-adds instead of kk²·T·N (see _from_maps); the same for its gradient term
                if S * S * (N + self.kk ** 2) < self.kk ** 2 * self.t * N:
                    U3 = self.U.view(self.kk, self.t, S)
                    self.V = torch.einsum("its,jtu->suij", U3, U3).reshape(S * S, self.kk ** 2).contiguous()
                    self.VT = self.V.T.contiguous()
            r = r.view(N, self.t, -1).transpose(0, 1).reshape(N * self.t, -1)  # rows (location, sample)
        else:
            self.kk, self.t = 1, 1
        self.r = r.contiguous()
        self.G_inv = G_inv.to(dtype)
        self.rGT = (self.r @ self.G_inv).T.contiguous()  # (r_⊥ G⁻¹)ᵀ, (m, rows)

    def _shifts(self) -> bool:
        kw = self.unfold_kw
        return tuple(kw["stride"]) == (1, 1) and tuple(kw["dilation"]) == (1, 1)

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, hp, wp, N) maps -> (B, kk, T·N): each map's patch entries (kernel row-major, as
        ``F.unfold`` orders them) at the consumer's T locations, location-major."""
        import torch.nn.functional as F

        B, hp, wp, N = x.shape
        if self.U is not None:
            return (self.U @ x.reshape(B, hp * wp, N)).view(B, self.kk, self.t * N)
        kw = self.unfold_kw
        if not self._shifts():
            cols = F.unfold(x.permute(0, 3, 1, 2).reshape(B * N, 1, hp, wp), **kw)  # (B·N, kk, T)
            return cols.view(B, N, self.kk, self.t).permute(0, 2, 3, 1).reshape(B, self.kk, self.t * N)
        (kh, kw_), (ph, pw) = kw["kernel_size"], kw["padding"]
        xp = F.pad(x, (0, 0, pw, pw, ph, ph))
        ho, wo = hp + 2 * ph - kh + 1, wp + 2 * pw - kw_ + 1
        return torch.stack([xp[:, i:i + ho, j:j + wo] for i in range(kh) for j in range(kw_)], 1
                           ).view(B, kh * kw_, ho * wo * N)

    def _patches_adjoint(self, cols: torch.Tensor) -> torch.Tensor:
        """The adjoint of :meth:`_patches`: (B, kk, T·N) -> (B, hp, wp, N)."""
        import torch.nn.functional as F

        B, kk, tn = cols.shape
        N, hp, wp = tn // self.t, self.hp, self.wp
        if self.U is not None:
            return (self.UT @ cols.view(B, kk * self.t, N)).view(B, hp, wp, N)
        kw = self.unfold_kw
        if not self._shifts():
            c = cols.view(B, kk, self.t, N).permute(0, 3, 1, 2).reshape(B * N, kk, self.t)
            return F.fold(c, (hp, wp), **kw).view(B, N, hp, wp).permute(0, 2, 3, 1)
        (kh, kw_), (ph, pw) = kw["kernel_size"], kw["padding"]
        ho, wo = hp + 2 * ph - kh + 1, wp + 2 * pw - kw_ + 1
        c = cols.view(B, kh, kw_, ho, wo, N)
        out = cols.new_zeros(B, hp + 2 * ph, wp + 2 * pw, N)
        for i in range(kh):
            for j in range(kw_):
                out[:, i:i + ho, j:j + wo] += c[:, i, j]
        return out[:, ph:ph + hp, pw:pw + wp]

    def _pair_product(self, t: torch.Tensor, mat: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """(P, k·a, k·a) -> (P, k·b, k·b): each channel pair's (a × a) block, flattened, times ``mat``."""
        P, k = t.shape[0], self.layout.k
        t = t.view(P, k, a, k, a).permute(0, 1, 3, 2, 4).reshape(P * k * k, a * a)
        return (t @ mat).view(P, k, k, b, b).permute(0, 1, 3, 2, 4).reshape(P, k * b, k * b)

    def _from_maps(self, gram: torch.Tensor) -> torch.Tensor:
        """A_f·T·N from the Gram of the pooled maps, (P, k·S, k·S) -> (P, K, K): the consumer's patch
        entries i, j at its locations t read map entries U[(i, t), s], so Σ_t,n f_(c,i) f_(d,j) =
        Σ_s,u V[(s, u), (i, j)] Σ_n X[c, s, n] X[d, u, n] with V = Σ_t U[(i, t), s] U[(j, t), u]."""
        return self._pair_product(gram, self.V, self.hp * self.wp, self.kk)

    def _to_maps(self, Q: torch.Tensor) -> torch.Tensor:
        """The adjoint of :meth:`_from_maps`, (P, K, K) -> (P, k·S, k·S): the patches' adjoint of
        Q fᵀ is this matrix times the maps."""
        return self._pair_product(Q, self.VT, self.kk, self.hp * self.wp)

    def _features(self, theta: torch.Tensor):
        import torch.nn.functional as F

        P, k = theta.shape[0], self.layout.k
        p = self.layout.split(theta.to(self.dtype))
        Wm = p["W"].reshape(P * k, -1)
        v, c, l = (p[x].reshape(P * k, 1) for x in "vcl")
        q = v * v + c * c + l * l
        nrm = q.clamp_min(self.eps).sqrt()
        a, b, e = l / nrm, 2 * v / nrm, c / nrm
        pre = torch.addmm(p["b"].reshape(P * k, 1), Wm, self.hcols)  # (P·k, H·W·N)
        den = (pre * pre).add_(1).reciprocal_()
        pd = pre * den
        x = (a * pre).addcmul_(b, pd).addcmul_(e, den)
        x4 = x.view(P * k, self.H, self.W, self.N)  # location-major maps
        idx = None
        if self.pool:  # channels-last view (samples as channels): the fast max-pool kernel
            xc, idx = F.max_pool2d(x4.permute(0, 3, 1, 2), 2, ceil_mode=True, return_indices=True)
            x4 = xc.permute(0, 2, 3, 1)  # (P·k, hp, wp, N)
        if self.conv:
            fT = self._patches(x4).view(P, k * self.kk, -1)  # (P, K, T·N), K channel-major like the weights
        else:
            fT = x4.mean((1, 2)).view(P, k, self.N)  # (P, k, N)
        C = fT @ self.r / self.n  # (P, K, m)
        if self.V is not None:
            X = x4.reshape(P, k * self.hp * self.wp, self.N)
            A_f = self._from_maps(X @ X.transpose(1, 2)) / fT.shape[2]
        else:
            A_f = fT @ fT.transpose(1, 2) / fT.shape[2]
        if fT.shape[1] == 1:
            M = C / (A_f * (1 + self.jitter))
        else:
            M = torch.linalg.solve(scores.damp(A_f, self.jitter), C)
        MG = M @ self.G_inv
        s = (C * MG).sum((1, 2)) / self.norm
        return s, (P, k, x, idx, x4, fT, M, MG, pre, den, pd, q, nrm, a, b, e, v, c, l, C, A_f)

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        return self._features(theta)[0]

    def moments(self, theta: torch.Tensor) -> BlockMoments:
        """s(θ) with the statistics C, A_f of every row's k channels (a channel owns its kh·kw patch
        columns of the consumer), for :func:`single_unit_scores` and :func:`greedy_gains`."""
        s, cache = self._features(theta)
        return BlockMoments(s, cache[-2], cache[-1], self.G_inv, self.kk, self.norm, self.jitter)

    def flops(self, rows: int, grad: bool = False) -> int:
        """The FLOPs ``cost.counted`` measures for one evaluation of ``rows`` candidates (its
        convention: matrix products 2·m·n·k, the batched solve of A_f for k·kh·kw > 1 as LU plus
        triangular solves; pooling, patch copies and elementwise work are free), in closed form so that
        a search is charged without running the counting mode on every new shape (a test checks it
        against ``cost.counted``)."""
        P, k = rows, self.layout.k
        K = k * self.kk
        R, m = self.N * self.t, self.G_inv.shape[0]
        ck, hwn = self.hcols.shape
        patches = 2 * P * k * self.U.shape[0] * self.U.shape[1] * self.N if self.U is not None else 0
        solve = P * (2 * K ** 3 // 3 + 2 * K * K * m) if K > 1 else 0
        if self.V is not None:  # the maps' Gram and its contraction with V (or the adjoint's)
            S = self.hp * self.wp
            gram = 2 * P * (k * S) ** 2 * self.N + 2 * P * k * k * S * S * self.kk ** 2
        else:  # fᵀf (or the product of M G⁻¹ Mᵀ with fᵀ)
            gram = 2 * P * K * K * R
        # σ(W h + b), patches, C = fᵀr, A_f, the solve, M G⁻¹
        value = 2 * P * k * ck * hwn + patches + 2 * P * K * R * m + gram + solve + 2 * P * K * m * m
        if not grad:
            return value
        # M (r G⁻¹)ᵀ, M G⁻¹ Mᵀ, its A_f-term, the patches' adjoint, the weight gradient
        return value + 2 * P * K * m * (R + K) + gram + patches + 2 * P * k * hwn * ck

    @torch.no_grad()
    def value_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, cache = self._features(theta)
        P, k, x, idx, x4, fT, M, MG, pre, den, pd, q, nrm, a, b, e, v, c, l, _, _ = cache
        scale = 2.0 / (self.n * self.norm)
        # ∂s/∂fᵀ = (2/N)(M G⁻¹ r_⊥ᵀ − (M G⁻¹ Mᵀ) fᵀ / T)/η, (P, K, rows); M G⁻¹ Mᵀ is symmetric
        K = M.shape[1]
        gr = (M.reshape(P * K, -1) @ self.rGT).view(P, K, -1)  # one product, not P with a broadcast operand
        if self.V is not None:  # the second term's patch adjoint taken on the maps (_to_maps)
            S = self.hp * self.wp
            g4 = self._patches_adjoint(gr.mul_(scale).view(P * k, self.kk, -1)).reshape(P, k * S, self.N)
            g4 = torch.baddbmm(g4, self._to_maps(MG @ M.transpose(1, 2)), x4.reshape(P, k * S, self.N),
                               alpha=-scale / self.t).view(P * k, self.hp, self.wp, self.N)
        else:
            gfT = torch.baddbmm(gr, MG @ M.transpose(1, 2), fT, alpha=-1.0 / self.t).mul_(scale)
            if self.conv:
                g4 = self._patches_adjoint(gfT.view(P * k, self.kk, -1))  # (P·k, hp, wp, N)
            else:
                g4 = (gfT.reshape(P * k, 1, 1, self.N) / (self.hp * self.wp)).expand(
                    P * k, self.hp, self.wp, self.N)
        if self.pool:
            gx = torch.ops.aten.max_pool2d_with_indices_backward(
                g4.permute(0, 3, 1, 2), x.view(P * k, self.H, self.W, self.N).permute(0, 3, 1, 2),
                [2, 2], [2, 2], [0, 0], [1, 1], True, idx)  # (P·k, N, H, W), channels-last
            gx = gx.permute(0, 2, 3, 1).reshape(P * k, -1)
        else:
            gx = g4.reshape(P * k, -1)
        # chain rule through σ (as UnitScore): ∂σ/∂x = a + den·(b − 2·pd·(b·x + e))
        dpre = (b * pre).add_(e).mul_(pd).mul_(-2).add_(b).mul_(den).add_(a).mul_(gx)
        s_pre, s_pd, s_den = ((gx * u).sum(-1, keepdim=True) for u in (pre, pd, den))
        gff = (a * s_pre + b * s_pd + e * s_den) * (q > self.eps).to(pre.dtype) / nrm
        grads = {"W": (dpre @ self.hcolsT).reshape(P, k, -1),
                 "b": dpre.sum(-1).reshape(P, k),
                 "v": ((2 * s_pd - gff * v) / nrm).reshape(P, k),
                 "c": ((s_den - gff * c) / nrm).reshape(P, k),
                 "l": ((s_pre - gff * l) / nrm).reshape(P, k)}
        return s, self.layout.join(grads).to(theta.dtype)
