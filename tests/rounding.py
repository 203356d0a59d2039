"""Agreement up to floating-point rounding, for results that are equal in exact arithmetic but are
computed with other shapes or other kernels.

Why not `torch.equal`: a layer grown by a unit with zero outgoing weights computes each consumer
pre-activation as a sum of K + 1 terms instead of K; the extra term is an exact zero, but BLAS may block
a length-13 inner product differently from a length-12 one, and which blocking it picks depends on the
CPU's instruction set (AVX-512, AVX2, SSE4.2). The same holds for a closed form against autograd, or
K-FAC against an explicit Kronecker product: one mathematical value, two summation orders.

The bound: a K-term floating-point sum s = sum_k a_k b_k, evaluated in any order, lies within
gamma_K * sum_k |a_k b_k| of the exact value, gamma_K = K u / (1 - K u) with unit roundoff u = eps / 2
(Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., eq. 3.5). Two evaluations in two
orders therefore differ by at most 2 gamma_K * sum |a_k b_k| ~= K * eps * magnitude, where `magnitude`
bounds sum |a_k b_k|. A computation made of several such steps adds the bounds of its steps (each later
step is 1-Lipschitz or scales them by a known factor), so `terms` is the sum of the summation lengths
along the longest chain. The bound is the worst case, far above the one or two ulps usually seen, yet
orders of magnitude below any defect these tests guard against (a unit that changes the function moves
outputs by O(weights)).

Where equality is really bitwise (the same shapes on the same kernels: a resumed run, masked weights
that stay exactly zero, a prefix of an importance vector) tests keep `torch.equal`.
"""

from __future__ import annotations

import torch


def rounding_tolerance(dtype: torch.dtype, *, terms: int, magnitude: float) -> float:
    """The largest difference two summation orders can produce: ``terms * eps(dtype) * magnitude``."""
    if terms < 1:
        raise ValueError(f"terms must be >= 1, got {terms}")
    return terms * torch.finfo(dtype).eps * float(magnitude)


def assert_equal_up_to_rounding(actual: torch.Tensor, expected: torch.Tensor, *, terms: int,
                                magnitude: float | None = None) -> None:
    """Assert ``|actual - expected| <= terms * eps * magnitude`` entry-wise (see the module docstring).

    `magnitude` bounds the sums of absolute products that produced the values; by default the largest
    ``|expected|`` entry, which is right when nothing cancels (pass a larger one where terms cancel).
    """
    assert actual.shape == expected.shape, f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtypes differ: {actual.dtype} vs {expected.dtype}"
    if magnitude is None:
        magnitude = float(expected.detach().abs().max()) if expected.numel() else 0.0
    # Never below the smallest normal number: a bound of exactly zero would demand bitwise equality.
    tol = max(rounding_tolerance(expected.dtype, terms=terms, magnitude=magnitude),
              torch.finfo(expected.dtype).tiny)
    diff = float((actual.detach() - expected.detach()).abs().max()) if actual.numel() else 0.0
    assert diff <= tol, (f"differ by {diff:.3e}, more than rounding allows: {terms} terms x eps "
                         f"{torch.finfo(expected.dtype).eps:.1e} x magnitude {magnitude:.3e} = {tol:.3e}")


def forward_magnitude(model: torch.nn.Module, *inputs: torch.Tensor) -> float:
    """A `magnitude` for `assert_equal_up_to_rounding` on a model's outputs: the largest sum of
    absolute products ``(|W| |x| + |b|)`` any Linear/Conv layer forms on these inputs, times the largest
    gain ``|gamma| / sqrt(var + eps)`` of each BatchNorm (running variance in eval mode, the batch's in
    training mode), which is how far a per-unit norm can amplify an earlier rounding error.

    Runs one extra forward with hooks; the model's state (BatchNorm running statistics included) is
    restored afterwards.
    """
    import torch.nn.functional as F
    from torch import nn

    sums: list[float] = []
    gain = 1.0
    hooks = []

    def on_linear(mod, args, out):
        x = args[0].detach().abs()
        w, b = mod.weight.detach().abs(), None if mod.bias is None else mod.bias.detach().abs()
        if isinstance(mod, nn.Linear):
            s = F.linear(x, w, b)
        else:
            s = mod._conv_forward(x, w, b)
        sums.append(float(s.max()))

    def on_norm(mod, args, out):
        nonlocal gain
        x = args[0].detach()
        if mod.training or not mod.track_running_stats:
            dims = [d for d in range(x.dim()) if d != 1]
            var = x.var(dims, unbiased=False)
        else:
            var = mod.running_var
        g = mod.weight.detach().abs() if mod.affine else torch.ones_like(var)
        gain *= max(1.0, float((g / torch.sqrt(var + mod.eps)).max()))

    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            hooks.append(m.register_forward_hook(on_linear))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            hooks.append(m.register_forward_hook(on_norm))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
        model.load_state_dict(state)
    return max(sums, default=0.0) * gain
