"""Importance distributions over neuron indices 0, 1, 2, ... (Errica et al. 2025, the importance
distribution).

An adaptive layer treats its units as an infinite ordered sequence; a monotonically decreasing
distribution f over the indices says how much each unit matters. Every family here shares one
interface:

* ``cdf(x)``: the continuous CDF F(x), differentiable in the family's learnable parameters;
* ``pmf(i)``: f(i) = F(i + 1) - F(i), the discretised mass of index i;
* ``quantile(k)``: the continuous k-quantile q of the family (float64, no gradient);
* ``width_tensor(k)``: the width D = floor(q) + 2 as a 0-dim int64 tensor *on the parameters' device*,
  computed without any host synchronisation ("+2" is the official code's safety margin, §2 "Width");
* ``width(k)``: the same as a Python int (one host read; construction and tests only);
* ``importance(D)``: the vector p of §2, ``p_i = (f(i) + eps) / sum_{j<D} (f(j) + eps)``, eps = 1e-6;
* ``scale(t, dim)``: t ⊙ p along axis ``dim`` of t (the layer rescaling); on the CPU the exponential
  family does it in one compiled autograd node (``cpu_kernel``), with the same values;
* ``project_()``: the in-place projection of the learnable parameters onto their feasible set
  (``boundary`` for the exponential, gamma >= 1.3 for the power law), done on the device;
* ``latent``: the family's learnable width parameter, on which the Gaussian width prior acts (lam,
  gamma, b; None for the uniform control, which learns nothing);
* ``describe()``: current parameter values as floats for the record (one host read).

Families:

``exponential`` (default; §2): rate lam = softplus(r) + 1e-32, F(x) = 1 - exp(-lam x), so
f(i) = exp(-lam i) (1 - exp(-lam)) and q = -ln(1 - k) / lam, D(lam) = floor(-ln(1 - k)/lam) + 2.
An optional ``boundary`` b is a floor on lam (a cap D(b) on the width).

``power_law`` (shifted Pareto; §2 "Other families"): gamma = relu(g) projected to >= 1.3,
F(x) = 1 - ((x_min + s) / (x + x_min + s))^(gamma - 1), and, as in the official code,
q = (x_min + s)(1 - k)^(-1/(gamma - 1)) - s (x_min above the CDF's quantile: one harmless extra unit).

``uniform`` (§2; a no-ordering control): a fixed support b, F(x) = min(x/b, 1), q = b so D = b + 2; the
two margin units get only the eps mass. Nothing is learned, so the width never changes.

``sigmoid`` (§2 "Other families"; the official class is missing, so this form is our choice): a soft
step of learnable location b = softplus(r_b) and fixed slope s, density g(x) ∝ 1 - sigmoid(s (x - b))
on x >= 0. Integrating, F(x) = 1 - softplus(s (b - x)) / softplus(s b), and the quantile has the closed
form q = b - softplus^-1((1 - k) softplus(s b)) / s. Importance is nearly flat up to b and falls off
over about 1/s units after it; b = 128, s = 1, k = 0.9 gives q = 115.2, D = 117.

Float robustness of D: q is computed in float64 from the (float32) parameter, on the host and on the
device alike; IEEE division and floor are exactly rounded on both, so the width a host computes and the
width the device flags always agree (tests/methods/adaptive/test_aw_distributions.py checks boundaries).
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad as _forward_ad

from widthlab.methods.adaptive import cpu_kernel

EPS = 1e-6  # §2: the official code's log(F(i+1) - F(i) + 1e-6), exponentiated again
LAM_OFFSET = 1e-32  # §2: lam = softplus(r) + 1e-32 keeps the rate strictly positive in float64
MARGIN = 2  # §2: D = floor(q) + 2
THRESHOLD_MARGIN = 1e-5  # relative safety margin of the cached width thresholds (stable_interval)
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


def softplus_inv(y: float) -> float:
    """r with softplus(r) = y, as the official code initialises it: ln(max(e^y - 1, 1e-6)) (§2).

    For y = 0.01 this is -4.600166 (§9 test 4). Large y use the identity softplus(r) ≈ r to avoid
    overflow.
    """
    if y > 30.0:
        return y + math.log(-math.expm1(-y))
    return math.log(max(math.expm1(y), 1e-6))


def width_from_quantile(q: float) -> int:
    """D = floor(q) + 2 on the host (the same float64 arithmetic as :meth:`width_tensor`)."""
    return int(math.floor(q)) + MARGIN


def exponential_width(lam: float, k: float = 0.9) -> int:
    """D(lam) = floor(-ln(1 - k) / lam) + 2 (§2; e.g. 232 for lam = 0.01, k = 0.9)."""
    return width_from_quantile(-math.log1p(-k) / float(lam))


class ImportanceDistribution(nn.Module):
    """Base of the families: subclasses define ``cdf`` and ``quantile``; the rest is shared."""

    family = "base"
    #: Name of the learnable scalar that the Gaussian width prior N(mu, sigma^2) acts on (the latent
    #: lam_l of the paper's variational model; for other families their own width parameter), or None
    #: for a family that learns nothing.
    latent_name: str | None = None

    @property
    def latent(self) -> torch.Tensor | None:
        """The family's learnable width parameter in its natural units (post-projection), differentiable;
        None when the family has none (see :attr:`latent_name`)."""
        return None

    def cdf(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def quantile(self, k: float) -> torch.Tensor:
        """The continuous k-quantile as a 0-dim float64 tensor, detached from the graph."""
        raise NotImplementedError

    def pmf(self, i: torch.Tensor) -> torch.Tensor:
        """f(i) = F(i + 1) - F(i) for integer-valued ``i`` (any float dtype)."""
        return self.cdf(i + 1) - self.cdf(i)

    def project_(self) -> None:
        """Project the learnable parameters onto their feasible set, in place (no host sync)."""

    @torch.no_grad()
    def width_tensor(self, k: float) -> torch.Tensor:
        """D = floor(q) + 2 as a 0-dim int64 tensor on the parameters' device; never syncs."""
        return torch.floor(self.quantile(k)).to(torch.int64) + MARGIN

    def width(self, k: float) -> int:
        """D as a Python int (reads one value from the device)."""
        return int(self.width_tensor(k))

    def stable_interval(self, D: int, k: float) -> tuple[nn.Parameter, float, float] | None:
        """A parameter and an open interval (lo, hi) of its values inside which the width is surely D.

        The cached width thresholds of the callback's cheap per-step check; the interval is shrunk by a
        safety margin so that rounding of the device's arithmetic can never put a value inside it whose
        exact width (``width_tensor``) differs. None: no closed form, check the exact width every time.
        """
        return None

    def raw_floor(self) -> float:
        """The value below which ``project_`` changes the parameter of ``stable_interval`` (-inf: never)."""
        return -math.inf

    def _like(self) -> torch.Tensor:
        """A tensor giving the dtype and device of the distribution's parameters or buffers."""
        for t in (*self.parameters(), *self.buffers()):
            return t
        raise RuntimeError(f"{type(self).__name__} holds no tensor")

    def importance(self, D: int, support: int | None = None) -> torch.Tensor:
        """The importance vector p over the first D units (§2 "Importance vector actually used").

        Args:
            D: number of units (the layer's live width).
            support: normalise over the first ``support >= D`` indices instead of D and return the
                first D entries: the official eval path after truncation, which slices p without
                renormalising (§5). None normalises over D, so that sum(p) = 1.

        Returns:
            p of shape (D,), strictly decreasing for the learnable families, differentiable in their
            parameters.
        """
        n = D if support is None else max(int(support), D)
        ref = self._like()
        i = torch.arange(n, device=ref.device, dtype=ref.dtype)
        f = self.pmf(i) + EPS
        p = f / f.sum()
        return p if n == D else p[:D]

    def scale(self, t: torch.Tensor, dim: int = -1, support: int | None = None) -> torch.Tensor:
        """t ⊙ p along axis ``dim`` of ``t``, p = ``importance(t.shape[dim], support)`` (§2 "Rescaling")."""
        return scale_along(t, self.importance(t.shape[dim], support), dim)

    def describe(self) -> dict[str, float]:
        """Current parameter values for the record (one host read)."""
        return {}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v:.6g}" for k, v in self.describe().items())


