"""Multilayer perceptron of any depth and widths, standard or NTK parametrisation.

Reads top to bottom: config -> model -> builder + presets. The wide & sparse MNIST network is
``mlp(width=n)`` on ``(1, 28, 28)`` inputs: 784 -> n -> 10 with ReLU, ``794 n`` counted weights
(Golubeva et al. 2021, §2 and App. A); its NTK-style variant (App. A, Fig. 8) is ``parametrization="ntk"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from itertools import pairwise

import torch
from torch import nn

from widthlab.models._registry import MODELS, check_bool, check_choice, check_int
from widthlab.nn.ntk import NTKLinear
from widthlab.nn.resize import WidthSite

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,  # negative slope 0.01, PyTorch's default
    "gelu": nn.GELU,
    "identity": nn.Identity,
    "linear": nn.Identity,  # the wide & sparse paper's name for the identity "activation"
}
PARAMETRIZATIONS = ("standard", "ntk")


@dataclass(frozen=True)
class MLPConfig:
    """Construction-time shape of an :class:`MLP` (after width surgery, ask ``MLP.widths()``).

    Attributes:
        in_features: flattened input size d = prod(input_shape).
        out_features: number of outputs C.
        widths: hidden widths n_1..n_L, input side first; empty gives a linear model.
        activation: a key of :data:`ACTIVATIONS`, applied after every hidden Linear.
        bias: whether every Linear has a bias (never counted as a weight).
        batch_norm: BatchNorm1d after each hidden activation, where the paper's code puts it.
        parametrization: ``"standard"`` (PyTorch's default init) or ``"ntk"`` (:class:`NTKLinear`
            everywhere, the output layer included).
        ntk_init: weight distribution under NTK: ``"normal"`` N(0,1) (paper) or ``"uniform"``
            U(-1,1) (official code; Golubeva et al. 2021, App. A, Fig. 8 MLPs).
    """

    in_features: int
    out_features: int
    widths: tuple[int, ...] = (512,)
    activation: str = "relu"
    bias: bool = True
    batch_norm: bool = False
    parametrization: str = "standard"
    ntk_init: str = "normal"

    def __post_init__(self):
        check_int("in_features", self.in_features)
        check_int("out_features", self.out_features)
        if isinstance(self.widths, (str, bytes)) or not isinstance(self.widths, Sequence):
            raise ValueError(f"option 'widths' must be a list of ints, got {self.widths!r}")
        # Frozen: normalise a YAML list to a tuple so the config stays hashable.
        object.__setattr__(self, "widths",
                           tuple(check_int(f"widths[{i}]", n) for i, n in enumerate(self.widths)))
        check_choice("activation", self.activation, tuple(ACTIVATIONS))
        check_bool("bias", self.bias)
        check_bool("batch_norm", self.batch_norm)
        check_choice("parametrization", self.parametrization, PARAMETRIZATIONS)
        check_choice("ntk_init", self.ntk_init, ("normal", "uniform"))


class MLP(nn.Module):
    """``x -> flatten -> [Linear -> act (-> BatchNorm1d)] * L -> Linear``.

    Module names: ``layers.{i}`` for the Linear layers (``layers.{L}`` is the output layer),
    ``norms.{i}`` for the BatchNorm1d of hidden layer i, ``act`` for the shared activation. Layers live
    in ModuleLists so that width surgery can swap them and depth growth can insert new ones.
    """

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        dims = (config.in_features, *config.widths, config.out_features)
        if config.parametrization == "ntk":
            linear = partial(NTKLinear, init=config.ntk_init)
        else:
            linear = nn.Linear
        self.layers = nn.ModuleList(linear(a, b, bias=config.bias) for a, b in pairwise(dims))
        self.norms = nn.ModuleList(nn.BatchNorm1d(n) for n in config.widths) if config.batch_norm \
            else nn.ModuleList()
        self.act = ACTIVATIONS[config.activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)  # (B, *input_shape) -> (B, d)
        layers = list(self.layers)  # slicing a ModuleList builds a new Module (~70 us on the bench net)
        norms = list(self.norms)
        for i, layer in enumerate(layers[:-1]):
            x = self.act(layer(x))  # (B, n_i)
            if norms:
                x = norms[i](x)
        return layers[-1](x)  # (B, C)

    def width_sites(self) -> list[WidthSite]:
        """One site per hidden layer i: ``layers.i`` rows -> (``norms.i``) -> ``layers.{i+1}`` columns.

        Built from the current modules at each call, so it stays valid after surgery swaps layers.
        """
        sites = []
        for i in range(len(self.layers) - 1):
            has_norm = len(self.norms) > i
            sites.append(WidthSite(
                name=f"hidden.{i}",
                producer=self.layers[i],
                consumer=self.layers[i + 1],
                norms=(self.norms[i],) if has_norm else (),
                producer_name=f"layers.{i}",
                consumer_name=f"layers.{i + 1}",
                norm_names=(f"norms.{i}",) if has_norm else (),
            ))
        return sites

    def widths(self) -> dict[str, int]:
        """Current hidden widths ``{"hidden.0": n_1, ...}``, read from the live weight shapes."""
        return {s.name: s.width for s in self.width_sites()}


@MODELS.register("mlp")
def mlp(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    width: int | None = None,
    widths: Sequence[int] | None = None,
    depth: int | None = None,
    activation: str = "relu",
    bias: bool = True,
    batch_norm: bool = False,
    parametrization: str = "standard",
    ntk_init: str = "normal",
) -> MLP:
    """Build an :class:`MLP` on flattened inputs.

    Args:
        input_shape: shape of one input; the MLP sees ``prod(input_shape)`` features.
        num_outputs: number of outputs.
        width: hidden width of each of ``depth`` equal hidden layers.
        widths: explicit hidden widths, input side first (instead of ``width``/``depth``).
        depth: number of hidden layers when ``width`` is given (default 1).
        activation, bias, batch_norm, parametrization, ntk_init: see :class:`MLPConfig`.

    Raises:
        ValueError: neither or both of ``width`` and ``widths``, ``depth`` without ``width``, or an
            invalid value.
    """
    if width is not None and widths is not None:
        raise ValueError("give either option 'width' or option 'widths', not both")
    if width is None and widths is None:
        raise ValueError("option 'width' (or 'widths') is required")
    if width is not None:
        n = check_int("width", width)
        widths = (n,) * check_int("depth", 1 if depth is None else depth)
    elif depth is not None:
        raise ValueError("option 'depth' only applies with option 'width'; 'widths' sets the depth")
    config = MLPConfig(
        in_features=math.prod(input_shape),
        out_features=num_outputs,
        widths=widths,
        activation=activation,
        bias=bias,
        batch_norm=batch_norm,
        parametrization=parametrization,
        ntk_init=ntk_init,
    )
    return MLP(config)


# -- presets: names encode width (w) and depth (d) --

def mlp_w512_d3(input_shape: tuple[int, ...] = (1, 28, 28), num_outputs: int = 10) -> MLP:
    """Three ReLU hidden layers of 512 units."""
    return mlp(input_shape, num_outputs, width=512, depth=3)


def mlp_ntk_w8(input_shape: tuple[int, ...] = (1, 28, 28), num_outputs: int = 10) -> MLP:
    """The base of the wide & sparse NTK-style family (784 -> 8 -> 10, Golubeva et al. 2021, App. A, Fig. 8
    MLPs)."""
    return mlp(input_shape, num_outputs, width=8, parametrization="ntk")
