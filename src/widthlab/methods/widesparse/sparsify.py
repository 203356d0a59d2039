"""Turn chosen Linear/Conv2d layers of any model into masked (or CSR) layers, in place (Golubeva et al. 2021,
§2.3).

:func:`sparsify` is the library entry point: it takes a model (one built by widthlab or a user's own
``nn.Module``) and the number of weights k_l to remove from each named layer, draws the exact-k
masks (:mod:`.masks`), re-initialises each sparsified layer with the fan-in correction of the official
code, and swaps in :class:`~widthlab.nn.masked.MaskedLinear` / ``MaskedConv2d`` / ``MaskedNTKLinear``.
The replacements share the original parameter objects, so the model's parameter names and counts are
unchanged.

Sparse execution: ``sparse_impl="csr"`` (or ``"auto"`` where the measured threshold says it pays)
stores a plain sparsified Linear as ``widthlab.nn.sparse_linear.CSRLinear``, which keeps only the
N_l - k_l free values. That module is optional: without it ``"auto"`` means ``"masked"``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from widthlab.methods.widesparse.masks import INIT_STREAM, MASK_STREAM, layer_generator, random_mask
from widthlab.nn.masked import MaskedLinear, MaskedMixin, to_masked
from widthlab.nn.ntk import NTKLinear

Init = Literal["fan_in_corrected", "rescale", "none"]
SparseImpl = Literal["auto", "masked", "csr"]
INITS = ("fan_in_corrected", "rescale", "none")
INIT_LAWS = ("default", "kaiming_normal_fan_out", "kaiming_normal_fan_in")
SPARSE_IMPLS = ("auto", "masked", "csr")
_CSR_MODULE = "widthlab.nn.sparse_linear"
# "auto" also needs the layer to be this large: below it the sparse kernels' per-call overhead loses
# to one small dense matmul. Measured on CPU, 1 thread, batch 100-128, c = 0.01-0.05 (masked vs CSR
# forward+backward): 64x128 0.29 vs 0.45 ms, 64x512 0.57 vs 0.63 ms, 784x160 2.1 vs 0.9 ms,
# 784x640 7.9 vs 1.6 ms.
CSR_MIN_WEIGHTS = 65_536


@dataclass(frozen=True)
class LayerSparsity:
    """What :func:`sparsify` did to one layer.

    Attributes:
        N: dense weight count N_l.
        k: weights removed (with ``io_only`` a multiple of the kernel area, so it may differ from the
            requested k by up to half a kernel).
        impl: ``"dense"`` (k = 0, left alone), ``"masked"`` or ``"csr"``.
    """

    N: int
    k: int
    impl: str

    @property
    def connectivity(self) -> float:
        """c_l = 1 - k / N."""
        return 1.0 - self.k / self.N


@dataclass(frozen=True)
class SparsifyResult:
    """Per-layer outcome of :func:`sparsify`, keyed by qualified layer name (module order)."""

    layers: dict[str, LayerSparsity]

    @property
    def removed(self) -> int:
        """Sum of k_l actually removed."""
        return sum(s.k for s in self.layers.values())

    @property
    def impl(self) -> str:
        """``"masked"``, ``"csr"``, ``"mixed"``, or ``"dense"`` when nothing was sparsified."""
        kinds = {s.impl for s in self.layers.values() if s.impl != "dense"}
        return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "dense")


def csr_available() -> bool:
    """Whether the optional CSR layer module is installed in this tree."""
    return importlib.util.find_spec(_CSR_MODULE) is not None


def sparsify(model: nn.Module, removals: Mapping[str, int], *, seed: int, io_only: bool = False,
             init: Init = "fan_in_corrected", sparse_impl: SparseImpl = "masked",
             device: str | torch.device | None = None) -> SparsifyResult:
    """Remove k_l random weights from each named layer of ``model``, replacing the layers in place.

    Args:
        model: any ``nn.Module``; the named layers must be ``nn.Linear``, ``nn.Conv2d`` or
            ``NTKLinear`` (exact types) or already masked layers (their masks are redrawn).
        removals: k_l per qualified layer name (as in ``model.named_modules()``); k = 0 leaves the layer
            dense and untouched.
        seed: mask and init seed; each layer draws from its own generator seeded by (seed, name),
            so the same seed gives the same masks and weights.
        io_only: remove whole kernels, drawing over (out, in) channel pairs (Golubeva et al. 2021, §2.3
            variant).
        init: ``"fan_in_corrected"`` re-draws each sparsified layer's weight from the law the model
            draws it from (:func:`init_law`), with the dense variance divided by c_l: PyTorch's
            default gives U(+-1/sqrt(fan_in c_l)) for weight and bias (paper App. A), a Kaiming-normal
            model N(0, 2 / (fan c_l)) (NTK layers: N(0, 1/c_l) or U(+-1/sqrt(c_l)) by their
            ``init``); ``"rescale"`` multiplies the existing weight by 1/sqrt(c_l), keeping the model's
            own init family (e.g. Kaiming) with the same variance correction; ``"none"`` only masks.
        sparse_impl: ``"masked"``; ``"csr"`` stores plain sparsified Linears as CSR (error without
            the CSR module); ``"auto"`` uses CSR for plain Linears of at least
            :data:`CSR_MIN_WEIGHTS` weights where ``use_sparse_path(c_l, device)`` says so.
        device: the device training will run on, for ``"auto"`` (default: CUDA if available).

    Returns:
        the per-layer record; the model itself is modified in place.

    Raises:
        ValueError: unknown layer name, the root module named, k out of range, bad option.
        TypeError: a named layer of an unsupported type.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}; got {init!r}")
    if sparse_impl not in SPARSE_IMPLS:
        raise ValueError(f"sparse_impl must be one of {', '.join(SPARSE_IMPLS)}; got {sparse_impl!r}")
    csr = _load_csr(sparse_impl)
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    modules = dict(model.named_modules())
    for name in removals:
        if name == "":
            raise ValueError("cannot replace the root module in place; wrap the layer in a container")
        if name not in modules:
            raise ValueError(f"no layer named {name!r} in {type(model).__name__}")
    out: dict[str, LayerSparsity] = {}
    for name, k in removals.items():
        layer = modules[name]
        N = int(layer.weight.numel())
        k = int(k)
        if not 0 <= k < N:
            raise ValueError(f"layer {name!r}: cannot remove {k:,} of its {N:,} weights "
                             f"(keep at least one)")
        if k == 0 and not isinstance(layer, MaskedMixin):
            out[name] = LayerSparsity(N, 0, "dense")
            continue
        shape = tuple(layer.weight.shape)
        mask = random_mask(shape, k, generator=layer_generator(seed, name, MASK_STREAM), io_only=io_only)
        k_actual = N - int(mask.sum())
        c = 1.0 - k_actual / N
        reinit_(layer, c, mode=init, generator=layer_generator(seed, name, INIT_STREAM),
                law=init_law(model, layer))
        new = to_masked(layer, mask)
        impl = "masked"
        if csr is not None and type(new) is MaskedLinear and \
                (sparse_impl == "csr" or (N >= CSR_MIN_WEIGHTS and csr.use_sparse_path(c, dev))):
            bias = None if new.bias is None else new.bias.detach()
            new = csr.CSRLinear.from_dense(new.weight.detach(), new.weight_mask, bias)
            impl = "csr"
        model.set_submodule(name, new)
        out[name] = LayerSparsity(N, k_actual, impl)
    return SparsifyResult(out)


