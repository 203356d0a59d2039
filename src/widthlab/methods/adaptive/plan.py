"""Study-file entry point of the adaptive-width method: ``method: {name: adaptive, ...}``.

The runner first builds the plain model named in ``model:``; :func:`build` reads its architecture and
fixed sizes from it and builds the adaptive counterpart (the architectures of Errica et al. 2025, Sec. 4):

==================  =====================================================================================
``model.name``      adaptive model, and which ``model:`` settings are used
==================  =====================================================================================
``mlp``             :class:`~.mlp.AdaptiveMLP`; ``depth`` (or the length of ``widths``) = number of
                    adaptive hidden layers; the width values are ignored (the initial width is D(lam0))
``resnet20``        ResNet-20 with an adaptive classifier head (64 -> D -> classes); ``width`` = trunk
                    width (16); ``head_width`` ignored. ``adaptive_channels: true`` also adapts the
                    block-internal convolution channels (beyond the paper), from the trunk's widths
``rnn``             :class:`~.rnn.AdaptiveRNN`; ``hidden_size`` (128), ``depth`` = adaptive layers per
                    cell MLP
``gin``             :class:`~.gin.AdaptiveGIN`; ``embed_dim`` (64), ``layers`` (first MLP + GIN convs)
``transformer``     :class:`~.transformer.AdaptiveTransformer`; ``d_model``, ``heads``, ``layers``,
                    ``dropout`` (vocabulary and length come from the data); every feed-forward block
                    adapts
any other           (``custom``: the user's own module) the model itself, with the importance rescaling
                    inserted at its discovered width sites or the ``sites`` named
                    (:mod:`.any_model`); each width starts at its built size unless ``lambda0`` is set
==================  =====================================================================================

Everything else is a method option (keyword below). Summary extras: ``distribution``, ``lambda0``,
``k``, ``optimizer_mode``, ``share_width_distribution``, ``initial_widths`` and, after the fit,
``adaptive_widths``, ``adaptive_total_width``, ``adaptive_params`` (final lam per layer), ``resizes``
and, with ``truncation_fractions``, ``truncation`` (accuracy vs kept fraction, tail vs random removal).
The run's ``widths``/``total_width`` (and the per-epoch records) count the adaptive widths only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from widthlab.data.base import TaskData
from widthlab.methods.adaptive.callback import AdaptiveWidthCallback, LinearAnneal
from widthlab.methods.adaptive.layer import collect_sites
from widthlab.methods.adaptive.layer import share_width_distribution as _share
from widthlab.methods.adaptive.loss import ElboPrior
from widthlab.methods.base import MethodPlan


def _anneal(anneal: Any) -> LinearAnneal | None:
    if anneal is None:
        return None
    if isinstance(anneal, dict):
        unknown = set(anneal) - {"start", "end", "alpha"}
        if unknown:
            raise ValueError(f"method option anneal: unknown key(s) {sorted(unknown)}; use start, end, alpha")
        return LinearAnneal(int(anneal["start"]), int(anneal["end"]), float(anneal.get("alpha", 0.9)))
    if isinstance(anneal, Sequence) and len(anneal) in (2, 3):
        return LinearAnneal(int(anneal[0]), int(anneal[1]), float(anneal[2]) if len(anneal) == 3 else 0.9)
    raise ValueError(f"method option anneal must be {{start, end, alpha}} or [start, end, alpha], "
                     f"got {anneal!r}")


def _prior_lambda(prior_lambda: Any) -> tuple[float, float | None]:
    if prior_lambda is None:
        return 0.01, None
    if isinstance(prior_lambda, dict):
        return float(prior_lambda["mu"]), float(prior_lambda["sigma"])
    if isinstance(prior_lambda, Sequence) and len(prior_lambda) == 2:
        return float(prior_lambda[0]), float(prior_lambda[1])
    raise ValueError(f"method option prior_lambda must be [mu, sigma] or null, got {prior_lambda!r}")


def _check_width_prior(distribution: str, options: dict[str, Any], mu: float, sigma: float | None,
                       anneal: LinearAnneal | None) -> None:
    """Refuse a width prior that could not act: the uniform family learns nothing, and the other
    families' prior mean is in their own parameter's units and must lie in its domain."""
    if sigma is None and anneal is None:
        return
    if distribution == "uniform":
        what = "anneal (online compression)" if anneal is not None else "prior_lambda"
        raise ValueError(f"method option {what}: distribution uniform learns no width parameter, so the "
                         "lambda prior would do nothing; use exponential, power_law or sigmoid, or drop it")
    if sigma is None:
        return  # anneal without a prior: refused by the callback
    if distribution == "power_law":
        floor = float(options.get("gamma_min", 1.3))
        if not mu >= floor:
            raise ValueError(f"method option prior_lambda: with distribution power_law the prior acts on "
                             f"gamma, which is kept >= {floor}; its mean mu must be >= {floor}, got {mu}")
    elif not mu > 0:
        param = "the rate lambda" if distribution == "exponential" else "the location b"
        raise ValueError(f"method option prior_lambda: with distribution {distribution} the prior acts on "
                         f"{param}, which is positive; its mean mu must be > 0, got {mu}")


def build(
    model: nn.Module,
    data: TaskData,
    *,
    seed: int,
    lambda0: float | None = None,
    k: float = 0.9,
    distribution: str = "exponential",
    distribution_options: dict[str, Any] | None = None,
    boundary: float | None = None,
    activation: str = "relu6",
    act_outer: str | None = "auto",
    init: str = "gaussian",
    sigma_theta: float | None = 1.0,
    prior_lambda: Any = None,
    n_observations: int | None = None,
    optimizer_mode: str = "reset",
    anneal: Any = None,
    check_every: int = 1,
    sync: str = "step",
    adaptive_channels: bool = False,
    channels_lambda0: float | None = None,
    truncation_fractions: list[float] | None = None,
    disable_adaptation: bool = False,
    share_width_distribution: bool = False,
    sites: list[str] | None = None,
    consumer_init: str = "kaiming_plus",
    grow_init: str = "kaiming",
) -> MethodPlan:
    """Build the adaptive counterpart of ``model`` and the callback that trains its widths.

    Args:
        model: the plain model of the study's ``model:`` section (selects the architecture; module doc).
        data: the task (input shape, outputs, training-set size).
        seed: seeds the construction of the adaptive model and the draws of new units.
        lambda0: initial rate of every adaptive layer; null: 0.01 (D = 232, the paper's start) for
            widthlab's architectures, each width's built size for any other model.
        k: width quantile (0.9).
        distribution: ``exponential`` | ``power_law`` | ``uniform`` | ``sigmoid``.
        distribution_options: the family's options (``gamma0``, ``shift``; ``b``; ``b0``, ``slope``).
        boundary: floor on lam (cap on the width), e.g. 5e-4 -> at most 4607 units.
        activation: inner activation of the adaptive MLPs (``relu6``: bounded, recommended by the paper).
        act_outer: activation after the rescaling; ``auto``: ``leaky_relu`` in the RNN cells, none
            elsewhere (as the official configs).
        init: ``gaussian`` (Kaiming+), ``uniform`` or ``kaiming``.
        sigma_theta: std of the Gaussian prior on every network parameter; null: no theta prior.
        prior_lambda: ``[mu, sigma]`` of the Gaussian prior on each lam, or null (flat prior). For
            ``power_law`` it acts on gamma and for ``sigmoid`` on the location b (mu in their units: a
            larger gamma, a smaller b narrow the layer); ``uniform`` learns nothing and refuses it.
        n_observations: N of the loss; null: the training-set size.
        optimizer_mode: ``reset`` (faithful: state of resized tensors restarts) or ``keep``.
        anneal: ``{start, end, alpha}``: linear annealing of the lam prior (online compression).
        check_every: compare widths every this many steps (1: every step, as the paper).
        sync: ``step`` or ``async`` (non-blocking width read on CUDA).
        adaptive_channels: ResNet-20 only: adapt the convolution channels inside each block too.
        channels_lambda0: initial rate of the adaptive channels; null starts each block at the trunk's
            nominal width.
        truncation_fractions: kept fractions for the end-of-fit truncation curve (tail vs random
            removal on the test split, summary key ``truncation``); null: none.
        disable_adaptation: freeze every lam and drop the rescaling: a plain network at the widths
            D(lam0) trained with the same loss (the official ``disable_adaptation``, a control).
        share_width_distribution: one distribution (one lam) for every adaptive layer of the model, so
            all widths move together and the lam prior counts it once (``layer.share_width_distribution``;
            not with ``adaptive_channels``).
        sites, consumer_init, grow_init: any other model only (``any_model.make_adaptive``): the widths
            to adapt (site or group names; null: every discovered site), how their consumers are
            initialised (``kaiming_plus``, ``preserve``, ``none``) and how grown units are drawn.
    """
    from widthlab.methods.adaptive import architectures

    mu, sigma_lam = _prior_lambda(prior_lambda)
    anneal_cfg = _anneal(anneal)
    _check_width_prior(distribution, dict(distribution_options or {}), mu, sigma_lam, anneal_cfg)
    if share_width_distribution and adaptive_channels:
        raise ValueError("method option share_width_distribution: not with adaptive_channels (the "
                         "convolution channels start at the trunk's widths, the head at D(lambda0))")
    n_obs = int(n_observations) if n_observations is not None else len(data.train)
    if not architectures.has_counterpart(model):
        return _any_model(
            model, data, seed=seed, lambda0=lambda0, k=k, distribution=distribution,
            distribution_options=distribution_options, boundary=boundary, activation=activation,
            act_outer=act_outer, init=init, sigma_theta=sigma_theta, mu=mu, sigma_lam=sigma_lam, n_obs=n_obs,
            optimizer_mode=optimizer_mode, anneal=anneal_cfg, check_every=check_every, sync=sync,
            adaptive_channels=adaptive_channels, truncation_fractions=truncation_fractions,
            disable_adaptation=disable_adaptation, share_width_distribution=share_width_distribution,
            sites=sites, consumer_init=consumer_init, grow_init=grow_init)
    for key, value, default in (("sites", sites, None), ("consumer_init", consumer_init, "kaiming_plus"),
                                ("grow_init", grow_init, "kaiming")):
        if value != default:
            raise ValueError(f"method option {key} applies to models widthlab has no adaptive counterpart "
                             f"for (model custom), not {type(model).__name__}")
    lambda0 = 0.01 if lambda0 is None else lambda0
    cell = dict(lam0=float(lambda0), k=float(k), distribution=distribution,
                distribution_options=dict(distribution_options or {}), boundary=boundary,
                activation=activation, act_outer=act_outer, init=init)
    adaptive = architectures.from_plain(model, data, cell, seed=seed, adaptive_channels=adaptive_channels,
                                        channels_lam0=channels_lambda0)
    summary: dict[str, Any] = {
        "distribution": distribution, "lambda0": lambda0, "k": k, "optimizer_mode": optimizer_mode,
        "share_width_distribution": bool(share_width_distribution),
    }
    _controls(adaptive, summary, disable_adaptation, share_width_distribution)
    prior = ElboPrior(sigma_theta=sigma_theta, mu_lambda=mu, sigma_lambda=sigma_lam, n_observations=n_obs)
    callback = AdaptiveWidthCallback(prior, optimizer_mode=optimizer_mode, anneal=anneal_cfg,
                                     check_every=check_every, sync=sync, seed=seed, summary=summary,
                                     truncation_fractions=truncation_fractions)
    return MethodPlan(adaptive, [callback], summary)


def _example_batch(data: TaskData):
    """Two training examples, collated as the trainer does: discovery traces the model on them."""
    from torch.utils.data import default_collate

    items = [data.train[i] for i in range(min(2, len(data.train)))]
    return (data.collate or default_collate)(items)[0]


def _controls(model: nn.Module, summary: dict[str, Any], disable_adaptation: bool,
              share_width_distribution: bool) -> None:
    if share_width_distribution:
        _share(model)
    if disable_adaptation:
        for s in collect_sites(model):
            s.scale.adapt = False
            s.scale.dist.requires_grad_(False)
    summary["initial_widths"] = {s.name: s.width for s in collect_sites(model)}


def _any_model(model: nn.Module, data: TaskData, *, seed: int, lambda0, k, distribution, distribution_options,
               boundary, activation, act_outer, init, sigma_theta, mu, sigma_lam, n_obs, optimizer_mode,
               anneal, check_every, sync, adaptive_channels, truncation_fractions, disable_adaptation,
               share_width_distribution, sites, consumer_init, grow_init) -> MethodPlan:
    """The adaptive method on a model widthlab did not build: rescaling inserted at its width sites."""
    import torch

    from widthlab.methods.adaptive.controller import AdaptiveWidth

    for key, value, default in (("activation", activation, "relu6"), ("act_outer", act_outer, "auto"),
                                ("init", init, "gaussian"), ("adaptive_channels", adaptive_channels, False)):
        if value != default:
            raise ValueError(f"method option {key} applies to widthlab's adaptive architectures; "
                             f"{type(model).__name__} keeps its own layers (see consumer_init, grow_init)")
    prior = ElboPrior(sigma_theta=sigma_theta, mu_lambda=mu, sigma_lambda=sigma_lam, n_observations=n_obs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controller = AdaptiveWidth(model, None, _example_batch(data), sites=sites, prior=prior,
                                   optimizer_mode=optimizer_mode, anneal=anneal, check_every=check_every,
                                   sync=sync, seed=seed, lambda0=lambda0, k=float(k),
                                   distribution=distribution, distribution_options=distribution_options,
                                   boundary=boundary, consumer_init=consumer_init, grow_init=grow_init)
    summary: dict[str, Any] = {
        "distribution": distribution, "lambda0": lambda0, "k": k, "optimizer_mode": optimizer_mode,
        "share_width_distribution": bool(share_width_distribution),
    }
    _controls(model, summary, disable_adaptation, share_width_distribution)
    callback = AdaptiveWidthCallback(controller, seed=seed, summary=summary,
                                     truncation_fractions=truncation_fractions)
    return MethodPlan(model, [callback], summary)
