"""Width-parametrised models: MLP, ResNet-18 (CIFAR and ImageNet stems), ResNet-20.

Build by registered name with :func:`create_model` (the YAML boundary), or import the classes directly
in library code. Every model exposes ``width_sites()`` (for width surgery) and ``widths()``.
"""

# Importing the model modules fills the registry; the order fixes nothing (names are sorted).
from widthlab.models import bottleneck as _bottleneck  # noqa: F401
from widthlab.models import custom as _custom  # noqa: F401
from widthlab.models import gin as _gin  # noqa: F401
from widthlab.models import mlp as _mlp  # noqa: F401
from widthlab.models import resnet as _resnet  # noqa: F401
from widthlab.models import rnn as _rnn  # noqa: F401
from widthlab.models import transformer as _transformer  # noqa: F401
from widthlab.models._registry import MODELS, create_model, list_models, model_options, open_options
from widthlab.models.counting import (
    count_nonzero_weights,
    count_parameters,
    count_weights,
    counted_layers,
    is_counted_layer,
)
from widthlab.models.mlp import MLP, MLPConfig
from widthlab.models.resnet import ResNet, ResNetConfig

__all__ = [
    "MLP",
    "MODELS",
    "MLPConfig",
    "ResNet",
    "ResNetConfig",
    "count_nonzero_weights",
    "count_parameters",
    "count_weights",
    "counted_layers",
    "create_model",
    "is_counted_layer",
    "list_models",
    "model_options",
    "open_options",
]
