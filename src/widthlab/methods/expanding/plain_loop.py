"""The self-expanding method from a plain PyTorch loop: the Trainer's controller, driven by hand.

Self-expanding networks (Mitchell et al., 2023) add a neuron or a layer when the natural expansion
score says the new capacity pays: the increase of the natural-gradient norm eta = g^T F^-1 g a candidate
would bring, relative to its layer's eta (threshold tau) and to the loss's gradient scale
(threshold alpha); a new neuron enters with zero outgoing weights, so the function is unchanged.

:class:`SelfExpanding` wraps the same :class:`~widthlab.methods.expanding.controller.ExpansionController`
the Trainer uses (one implementation): ``start()`` before the first epoch, ``epoch_end()`` after each,
every ``cooldown`` epochs an expansion event on the scoring data, and the optimizer it was given is
remapped after every insertion (surviving units keep their state; new units start with first moments 0
and second moments 1, as the Trainer does). ::

    se = SelfExpanding(net, optimizer, (x_train, y_train), epochs=20, cooldown=2, max_widths=[64])
    se.start()
    for epoch in range(20):
        for xb, yb in batches:
            ...  # the usual step
        se.epoch_end()

The model is one of the method's expandable networks (:class:`~.model.ExpandableMLP`,
:class:`~.model.ExpandableCNN`: neurons with their own rational activation, and layers, grow), or any
other ``nn.Module``: then units grow at the sites and groups of ``nn.Linear``/``nn.Conv2d`` layers that
``torch.fx`` discovery finds (:mod:`.any_model`: candidates scored through each width's own operations
at every consumer, inserted by width surgery; no layer insertion).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from widthlab.methods.expanding.any_model import SiteController, SiteNetwork
from widthlab.methods.expanding.controller import ExpansionConfig, ExpansionController
from widthlab.methods.expanding.model import ExpandableCNN, ExpandableMLP
from widthlab.nn.optim_surgery import apply_events
from widthlab.nn.resize import ResizeEvent

__all__ = ["SelfExpanding"]


@dataclass
class _Epochs:
    epochs: int


@dataclass
class _Data:
    train: TensorDataset


@dataclass
class _LoopState:
    """What the controller reads from a trainer, for a plain loop."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    data: _Data
    loss_kind: str
    cfg: _Epochs
    device: torch.device
    epoch: int = 0
    run_dir: Any = None
    dist: Any = None
    history: list = field(default_factory=list)


class SelfExpanding:
    """Plain-loop controller of the self-expanding method.

    Args:
        model: an :class:`~.model.ExpandableMLP` or :class:`~.model.ExpandableCNN`, or any model with
            discoverable Linear/Conv2d widths (``sites`` names some; ``max_widths`` caps each, in order).
        optimizer: the optimizer training it; remapped after every insertion (None: only the events).
        train_data: ``(x, y)`` tensors the expansion events score candidates on (all of it, or a fixed
            random subset of ``score_batch`` examples).
        loss: ``"cross_entropy"`` (classification) or ``"mse"``.
        epochs: the planned number of epochs (for ``expand_at_end``); None: open-ended.
        seed: seeds the proposals.
        sites: any other model only: the discovered sites or groups to grow (None: every one).
        **config: :class:`~.controller.ExpansionConfig` fields (``tau``, ``alpha``, ``cooldown``,
            ``max_widths``, ``proposals``, ``mala_bursts``...).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 train_data: tuple[torch.Tensor, torch.Tensor], *, loss: str = "cross_entropy",
                 epochs: int | None = None, seed: int = 0, sites: list[str] | None = None, **config: Any):
        x, y = train_data
        self.config = ExpansionConfig(**config)
        if isinstance(model, (ExpandableMLP, ExpandableCNN)):
            if sites is not None:
                raise ValueError("sites: an expandable network grows all its hidden layers")
            self.controller = ExpansionController(model, self.config, loss, seed=seed)
        else:
            model = SiteNetwork(model, x[:2], sites)  # a view of the same modules, edited in place
            self.controller = SiteController(model, self.config, loss, seed=seed)
        self.state = _LoopState(model, optimizer, _Data(TensorDataset(x, y)), loss,
                                _Epochs(epochs if epochs is not None else 2**62), x.device)
        self.started = False

    @property
    def model(self) -> nn.Module:
        return self.state.model

    def widths(self) -> list[int]:
        """The hidden widths now (input side first)."""
        return list(self.model.hidden_widths())

    def start(self) -> list[ResizeEvent]:
        """Call once before training: the event before the first epoch (``expand_at_start``)."""
        self.started = True
        self._sync()
        return self._apply(self.controller.on_fit_start(self.state))

    def epoch_end(self) -> list[ResizeEvent]:
        """Call after every epoch: an expansion event every ``cooldown`` epochs (and after the last one
        with ``expand_at_end``); returns what was inserted, after remapping the optimizer."""
        if not self.started:
            self.start()
        self.state.epoch += 1
        self._sync()
        return self._apply(self.controller.on_epoch_end(self.state))

    def expand(self) -> list[ResizeEvent]:
        """Run one expansion event now, whatever the schedule."""
        self._sync()
        return self._apply(self.controller.expand(self.state))

    def last_scores(self) -> dict[str, float]:
        """The last event's η_global and, per place, the chosen candidate's relative score
        (``score_rel.width<i>``, against τ) and absolute score (``score_abs.width<i>``, against α)."""
        return dict(self.controller._last)

    def summary(self) -> dict[str, Any]:
        """The run's totals (events, neurons and layers added, time and FLOPs spent expanding)."""
        self.controller.on_fit_end(self.state)
        return dict(self.controller.summary)

    def _sync(self) -> None:
        """A view of the user's model takes its train/eval mode (events restore the mode they found)."""
        if isinstance(self.model, SiteNetwork):
            self.model.training = self.model.net.training

    def _apply(self, events: list[ResizeEvent] | None) -> list[ResizeEvent]:
        events = list(events or [])
        apply_events(self.state.optimizer, events)
        return events
