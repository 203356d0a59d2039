"""From a plain registered model to its adaptive counterpart (Errica et al. 2025, architectures); see
``plan.py``."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from widthlab.data.base import TaskData
from widthlab.methods.adaptive.mlp import AdaptiveMLP, AdaptiveMLPConfig


def has_counterpart(model: nn.Module) -> bool:
    """Whether ``model`` is one of the plain architectures :func:`from_plain` knows."""
    from widthlab.models.gin import GIN
    from widthlab.models.mlp import MLP
    from widthlab.models.resnet import ResNet
    from widthlab.models.rnn import RNN
    from widthlab.models.transformer import Seq2SeqTransformer

    return isinstance(model, (MLP, ResNet, RNN, GIN, Seq2SeqTransformer))


def from_plain(model: nn.Module, data: TaskData, cell: dict[str, Any], *, seed: int,
               adaptive_channels: bool = False, channels_lam0: float | None = None) -> nn.Module:
    """The adaptive model for the architecture of ``model``.

    Args:
        model: a plain model built from the study's ``model:`` section.
        data: the task (input shape and number of outputs).
        cell: options shared by every adaptive MLP (``AdaptiveMLPConfig`` fields except the sizes).
        seed: the adaptive model's initialisation depends on this seed only, not on what building the
            plain model drew from the global generator.
        adaptive_channels: ResNet-20: adapt block-internal convolution channels too.
        channels_lam0: their initial rate (None: start at the trunk's nominal widths).

    Raises:
        ValueError: an architecture without an adaptive counterpart.
    """
    from widthlab.models.gin import GIN
    from widthlab.models.mlp import MLP
    from widthlab.models.resnet import ResNet
    from widthlab.models.rnn import RNN
    from widthlab.models.transformer import Seq2SeqTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if adaptive_channels and not isinstance(model, ResNet):
            raise ValueError("method option adaptive_channels applies to model resnet20 only")
        if isinstance(model, MLP):
            return AdaptiveMLP(AdaptiveMLPConfig(in_features=math.prod(data.input_shape),
                                                 out_features=data.num_outputs,
                                                 hidden_layers=max(len(model.config.widths), 1),
                                                 **_outer(cell, None)))
        if isinstance(model, ResNet):
            from widthlab.methods.adaptive.resnet import adaptive_resnet20

            if model.config.blocks != (3, 3, 3) or model.config.shortcut != "pad":
                raise ValueError("the adaptive ResNet is ResNet-20 (model: resnet20)")
            return adaptive_resnet20(data.input_shape, data.num_outputs, width=model.config.width,
                                     head=_outer(cell, None), adaptive_channels=adaptive_channels,
                                     channels_lam0=channels_lam0)
        if isinstance(model, RNN):
            from widthlab.methods.adaptive.rnn import AdaptiveRNN

            return AdaptiveRNN(model.config, _outer(cell, "leaky_relu"))
        if isinstance(model, GIN):
            from widthlab.methods.adaptive.gin import AdaptiveGIN

            return AdaptiveGIN(model.config, _outer(cell, None))
        if isinstance(model, Seq2SeqTransformer):
            from widthlab.methods.adaptive.transformer import AdaptiveTransformer

            return AdaptiveTransformer(model.config, _outer(cell, None))
    raise ValueError(f"no adaptive counterpart for model {type(model).__name__}; use mlp, resnet20, rnn, gin "
                     "or transformer")


def _outer(cell: dict[str, Any], default: str | None) -> dict[str, Any]:
    """Resolve ``act_outer="auto"``: leaky_relu in the RNN cells, none elsewhere (§2, §4)."""
    return {**cell, "act_outer": default} if cell.get("act_outer") == "auto" else cell