class Exponential(ImportanceDistribution):
    """Discretised exponential with learnable rate lam = softplus(r) + 1e-32 (§2).

    Args:
        lam0: initial rate; r starts at softplus^-1(lam0) (-4.600166 for 0.01).
        boundary: optional floor b on lam: whenever lam < b, r is overwritten with softplus^-1(b), so
            the width never exceeds D(b) (e.g. b = 5e-4 caps it at 4607 for k = 0.9).
    """

    family = "exponential"
    latent_name = "lambda"

    def __init__(self, lam0: float = 0.01, boundary: float | None = None):
        super().__init__()
        if not lam0 > 0:
            raise ValueError(f"lambda0 must be > 0, got {lam0}")
        if boundary is not None and not boundary > 0:
            raise ValueError(f"boundary must be > 0, got {boundary}")
        self.boundary = boundary
        self.r = nn.Parameter(torch.tensor(softplus_inv(lam0)))
        # softplus is increasing, so lam >= b  <=>  r >= softplus^-1(b): a clamp of r on the device.
        self._r_min = softplus_inv(boundary) if boundary is not None else None
        self._host_cache: dict[str, Any] = {}  # CPU: key (r, D, n, dtype) -> p, dp/dr; see importance()

    @property
    def lam(self) -> torch.Tensor:
        return F.softplus(self.r) + LAM_OFFSET

    @property
    def latent(self) -> torch.Tensor:
        return self.lam  # the prior acts on the post-softplus rate, as the official code applies it

    def cdf(self, x: torch.Tensor) -> torch.Tensor:
        return -torch.expm1(-self.lam * x)

    def pmf(self, i: torch.Tensor) -> torch.Tensor:
        # e^{-lam i} (1 - e^{-lam}): the closed form has no cancellation of two CDF values near 1.
        lam = self.lam
        return torch.exp(-lam * i) * -torch.expm1(-lam)

    def importance(self, D: int, support: int | None = None) -> torch.Tensor:
        # Same values as the generic path. On the CPU, r's value is host memory (reading it is no
        # synchronisation), so p and dp/dr are computed once per value of r in float64 and reused (see
        # _host_importance); elsewhere p(r) is one graph node on the device (_ExponentialImportance).
        n = D if support is None else max(int(support), D)
        r = self.r
        if not _values_on_host(r):
            return _ExponentialImportance.apply(r, D, n)
        key = (r.item(), D, n, r.dtype)
        cache = self._host_cache
        if cache.get("key") != key:
            cache["p"], cache["dp_dr"] = self._host_buffers(key[0], D, n, r.dtype)
            cache["key"] = key
        p, dp_dr = cache["p"], cache["dp_dr"]
        if not (r.requires_grad and torch.is_grad_enabled()):
            return p
        # p + dp/dr (r - r_value): the value is p exactly (r minus its own value is exactly 0) and the
        # derivative in r is dp/dr; two built-in graph nodes, cheaper on small networks than a Python
        # autograd.Function (exact for first derivatives, which is all training uses).
        return torch.addcmul(p, dp_dr, r - key[0])

    def scale(self, t: torch.Tensor, dim: int = -1, support: int | None = None) -> torch.Tensor:
        # The compiled kernel where it applies (CPU, float32/64; it answers None elsewhere): one graph
        # node instead of the five of importance() and the product, with the same p (cpu_kernel.py).
        kernel = cpu_kernel.module()
        if kernel is not None and not _transforms_active():
            out = kernel.exponential_scale(t, self.r, support or 0, dim)
            if out is not None:
                return out
        return super().scale(t, dim, support)

    @staticmethod
    def _host_buffers(r: float, D: int, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(p, dp/dr) at raw value ``r`` (:func:`_host_importance`) as tensors of ``dtype``.

        Fresh memory for every value of r, so that a graph built at an earlier r (gradcheck, finite
        differences) keeps its own values. With the compiled kernel loaded the table comes from it, so
        that every CPU path uses one evaluation of p (numpy's exp and the C library's may differ in the
        last bit); otherwise a numpy array written in place and shared with torch (``from_numpy`` of
        each row costs less than ``torch.empty`` + ``unbind``).
        """
        kernel = cpu_kernel.module()
        if kernel is not None:
            return kernel.exponential_importance(r, D, n).to(dtype).unbind()
        np_dtype = _NUMPY_DTYPES.get(dtype)
        if np_dtype is None:  # e.g. bfloat16, which numpy lacks
            return torch.from_numpy(_host_importance(r, D, n)).to(dtype).unbind()
        out = _host_importance(r, D, n, out=np.empty((2, D), dtype=np_dtype))
        return torch.from_numpy(out[0]), torch.from_numpy(out[1])

    @torch.no_grad()
    def quantile(self, k: float) -> torch.Tensor:
        lam = self.lam.detach().to(torch.float64)
        return -math.log1p(-k) / lam

    def stable_interval(self, D: int, k: float) -> tuple[nn.Parameter, float, float] | None:
        # D(lam) = D  <=>  c/(D - 1) < lam <= c/(D - 2), c = -ln(1 - k); shrunk by a relative 1e-5 (float32
        # rounding of softplus moves lam by ~1e-7 relative), then mapped to r = softplus^-1(lam).
        c = -math.log1p(-k)
        lo = softplus_inv(c / (D - 1) * (1 + THRESHOLD_MARGIN))
        hi = softplus_inv(c / (D - 2) * (1 - THRESHOLD_MARGIN)) if D > 2 else math.inf
        if self._r_min is not None and lo < self._r_min:
            lo = -math.inf  # project_ clamps r to >= r_min before every check: lower values never occur
        return (self.r, lo, hi) if lo < hi else None

    def raw_floor(self) -> float:
        return self._r_min if self._r_min is not None else -math.inf

    def project_(self) -> None:
        if self._r_min is not None:  # checked first: runs every step, and without a boundary it is free
            with torch.no_grad():
                self.r.clamp_(min=self._r_min)

    def describe(self) -> dict[str, float]:
        return {"lambda": float(self.lam.detach())}


def _transforms_active() -> bool:
    """Whether torch.func transforms (vmap, grad, jacrev) or forward-mode AD are on: a C++ autograd
    node supports neither, so the rescaling then takes the PyTorch path."""
    return torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0


def scale_along(t: torch.Tensor, p: torch.Tensor, dim: int) -> torch.Tensor:
    """t ⊙ p with p (D,) along axis ``dim`` of t (broadcast over the other axes)."""
    if dim not in (-1, t.dim() - 1):
        p = p.reshape(p.shape[0], *([1] * (t.dim() - 1 - (dim % t.dim()))))  # (D, 1, 1) for (B, D, H, W)
    return t * p


def _values_on_host(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s value is a plain memory read rather than a device synchronisation."""
    return t.device.type == "cpu"


def _host_importance(r: float, D: int, n: int, out: np.ndarray | None = None) -> np.ndarray:
    """(2, D) array: p over the first D of n units and dp/dr, for the exponential at raw value r.

    lam = softplus(r) + 1e-32 with torch's softplus convention (identity, slope 1, above r = 20). With
    rho = e^-lam, c = 1 - rho, u_i = c rho^i + eps, the normaliser and its lam-derivative have closed
    forms, so only the first D entries are ever evaluated::

        S = sum_{i<n} u_i = (1 - rho^n) + n eps,      dS/dlam = n rho^n,
        p_i = rho^i c / S + eps / S,
        dp_i/dlam = [rho^i (rho - i c) - p_i dS/dlam] / S = rho^i (a - b i) - g,
        a = (rho - c dS/S) / S,  b = c / S,  g = eps dS / S^2.

    Eight numpy operations on the host, instead of two dozen tensor operations in the graph. Computed
    in float64 and rounded once into ``out`` (any float dtype; a new float64 array when None).
    """
    if r > 20.0:
        lam, dlam_dr = r, 1.0
    else:
        lam = math.log1p(math.exp(r))
        dlam_dr = 1.0 / (1.0 + math.exp(-r)) if r >= 0 else math.exp(r) / (1.0 + math.exp(r))
    lam += LAM_OFFSET
    rho, c = math.exp(-lam), -math.expm1(-lam)
    S = -math.expm1(-lam * n) + n * EPS
    dS = n * math.exp(-lam * n)
    i, tmp = _host_scratch(D)
    if out is None:
        out = np.empty((2, D))
    # Every ufunc runs float64 -> float64 (a ufunc writing into a narrower dtype takes numpy's slower
    # casting path); a float32 result is rounded once, by the final copy.
    work = out if out.dtype == np.float64 else tmp
    e, d = work[0], work[1]
    np.multiply(i, -lam, out=e)
    np.exp(e, out=e)  # rho^i
    np.multiply(i, -c / S * dlam_dr, out=d)
    d += (rho - c * dS / S) / S * dlam_dr
    d *= e
    d -= EPS * dS / S**2 * dlam_dr
    e *= c / S
    e += EPS / S
    if work is not out:
        np.copyto(out, work, casting="same_kind")
    return out


_SCRATCH = threading.local()  # per thread: models trained in two threads must not share a work array


def _host_scratch(D: int) -> tuple[np.ndarray, np.ndarray]:
    """(arange(D), (2, D) work array) in float64, kept per D (a handful of widths live at a time)."""
    cache = getattr(_SCRATCH, "by_width", None)
    if cache is None:
        cache = _SCRATCH.by_width = {}
    got = cache.get(D)
    if got is None:
        if len(cache) > 64:
            cache.clear()
        got = cache[D] = (np.arange(D, dtype=np.float64), np.empty((2, D)))
    return got


class _ExponentialImportance(torch.autograd.Function):
    """p(r) of the exponential family with one graph node and a hand-derived backward.

    On small networks a step costs per graph node, not per flop; through autograd p(r) records about a
    dozen nodes. With e_i = exp(-lam i), c = 1 - e^-lam, u_i = e_i c + eps, S = sum_{j<n} u_j and
    p_i = u_i / S::

        du_i/dlam = e_i (e^-lam - i c),   dp_i/dlam = (du_i/dlam - p_i sum_j du_j/dlam) / S,
        dL/dr = sigmoid(r) (sum_{i<D} g_i du_i/dlam - (sum_{i<D} g_i p_i) sum_{j<n} du_j/dlam) / S

    for the upstream gradient g over the first D <= n entries (checked by gradcheck against the generic
    autograd path in tests/methods/adaptive/test_aw_distributions.py).
    """

    @staticmethod
    def forward(ctx, r: torch.Tensor, D: int, n: int):
        lam = F.softplus(r) + LAM_OFFSET
        i = torch.arange(n, device=r.device, dtype=r.dtype)
        e = torch.exp(-lam * i)  # (n,)
        c = -torch.expm1(-lam)
        u = e * c + EPS
        S = u.sum()
        p = u / S
        ctx.save_for_backward(r, lam, i, e, c, p, S)
        ctx.D = D
        return p[:D] if n > D else p

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        r, lam, i, e, c, p, S = ctx.saved_tensors
        D = ctx.D
        du = e * (torch.exp(-lam) - i * c)  # du_i/dlam, (n,)
        dlam = (torch.dot(g, du[:D]) - torch.dot(g, p[:D]) * du.sum()) / S
        return dlam * torch.sigmoid(r), None, None


class PowerLaw(ImportanceDistribution):
    """Shifted Pareto with learnable exponent gamma = relu(g), projected to >= ``gamma_min`` (§2).

    Args:
        gamma0: initial exponent (the paper's grid: 2, 3).
        shift: s in {0, 2}.
        x_min: scale (1 in the official code).
        gamma_min: projection floor of gamma (1.3 in the official code).
    """

    family = "power_law"
    latent_name = "gamma"  # a larger gamma concentrates the mass: a narrower layer

    def __init__(self, gamma0: float = 2.0, shift: float = 0.0, x_min: float = 1.0, gamma_min: float = 1.3):
        super().__init__()
        if not gamma0 >= gamma_min > 1:
            raise ValueError(f"need gamma0 >= gamma_min > 1, got gamma0={gamma0}, gamma_min={gamma_min}")
        self.shift, self.x_min, self.gamma_min = float(shift), float(x_min), float(gamma_min)
        self.g = nn.Parameter(torch.tensor(float(gamma0)))

    @property
    def gamma(self) -> torch.Tensor:
        return F.relu(self.g)

    @property
    def latent(self) -> torch.Tensor:
        return self.gamma

    def cdf(self, x: torch.Tensor) -> torch.Tensor:
        a = self.x_min + self.shift
        return 1 - (a / (x + a)) ** (self.gamma - 1)

    @torch.no_grad()
    def quantile(self, k: float) -> torch.Tensor:
        gamma = self.gamma.detach().to(torch.float64)
        a = self.x_min + self.shift
        return a * (1 - k) ** (-1 / (gamma - 1)) - self.shift

    @torch.no_grad()
    def project_(self) -> None:
        self.g.clamp_(min=self.gamma_min)

    def describe(self) -> dict[str, float]:
        return {"gamma": float(self.gamma.detach())}


class Uniform(ImportanceDistribution):
    """Flat importance on a fixed support of ``b`` units; D = b + 2; nothing learned (§2)."""

    family = "uniform"

    def __init__(self, b: int = 64):
        super().__init__()
        if int(b) < 1:
            raise ValueError(f"uniform support b must be >= 1, got {b}")
        self.b = int(b)
        # A buffer only so that importance() knows the device and dtype of the model.
        self.register_buffer("_ref", torch.zeros(()), persistent=False)

    def cdf(self, x: torch.Tensor) -> torch.Tensor:
        return (x / self.b).clamp(0, 1)

    @torch.no_grad()
    def quantile(self, k: float) -> torch.Tensor:
        return torch.tensor(float(self.b), dtype=torch.float64, device=self._ref.device)

    def describe(self) -> dict[str, float]:
        return {"b": float(self.b)}


class Sigmoid(ImportanceDistribution):
    """Soft step: density ∝ 1 - sigmoid(s (x - b)), learnable location b = softplus(r_b), fixed slope s.

    Our form of the family the official code references but lacks (module docstring).

    Args:
        b0: initial location (the paper's grid: 128, 256).
        slope: s (the paper's grid: 1, 5).
    """

    family = "sigmoid"
    latent_name = "b"  # a smaller location b: a narrower layer

    def __init__(self, b0: float = 128.0, slope: float = 1.0):
        super().__init__()
        if not b0 > 0 or not slope > 0:
            raise ValueError(f"sigmoid needs b0 > 0 and slope > 0, got b0={b0}, slope={slope}")
        self.slope = float(slope)
        self.r_b = nn.Parameter(torch.tensor(softplus_inv(b0)))

    @property
    def b(self) -> torch.Tensor:
        return F.softplus(self.r_b)

    @property
    def latent(self) -> torch.Tensor:
        return self.b

    def cdf(self, x: torch.Tensor) -> torch.Tensor:
        s, b = self.slope, self.b
        return 1 - F.softplus(s * (b - x)) / F.softplus(s * b)

    @torch.no_grad()
    def quantile(self, k: float) -> torch.Tensor:
        s, b = self.slope, self.b.detach().to(torch.float64)
        y = (1 - k) * F.softplus(s * b)
        # softplus^-1(y) = y + log(-expm1(-y)), stable for every y > 0.
        return b - (y + torch.log(-torch.expm1(-y))) / s

    def describe(self) -> dict[str, float]:
        return {"b": float(self.b.detach()), "slope": self.slope}


FAMILIES: dict[str, type[ImportanceDistribution]] = {
    "exponential": Exponential,
    "power_law": PowerLaw,
    "uniform": Uniform,
    "sigmoid": Sigmoid,
}


def make_distribution(name: str = "exponential", *, lam0: float = 0.01, boundary: float | None = None,
                      options: dict[str, Any] | None = None) -> ImportanceDistribution:
    """Build a family by name.

    Args:
        name: ``exponential`` | ``power_law`` | ``uniform`` | ``sigmoid``.
        lam0: initial rate (exponential only).
        boundary: rate floor (exponential only).
        options: the family's own constructor options (``gamma0``, ``shift``; ``b``; ``b0``, ``slope``).

    Raises:
        ValueError: unknown family or option.
    """
    if name not in FAMILIES:
        raise ValueError(f"unknown importance distribution {name!r}; known: {', '.join(FAMILIES)}")
    options = dict(options or {})
    if name == "exponential":
        options = {"lam0": lam0, "boundary": boundary, **options}
    elif boundary is not None:
        raise ValueError(f"boundary applies to the exponential distribution only, not {name!r}")
    try:
        return FAMILIES[name](**options)
    except TypeError as e:
        raise ValueError(f"distribution {name!r}: {e}") from None
