"""One call that gathers the Theorem 1 distance and its approximations (``widthlab kernel``).

The command line prints the returned dict as JSON; it holds only plain floats, ints and strings.
"""

from __future__ import annotations

import time

from torch import Tensor

from widthlab.theory.approximations import eq4_distance, p_star, variance_only_distance
from widthlab.theory.distance import network_distance_mc, theorem1_distance
from widthlab.theory.pairs import sample_pairs
from widthlab.theory.sparse_kernel import DEFAULT_MASKS

APPROX_NOTE = (
    "approx_* and p_star are approximations for Gaussian inputs with dp >> 1; the bias term of eq. (4), "
    "hence p_star, is not confirmed by Theorem 1 (our numerical checks). D is exact up to the Monte-Carlo "
    "error D_se (masks, pairs fixed); D_pairs_se is its error as an estimate of the mean over random "
    "input pairs."
)


def kernel_distance_summary(
    d: int | None,
    width: int,
    connectivity: float,
    pairs: int = 30,
    masks: int = DEFAULT_MASKS,
    seed: int = 0,
    inputs: Tensor | None = None,
    networks: int = 0,
) -> dict:
    """Theorem 1 distance D on sampled pairs, its two terms, SEs, and the approximations.

    Args:
        d: input dimension (Gaussian inputs); with ``inputs`` it may be None, else it must match.
        width: n.
        connectivity: p in (0, 1].
        pairs: number of input pairs P (``pairs.sample_pairs``: Gaussian, or i != j from ``inputs``).
        masks: masks for the Monte-Carlo estimate of K~_{l,p}.
        seed: seed of the pair, mask and network streams (independent of each other).
        inputs: real inputs (N, ...) or None for x, y ~ N(0, I_d).
        networks: if > 0, also estimate D by sampling this many whole networks (independent check).

    Returns:
        Dict with keys d, width, connectivity, pairs, masks, seed, inputs, D, D_se, D_pairs_se, bias_sq,
        bias_sq_se, variance_term, variance_term_se, approx_eq4, approx_variance_only, p_star,
        n_star, approx_note, seconds, and D_network, D_network_se, networks when requested.
    """
    t0 = time.perf_counter()
    x, y = sample_pairs(pairs, d=d, inputs=inputs, seed=seed)
    d = x.shape[1]
    res = theorem1_distance(x, y, width, connectivity, num_masks=masks, seed=seed)
    budget = width * connectivity  # N = n p
    out = {
        "d": d,
        "width": int(width),
        "connectivity": float(connectivity),
        "pairs": int(pairs),
        "masks": res.num_masks,
        "seed": int(seed),
        "inputs": "gaussian" if inputs is None else f"given ({len(inputs)} examples)",
        "D": res.D,
        "D_se": res.D_se,
        "D_pairs_se": res.pairs_se,
        "bias_sq": res.bias_sq,
        "bias_sq_se": res.bias_sq_se,
        "variance_term": res.variance_term,
        "variance_term_se": res.variance_term_se,
        "approx_eq4": float(eq4_distance(d, width, connectivity)),
        "approx_variance_only": float(variance_only_distance(d, width, connectivity)),
        "p_star": float(p_star(d, budget)),
        "n_star": float(budget / p_star(d, budget)),
        "approx_note": APPROX_NOTE,
    }
    if networks:
        net = network_distance_mc(x, y, width, connectivity, num_networks=networks, seed=seed)
        out.update(D_network=net.D, D_network_se=net.D_se, networks=net.num_networks)
    out["seconds"] = time.perf_counter() - t0
    return out


def format_kernel_summary(out: dict) -> str:
    """The text ``widthlab kernel`` prints for a :func:`kernel_distance_summary` result: D with its
    terms, the approximations, and the network Monte-Carlo check when it was requested."""
    lines = [
        f"D = {out['D']:.4g} +- {out['D_se']:.2g}  (bias^2 {out['bias_sq']:.3g}, variance/n "
        f"{out['variance_term']:.3g})  d={out['d']} n={out['width']} p={out['connectivity']}",
        f"approximations: eq. 4 {out['approx_eq4']:.4g}, variance-only {out['approx_variance_only']:.4g}; "
        f"p* (eq. 4) = {out['p_star']:.4g}",
    ]
    if "D_network" in out:
        z = (out["D_network"] - out["D"]) / max(1e-300, (out["D_se"] ** 2 + out["D_network_se"] ** 2) ** 0.5)
        lines.append(f"network check: D = {out['D_network']:.4g} +- {out['D_network_se']:.2g} from "
                     f"{out['networks']} sampled networks ({z:+.1f} standard errors from Theorem 1)")
    return "\n".join(lines)
