"""A Linear layer stored and computed as a CSR sparse matrix: cost and memory scale with nnz.

A masked dense layer (:class:`~widthlab.nn.masked.MaskedLinear`) computes ``x (W ⊙ M)^T`` with a dense
matmul, so a member of a wide & sparse family at connectivity c costs as much as the dense wide model
(about 1/c times its dense base). :class:`CSRLinear` keeps only the nnz free weights, as a 1-D
parameter ``values`` in CSR order, and does all three products of a training step in O(nnz * batch):

    forward   y^T = W x^T          (CSR @ dense, MKL on CPU / cuSPARSE on CUDA)
    grad x    g_x^T = W^T g_y^T    (CSR @ dense with a transposed CSR structure built once)
    grad W    g_v[k] = g_y[:, i_k] . x[:, j_k]   (sampled matmul: only the nnz entries)

``use_sparse_path`` says when this is faster than the masked dense layer (measured by
``bench/bench_sparse.py``; see :data:`CSR_DENSITY_THRESHOLD`).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

# Below this density (nnz / (out * in)) CSR forward+backward beats the masked dense layer on CPU.
# Measured with `.venv/bin/python bench/bench_sparse.py --threads 1,2` (table 1: 4096x4096 Linear,
# batch 256, float32, grads for x and weights; output in bench/results/sparse-<host>.md) on a shared
# 2-vCPU Xeon (AVX-512, torch 2.13 + MKL): masked-dense costs the same at every density while CSR
# grows ~linearly with nnz, and the two crossed at 13-15% in five runs (1 and 2 threads, busy
# machine); 18-23% on a quieter machine. Near the crossover both paths
# cost the same, and CSR also saves memory (parameters and optimizer state are nnz-sized), so the
# measured median is used as is. A full training step favours CSR more (the masked path also runs
# the optimizer over all out * in weights; in the bench's 784-n-10 Adam step CSR still matched masked
# at 49% first-layer density and won 1.9x at 24%), so this is conservative.
CSR_DENSITY_THRESHOLD = 0.14


def use_sparse_path(density: float, device: torch.device | str = "cpu") -> bool:
    """Whether :class:`CSRLinear` should replace a masked dense Linear of this density.

    Only CPU has been measured; on other devices (CUDA: cuSPARSE vs cuBLAS have a different
    crossover) this returns False until a bench there says otherwise. CSRLinear itself runs on any
    device whose torch build supports CSR matmul and ``sampled_addmm``.
    """
    return torch.device(device).type == "cpu" and density < CSR_DENSITY_THRESHOLD


def _index_dtype(*sizes: int) -> torch.dtype:
    # MKL (LP64) and cuSPARSE take int32 indices natively (torch converts int64 ones at every MKL call);
    # int32 halves the index memory; speed was the same within noise (bench_sparse.py table 0).
    return torch.int32 if max(sizes, default=0) < 2**31 - 1 else torch.int64


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]):
    # Invariants were checked once when the structure was built; skip the O(nnz) check per call.
    return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


class _CSRLinearFunction(torch.autograd.Function):
    """y = x W^T + b for W in CSR; x is 2-D (B, in). See the module docstring for the three products."""

    @staticmethod
    def forward(ctx, x, values, bias, crow, col, t_crow, t_col, t_perm, out_features):
        in_features = x.shape[1]
        W = _csr(crow, col, values, (out_features, in_features))
        # (out, in) @ (in, B) -> (out, B). MKL's row-major CSR @ dense kernel is 2-10x faster than its
        # column-major one, which would write a contiguous y (B, out) directly (bench_sparse.py table 0).
        # We return the transposed view rather than copy: in the 784-5120-10 training step of the
        # bench, a contiguous copy here made the step ~20% slower (26 vs 21 ms, 1 thread), and a
        # following CSRLinear even gets its x^T contiguous for free.
        xT = x.T.contiguous()  # (in, B); free when x is the transposed output of another CSRLinear
        yT = torch.sparse.mm(W, xT) if bias is None else torch.addmm(bias.unsqueeze(1), W, xT)
        # Save x^T, not x: sampled_addmm wants exactly this layout, so backward copies nothing more.
        ctx.save_for_backward(xT, values, crow, col, t_crow, t_col, t_perm)
        ctx.has_bias = bias is not None
        return yT.T  # (B, out), a transposed view (see above)

    @staticmethod
    def backward(ctx, grad_y):  # grad_y: (B, out)
        xT, values, crow, col, t_crow, t_col, t_perm = ctx.saved_tensors
        in_features, out_features = xT.shape[0], grad_y.shape[1]
        gyT = grad_y.T.contiguous()  # (out, B), row-major as both sparse kernels want it
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            # W^T in CSR: the structure was transposed once; only the values are gathered here.
            Wt = _csr(t_crow, t_col, values[t_perm], (in_features, out_features))
            grad_x = torch.sparse.mm(Wt, gyT).T  # (in, out) @ (out, B) -> (in, B) -> (B, in)
        if ctx.needs_input_grad[1]:
            # dL/dW[i, j] = sum_b g_y[b, i] x[b, j], computed only at the nnz (i, j) of the structure.
            # torch's sampled_addmm is faster here than gather-multiply-sum over the nnz (measured).
            # Zeros, not `values`: the kernel computes beta * v + dot, and 0 * inf would be NaN.
            pattern = _csr(crow, col, torch.zeros_like(values), (out_features, in_features))
            grad_values = torch.sparse.sampled_addmm(pattern, gyT, xT.T, beta=0.0).values()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_y.sum(0)
        return grad_x, grad_values, grad_bias, None, None, None, None, None, None


class CSRLinear(nn.Module):
    """``y = x W^T + b`` with W stored in CSR: only the nnz free weights exist.

    Parameters are ``values`` (1-D, nnz, the free weights in row-major/CSR order) and optionally
    ``bias`` (out). The structure lives in buffers: ``crow_indices`` (out + 1) and ``col_indices``
    (nnz) of W, and ``t_crow_indices`` (in + 1), ``t_col_indices`` (nnz), ``t_perm`` (nnz) of W^T,
    where ``W^T``'s values are ``values[t_perm]``. All are in the state dict.

    ``values`` is a plain dense 1-D parameter, so every torch optimizer works unchanged, and its state
    (momentum, Adam moments) is nnz-sized: removed weights do not exist at all, so no gradient
    masking or re-zeroing is ever needed (unlike the masked layer), and the
    trajectory equals that of a masked layer whose masked gradients are zero. The structure is
    static; changing it means building a new layer (:meth:`from_dense`) and a new optimizer state.

    Build with :meth:`from_dense`; :meth:`to_dense` gives back the dense weight and mask.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        crow_indices: (out + 1,) CSR row pointers of W.
        col_indices: (nnz,) column of each value, increasing within a row.
        values: (nnz,) initial free weights.
        bias: (out,) initial bias, or None for no bias.
    """

    # Opt-in marker read by widthlab.models.counting: this layer's weight enters the count N.
    counted_weight = True

    def __init__(self, in_features: int, out_features: int, crow_indices: torch.Tensor,
                 col_indices: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        nnz = int(values.numel())
        if crow_indices.shape != (out_features + 1,) or col_indices.shape != (nnz,) or values.dim() != 1:
            raise ValueError(f"CSRLinear: inconsistent CSR shapes crow {tuple(crow_indices.shape)}, col "
                             f"{tuple(col_indices.shape)}, values {tuple(values.shape)} for "
                             f"out_features={out_features}")
        if bias is not None and bias.shape != (out_features,):
            raise ValueError(f"CSRLinear: bias shape {tuple(bias.shape)} != ({out_features},)")
        device = values.device
        idx = _index_dtype(in_features, out_features, nnz)
        crow = crow_indices.to(device=device, dtype=torch.int64)
        col = col_indices.to(device=device, dtype=torch.int64)
        # Validate once here so the per-call CSR constructions can skip the invariant check. torch
        # warns once per process that CSR support is "beta"; that is known and not the user's concern.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            torch.sparse_csr_tensor(crow, col, torch.empty(nnz, device=device), (out_features, in_features),
                                    check_invariants=True)
        # Transposed structure: sort the entries by (column, row); a stable sort keeps rows in order.
        row = torch.repeat_interleave(torch.arange(out_features, device=device), crow.diff())
        t_perm = torch.sort(col, stable=True).indices  # rows already ascending within equal columns
        t_crow = torch.zeros(in_features + 1, dtype=torch.int64, device=device)
        t_crow[1:] = torch.cumsum(torch.bincount(col, minlength=in_features), 0)
        self.values = nn.Parameter(values.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone().to(values)) if bias is not None else None
        self.register_buffer("crow_indices", crow.to(idx))
        self.register_buffer("col_indices", col.to(idx))
        self.register_buffer("t_crow_indices", t_crow.to(idx))
        self.register_buffer("t_col_indices", row[t_perm].to(idx))
        self.register_buffer("t_perm", t_perm)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None) -> CSRLinear:
        """Build from a dense (out, in) weight; ``mask`` (bool, same shape) picks the free weights.

        With ``mask=None`` the free weights are the nonzeros of ``weight``. With a mask, every True
        entry is kept, even where the weight is 0.0 (it is still trainable), and weights off the mask
        are dropped (the masked layer multiplies them by 0 anyway).
        """
        weight = weight.detach()
        if weight.dim() != 2:
            raise ValueError(f"CSRLinear.from_dense: weight must be 2-D (out, in), got {tuple(weight.shape)}")
        mask = weight != 0 if mask is None else mask.to(device=weight.device, dtype=torch.bool)
        if mask.shape != weight.shape:
            raise ValueError(f"CSRLinear.from_dense: mask shape {tuple(mask.shape)} != weight shape "
                             f"{tuple(weight.shape)}")
        out_features, in_features = weight.shape
        crow = torch.zeros(out_features + 1, dtype=torch.int64, device=weight.device)
        crow[1:] = torch.cumsum(mask.sum(1), 0)
        col = mask.nonzero()[:, 1]  # row-major order, i.e. CSR order
        return cls(in_features, out_features, crow, col, weight[mask], bias)

    @torch.no_grad()
    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight, mask)``: the dense (out, in) weight, exactly 0 off the mask, and the bool mask."""
        size = (self.out_features, self.in_features)
        weight = _csr(self.crow_indices, self.col_indices, self.values.detach(), size).to_dense()
        ones = torch.ones_like(self.values, dtype=torch.float32)
        mask = _csr(self.crow_indices, self.col_indices, ones, size).to_dense().bool()
        return weight, mask

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def density(self) -> float:
        """nnz / (out * in): the layer's connectivity c_l."""
        return self.nnz / max(1, self.out_features * self.in_features)

    def num_counted_weights(self) -> int:
        """N_l: the dense size out * in (the paper counts a sparse layer at its dense size)."""
        return self.out_features * self.in_features

    def num_nonzero_weights(self) -> int:
        """N_l - k_l: the free weights (nnz), even those that happen to be exactly 0.0."""
        return self.nnz

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (..., in) -> (B, in)
        if self.nnz == 0:  # the sparse kernels reject an empty matrix; the output is just the bias
            y = x2.new_zeros(x2.shape[0], self.out_features) + 0 * self.values.sum()
            y = y if self.bias is None else y + self.bias
        else:
            y = _CSRLinearFunction.apply(x2, self.values, self.bias, self.crow_indices, self.col_indices,
                                         self.t_crow_indices, self.t_col_indices, self.t_perm,
                                         self.out_features)
        return y.reshape(*lead, self.out_features)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint may hold another structure (another mask draw): adopt its nnz-sized tensors so
        # loading works into any CSRLinear of the same (out, in), e.g. one built from a fresh mask.
        for name in ("values", "col_indices", "t_col_indices", "t_perm"):
            new = state_dict.get(prefix + name)
            old = getattr(self, name)
            if new is not None and new.shape != old.shape:
                if name == "values":
                    self.values.data = torch.empty_like(new, device=old.device, dtype=old.dtype)
                else:
                    setattr(self, name, torch.empty_like(new, device=old.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, nnz={self.nnz}, density={self.density:.4g}")
