"""How many weights each layer loses: the cap rule and the MLP split (Golubeva et al. 2021, App. B; §2.3).

A family member at width w must hold exactly N(w0) weights, so exactly T = N(w) - N(w0) counted
weights are removed (§3.1). The paper says removals are "proportional to layer size"; the official
code actually caps every layer at one size c* and sparsifies only the layers above it (§3.2):

1. sort the counted layers by size, N_(1) >= ... >= N_(L) (stable: ties keep module order);
2. D_j = N_(j) - N_(j+1) and Lambda_k = sum_{j<=k} j D_j, the removals that bring the k largest
   layers down to N_(k+1);
3. m = the smallest k with Lambda_k >= T (an error when T > Lambda_{L-1});
4. layer j <= m gets N_(j) - N_(m), then each of the m layers gets floor(R/m) more and the largest
   also R mod m, with R = T - Lambda_{m-1}.

So remaining_l = min(N_l, c*) with c* = N_(m) - floor(R/m), except that the largest layer holds
R mod m fewer. The MLP of Fig. 5/8 instead fixes the classifier's removals and gives the rest to the
hidden layer (§2.3).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


class BudgetError(ValueError):
    """T weights cannot be removed under the allocation rule (the message gives the numbers)."""


@dataclass(frozen=True)
class Allocation:
    """Removals per counted layer, in the order the sizes were given.

    Attributes:
        sizes: N_l per layer name (dense weight counts).
        removals: k_l per layer name; sum equals ``T``.
        T: total removals, N(w) - N(w0).
        cap: c*, the size every sparsified layer is brought down to (the largest layer may hold
            up to m - 1 fewer); the largest layer's size when nothing is removed.
        m: number of sparsified layers (k_l > 0 for exactly these, unless T = 0).
    """

    sizes: dict[str, int]
    removals: dict[str, int]
    T: int
    cap: int
    m: int

    @property
    def remaining(self) -> dict[str, int]:
        """N_l - k_l per layer."""
        return {n: self.sizes[n] - self.removals[n] for n in self.sizes}

    @property
    def layer_connectivity(self) -> dict[str, float]:
        """c_l = 1 - k_l / N_l per layer."""
        return {n: 1.0 - self.removals[n] / self.sizes[n] for n in self.sizes}

    @property
    def connectivity(self) -> float:
        """c = (N - T) / N over all counted layers."""
        total = sum(self.sizes.values())
        return (total - self.T) / total

    @property
    def sparsified(self) -> list[str]:
        """Names of the layers that lose weights, in size order (largest first)."""
        return [n for n in _by_size(self.sizes) if self.removals[n] > 0]


def _by_size(sizes: Mapping[str, int]) -> list[str]:
    # sorted() is stable: equal sizes keep their module order, as the paper's rule (App. B) requires.
    return sorted(sizes, key=lambda n: -sizes[n])


def lambdas(sorted_sizes: list[int]) -> list[int]:
    """Lambda_k for k = 1..L-1 (index k-1): removals needed to bring the k largest layers to N_(k+1)."""
    out, acc = [], 0
    for k in range(1, len(sorted_sizes)):
        acc += k * (sorted_sizes[k - 1] - sorted_sizes[k])
        out.append(acc)
    return out


def cap_allocation(sizes: Mapping[str, int], T: int, *, all_layers: bool = False) -> Allocation:
    """Allocate T removals by the cap rule of Golubeva et al. 2021, App. B

    Args:
        sizes: N_l per layer name, in module order (the order breaks ties).
        T: removals, N(w) - N(w0) >= 0.
        all_layers: also allow T > Lambda_{L-1} by bringing *every* layer down to one cap (m = L),
            as long as each keeps at least one weight. The paper's rule (and the official code) stops
            at L - 1 layers and raises instead; the default keeps that.

    Raises:
        BudgetError: T < 0, T > Lambda_{L-1} (without ``all_layers``), or T removes every weight.
    """
    sizes = {n: int(s) for n, s in sizes.items()}
    T = int(T)
    if T < 0:
        raise BudgetError(f"T = {T} < 0: the member has fewer weights than its base")
    if not sizes:
        raise BudgetError("no counted layers to remove weights from")
    order = _by_size(sizes)
    s = [sizes[n] for n in order]
    L = len(s)
    removals = dict.fromkeys(sizes, 0)
    if T == 0:
        return Allocation(sizes, removals, 0, s[0], 0)
    lam = lambdas(s)
    m = next((k for k, lam_k in enumerate(lam, start=1) if lam_k >= T), None)
    if m is None:
        top = lam[-1] if lam else 0
        if not all_layers:
            raise BudgetError(
                f"cannot remove T = {T:,} weights by the cap rule: bringing the {L - 1} largest of "
                f"{L} layers down to the smallest ({s[-1]:,} weights) removes only Lambda_{L - 1} = "
                f"{top:,}; use a smaller width, or fix the classifier's removals (fract_cl / "
                f"classifier_connectivity, Golubeva et al. 2021, §2.3)")
        m = L
        if sum(s) - L < T:
            raise BudgetError(f"cannot remove T = {T:,} of {sum(s):,} weights and keep one per layer")
    lam_prev = lam[m - 2] if m >= 2 else 0  # Lambda_{m-1}
    R = T - lam_prev
    base = s[m - 1]
    for j in range(m):
        removals[order[j]] = s[j] - base + R // m
    removals[order[0]] += R % m
    cap = base - R // m
    if sizes[order[0]] - removals[order[0]] < 1 or cap < 1:
        raise BudgetError(f"cannot remove T = {T:,} weights: the largest layer would keep none")
    assert sum(removals.values()) == T
    return Allocation(sizes, removals, T, cap, m)


def fixed_allocation(sizes: Mapping[str, int], T: int, fixed: Mapping[str, int], *,
                     all_layers: bool = True) -> Allocation:
    """Fix the removals of some layers and allocate the rest of T to the others by the cap rule.

    Used for the MLP split (§2.3): fixing the classifier's k leaves T - k_cl to the hidden layer(s).
    With one free layer the cap rule has no smaller layer to stop at, hence ``all_layers=True``.

    Raises:
        BudgetError: a fixed k is negative or removes a whole layer, the fixed ks exceed T, or the
            rest cannot be allocated.
    """
    for n, k in fixed.items():
        if n not in sizes:
            raise BudgetError(f"layer {n!r} is not a counted layer")
        if not 0 <= k < sizes[n]:
            raise BudgetError(f"layer {n!r}: {k:,} removals out of {sizes[n]:,} weights")
    rest_T = T - sum(fixed.values())
    if rest_T < 0:
        raise BudgetError(f"fixed removals {sum(fixed.values()):,} exceed T = {T:,}")
    free = {n: s for n, s in sizes.items() if n not in fixed}
    if not free:
        if rest_T:
            raise BudgetError(f"{rest_T:,} removals left but every layer is fixed")
        m = sum(1 for k in fixed.values() if k)
        return Allocation(dict(sizes), dict(fixed), T, max(sizes.values()), m)
    sub = cap_allocation(free, rest_T, all_layers=all_layers)
    removals = {n: (fixed[n] if n in fixed else sub.removals[n]) for n in sizes}
    m = sum(1 for k in removals.values() if k)
    return Allocation({n: int(s) for n, s in sizes.items()}, removals, int(T), sub.cap, m)


def mlp_split(n: int, n0: int, *, d: int = 784, C: int = 10, fract_cl: float = 0.0) -> tuple[int, int]:
    """Removals (k_fc, k_cl) of the one-hidden-layer MLP d -> n -> C at base width n0 (Golubeva et al. 2021,
    §2.3).

    The classifier loses k_cl = min(T, floor(C n fract_cl)) and the hidden layer the rest,
    T = (n - n0)(d + C). With ``fract_cl=0`` the classifier stays dense and fc keeps
    d n0 + C n0 - C n weights (6352 - 10n on MNIST with n0 = 8).

    Raises:
        BudgetError: n < n0, or fc would lose all of its d n weights (the official limit is d n - 1).
    """
    if n < n0:
        raise BudgetError(f"width {n} < base width {n0}")
    if not 0.0 <= fract_cl <= 1.0:
        raise BudgetError(f"fract_cl must be in [0, 1], got {fract_cl}")
    T = (n - n0) * (d + C)
    k_cl = min(T, int(C * n * fract_cl))
    k_fc = T - k_cl
    if k_fc > d * n - 1:
        raise BudgetError(f"width {n}: fc would lose {k_fc:,} of its {d * n:,} weights (at most "
                          f"{d * n - 1:,}); raise fract_cl or lower the width")
    return k_fc, k_cl


def mlp_split_grid(n: int, n0: int, *, d: int = 784, C: int = 10, fract_cl: float = 0.9,
                   steps: int = 5) -> list[tuple[int, int]]:
    """The official sweep of classifier removals at one width: k_cl in 0..M by floor(M/steps).

    M = min(T, floor(C n fract_cl)); Fig. 5 uses it to sweep the last layer's connectivity from 1.0
    down to about 0.1 (Golubeva et al. 2021, §2.3). Pairs whose fc would lose every weight are dropped.
    """
    T = (n - n0) * (d + C)
    M = min(T, int(C * n * fract_cl))
    step = max(1, M // steps)
    out = []
    for k_cl in range(0, M + 1, step):
        if T - k_cl <= d * n - 1:
            out.append((T - k_cl, k_cl))
    return out