def _load_csr(sparse_impl: str):
    """The CSR module when it is wanted and present; None for ``masked`` or when it is absent."""
    if sparse_impl == "masked":
        return None
    if not csr_available():
        if sparse_impl == "csr":
            raise ValueError(f"sparse_impl='csr' needs {_CSR_MODULE}, which is not installed")
        return None  # "auto" without the CSR module is "masked"
    return importlib.import_module(_CSR_MODULE)


def init_law(model: nn.Module, layer: nn.Module) -> str:
    """The law ``model`` initialises ``layer``'s weight with, one of :data:`INIT_LAWS`: the model's
    own ``init_law(layer)`` where it declares one (widthlab ResNets), else ``"default"``."""
    declared = getattr(model, "init_law", None)
    law = declared(layer) if callable(declared) else "default"
    if law not in INIT_LAWS:
        raise ValueError(f"{type(model).__name__}.init_law gave {law!r}; known: {', '.join(INIT_LAWS)}")
    return law


@torch.no_grad()
def reinit_(layer: nn.Module, c: float, *, mode: Init = "fan_in_corrected",
            generator: torch.Generator | None = None, law: str = "default") -> None:
    """Re-initialise a layer about to keep a fraction ``c`` of its weights (paper App. A).

    ``fan_in_corrected``: the dense layer's law with the effective fan-in fan_in c_l in place of
    fan_in, i.e. its variance divided by c_l, so that pre-activations keep the dense variance once
    the masked entries are zeroed. For ``law="default"`` (PyTorch's U(+-1/sqrt(fan_in))) the bound
    becomes 1/sqrt(fan_in c_l), for the whole weight and the bias (the official code's rule): free
    weights have std 1/sqrt(3 fan_in c_l). For ``"kaiming_normal_fan_out"`` / ``"kaiming_normal_fan_in"``
    the weight is drawn from N(0, 2 / (fan c_l)) with fan = k^2 C_out or fan_in; the bias (if any) keeps
    its dense draw, as the Kaiming-initialised dense model keeps it.
    NTK layers (paper App. A, the Fig. 8 MLP) carry the 1/sqrt(fan_in) in their forward; their O(1)
    weights get variance 1/c_l instead (N(0, 1/c_l), or U(+-1/sqrt(c_l)) as the official code draws),
    bias untouched.

    Args:
        layer: a Linear/Conv2d/NTKLinear (or masked) layer.
        c: c_l in (0, 1].
        mode: see :func:`sparsify`.
        generator: CPU generator for the draws (None: torch's global one).
    """
    if mode == "none" or c >= 1.0:
        return
    if not 0.0 < c <= 1.0:
        raise ValueError(f"connectivity must be in (0, 1], got {c}")
    W = layer.weight
    if W.device.type == "meta":
        return
    if mode == "rescale":
        W.mul_(1.0 / math.sqrt(c))
        return
    if isinstance(layer, NTKLinear):
        if layer.init == "normal":
            W.copy_(torch.randn(W.shape, generator=generator) / math.sqrt(c))
        else:
            b = 1.0 / math.sqrt(c)
            W.copy_(torch.empty(W.shape).uniform_(-b, b, generator=generator))
        return
    fan_in = W[0].numel()  # in_features, or (in_channels / groups) * kh * kw
    if law not in INIT_LAWS:
        raise ValueError(f"law must be one of {', '.join(INIT_LAWS)}; got {law!r}")
    if law != "default":
        fan = W.shape[0] * W[0, 0].numel() if law == "kaiming_normal_fan_out" else fan_in  # k^2 C_out
        W.copy_(torch.randn(W.shape, generator=generator) * math.sqrt(2.0 / (fan * c)))
        return
    b = 1.0 / math.sqrt(fan_in * c)
    W.copy_(torch.empty(W.shape).uniform_(-b, b, generator=generator))
    if getattr(layer, "bias", None) is not None:
        layer.bias.copy_(torch.empty(layer.bias.shape).uniform_(-b, b, generator=generator))
