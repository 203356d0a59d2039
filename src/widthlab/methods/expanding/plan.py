"""Study-file entry point of the self-expanding method: ``method: {name: expanding, ...}``.

The runner first builds the plain model named in ``model:``; this builder replaces it with an
:class:`~.model.ExpandableMLP` on the task's flattened input (``data.input_shape``, ``data.num_outputs``),
or with ``architecture: cnn`` an :class:`~.model.ExpandableCNN` whose channels grow; with
``architecture: model`` it keeps the plain model (a built-in one or the user's ``model: {name: custom}``)
and grows the widths discovery finds in it (``sites:`` names some).
With ``architecture: dense_cnn`` it builds the official CNN method instead (:func:`build_dense`: a
densely connected CNN whose input connections are thawed, frozen and pruned every step and which adds
channels and layers from buds every epoch; options under ``dense:``).
From the plain model it only reads the starting hidden widths when ``start_widths`` is not given (an
``mlp`` with ``widths: [...]`` or ``width``/``depth``); everything else of ``model:`` is ignored. To start
from a linear model (experiment 2) give ``start_widths: []``.

Optimisers (``optimizer=``), installed through the trainer's ``make_optimizer`` hook:

* ``"cg"`` (official): damped Gauss-Newton natural gradient by CG,
  :class:`~.natural_gradient.NaturalGradientCG`
  with ``lr``, ``damping``, ``cg_maxiter``, ``cg_tol``, ``weight_decay``;
* ``"kfac"``: :class:`~.kfac_optimizer.KFACOptimizer` with ``lr``, ``damping``, ``kfac_*`` options;
* ``"default"``: the optimizer of the study's ``train.optimizer`` section (e.g. Adam).

Correct by default, official behaviour by switch (Mitchell et al. 2023 and its official code):

=========================  ==========================================  ====================================
what                       default (correct)                           official code
=========================  ==========================================  ====================================
output metric              ``output_metric: fisher`` (loss GN)         ``identity`` (E[JᵀJ] even for CE)
proposal sampler           ``mala_variant: correct`` (MH-adjusted)     ``official`` / ``official_legacy``
G factor of the scores     ``g_estimator: exact`` (metric square root) ``normalized`` (∇ℓ/‖∇ℓ‖, rank one)
bias coordinate in A       ``bias_in_factors: true``                   ``false``
absolute-score normaliser  ``abs_normalizer: room`` (the site's      ``sqnorm`` (E‖∇_yℓ‖²; ``metric``:
                           largest possible Δη: ≤ 1/α additions)       E[∇ℓᵀH⁺∇ℓ])
decision score             ``decision: softmax_mean`` (= official)     same (``chosen``: the kept one's)
width cap                  ``stop_below_cap: false`` (up to the cap)   ``true`` (stops at cap − 1)
re-search in one event     ``warm_start: true`` (chains continue for   ``false`` (MALA restarts from the
                           ``mala_warm_bursts``, default 1/4)          prior after every addition)
inserted layer             ``layer_init: identity`` (exact)            ``basis`` (B⁺ basis change)
=========================  ==========================================  ====================================

Summary extras after the fit: ``method_flops`` (= ``solve_flops`` of the optimizer's natural-gradient
solves + ``expansion_flops`` of the events; ``cost.py``), ``final_widths``, ``final_layers``,
``final_neurons``, ``neurons_added``, ``layers_added``, ``expansion_events``, ``expansion_seconds`` and
``expansion_share`` (of the fit's wall time). Per-epoch records add ``layers``, ``neurons``,
``expansion_seconds``, ``expansion_flops``, ``eta_global``, ``loss_sqnorm``, ``score_bound`` (the
absolute score's normaliser) and the last event's scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from widthlab.data.base import TaskData
from widthlab.methods.base import MethodPlan
from widthlab.methods.expanding.any_model import SiteController, SiteNetwork
from widthlab.methods.expanding.controller import ExpansionConfig, ExpansionController
from widthlab.methods.expanding.kfac_optimizer import KFACOptimizer
from widthlab.methods.expanding.model import ExpandableCNN, ExpandableMLP
from widthlab.methods.expanding.natural_gradient import NaturalGradientCG

OPTIMIZERS = ("cg", "kfac", "default")


class OptimizerHook:
    """Installs the natural-gradient optimizer and hands it each batch between backward and step.

    The Gauss-Newton products of the CG and K-FAC optimizers need the batch inputs, which the trainer
    does not pass to ``optimizer.step``; ``on_after_backward`` gives them ``trainer.last_batch``.
    """

    def __init__(self, name: str, loss: str, **options):
        if name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
        self.name, self.loss, self.options = name, loss, options

    def make_optimizer(self, model: nn.Module, default) -> torch.optim.Optimizer:
        if self.name == "cg":
            return NaturalGradientCG(model.parameters(), model, self.loss, **self.options)
        if self.name == "kfac":
            return KFACOptimizer(model.parameters(), model, self.loss, **self.options)
        return default(model.parameters())

    def on_fit_start(self, trainer) -> None:
        # The trainer may train another loss than the task's default (train.loss).
        self.loss = trainer.loss_kind
        if hasattr(trainer.optimizer, "loss"):
            trainer.optimizer.loss = trainer.loss_kind

    def on_after_backward(self, trainer) -> None:
        opt = trainer.optimizer
        if hasattr(opt, "set_batch"):
            opt.set_batch(*trainer.last_batch)  # this rank's slice under data parallelism
            dist = getattr(trainer, "dist", None)
            opt.dist = dist if dist is not None and dist.active else None

    def metrics(self, trainer) -> dict[str, float]:
        eta = getattr(trainer.optimizer, "last_eta", None)
        return {} if eta is None else {"eta_batch": float(eta)}


DENSE_MODEL_OPTIONS = {"widths": [[128], [128], [128]], "bud_width": 64, "init_active": 8}


def build_dense(data: TaskData, *, seed: int, options: dict) -> MethodPlan:
    """``architecture: dense_cnn``: the official CNN method of Mitchell et al. (2023):
    :class:`~.dense_cnn.ExpandableDense` trained by the study's ``train.optimizer`` with the
    :class:`~.connection_controller.ConnectionController` (thaw/freeze/prune of input connections every
    step, re-initialisation, channel addition and bud promotion every epoch).

    ``options`` (the study's ``method.dense`` mapping): ``widths`` (channels per layer per block, default
    ``[[128], [128], [128]]``), ``bud_width`` (64), ``init_active`` (8) and every field of
    :class:`~.connection_controller.ConnectionConfig` (``max_width`` caps both). Unknown keys are errors.
    """
    from widthlab.methods.expanding.connection_controller import ConnectionConfig, ConnectionController
    from widthlab.methods.expanding.dense_cnn import ExpandableDense

    if not isinstance(options, dict):
        raise ValueError(f"dense: must be a mapping of options, got {options!r}")
    if len(data.input_shape) != 3:
        raise ValueError(f"architecture 'dense_cnn' needs (C, H, W) inputs (e.g. data.as_image: true), "
                         f"the data has {data.input_shape}")
    if data.task != "classification":
        raise ValueError("architecture 'dense_cnn' is for classification tasks")
    model_opts = {k: options.get(k, v) for k, v in DENSE_MODEL_OPTIONS.items()}
    ctl_opts = {k: v for k, v in options.items() if k not in DENSE_MODEL_OPTIONS}
    try:
        cfg = ConnectionConfig.from_options(ctl_opts)
    except (TypeError, ValueError) as e:
        known = sorted([*DENSE_MODEL_OPTIONS, *ConnectionConfig.__dataclass_fields__])
        raise ValueError(f"dense: {e}".split("; known")[0] + f"; known: {', '.join(known)}") from None
    widths = model_opts["widths"]
    if (not isinstance(widths, list) or not widths
            or not all(isinstance(b, list) and b and all(isinstance(w, int) and w > 0 for w in b)
                       for b in widths)):
        raise ValueError(f"dense.widths: a list of blocks, each a list of positive channel counts, "
                         f"got {widths!r}")
    gen = torch.Generator().manual_seed(seed)
    net = ExpandableDense(data.input_shape, data.num_outputs, widths, bud_width=int(model_opts["bud_width"]),
                          init_active=int(model_opts["init_active"]), max_width=cfg.max_width, generator=gen)
    summary: dict = {"start_widths": net.block_widths(), "architecture": "dense_cnn",
                     "start_active_connections": net.active_connections()}
    controller = ConnectionController(net, cfg, seed=seed, summary=summary)
    return MethodPlan(net, [controller], summary)


def _start_widths(model: nn.Module, start_widths: Sequence[int] | None) -> list[int]:
    if start_widths is not None:
        return [int(w) for w in start_widths]
    fn = getattr(model, "widths", None)
    return list(fn().values()) if callable(fn) else []


def build(
    model: nn.Module,
    data: TaskData,
    *,
    seed: int,
    architecture: str = "mlp",
    start_widths: Sequence[int] | None = None,
    sites: Sequence[str] | None = None,
    max_widths: Sequence[int] = (16, 16, 16),
    init: str = "lecun",
    eps_mode: str = "floor",
    optimizer: str = "cg",
    lr: float = 0.1,
    damping: float = 0.1,
    weight_decay: float = 0.0,
    cg_maxiter: int = 100,
    cg_tol: float = 1e-5,
    kfac_ema_decay: float = 0.95,
    kfac_stat_every: int = 10,
    kfac_inv_every: int = 10,
    kfac_stat_batch: int | None = 256,
    kfac_momentum: float = 0.0,
    kfac_kl_clip: float | None = None,
    kfac_g_estimator: str = "sampled",
    output_metric: str = "fisher",
    tau: float = 1.0,
    alpha: float = 2.5e-3,
    alpha_layer: float = 2.5e-3,
    cooldown: int = 30,
    layer_cooldown: int = 3,
    layer_cost_mul: float = 2.0,
    proposals: int = 100,
    layer_proposals: int = 100,
    refine: str = "mala",
    mala_variant: str = "correct",
    mala_bursts: int = 300,
    mala_steps: int = 10,
    mala_step_size: float = 0.3,
    temperature: float = 1.0,
    mala_temperature: float | None = None,
    mala_temperature_ratio: float = 0.1,
    selection: str = "argmax",
    ascent_steps: int = 300,
    ascent_lr: float = 0.03,
    g_estimator: str = "exact",
    g_damping: float = 0.1,
    bias_in_factors: bool = True,
    width_residual: str = "grad",
    layer_init: str = "identity",
    score_batch: int | None = None,
    expand_at_start: bool = True,
    expand_at_end: bool = False,
    recursive: bool = True,
    max_additions: int = 64,
    width_block: int = 1,
    eta_maxiter: int = 100,
    eta_mode: str = "auto",
    abs_normalizer: str = "room",
    decision: str = "softmax_mean",
    stop_below_cap: bool = False,
    warm_start: bool = True,
    mala_warm_bursts: int | None = None,
    chance_correction: bool = False,
    log_eta_global: bool = True,
    holdout: float = 0.0,
    holdout_z: float = 1.0,
    holdout_bootstrap: int = 50,
    ascent_warm_steps: int | None = None,
    dense: dict | None = None,
) -> MethodPlan:
    """Build the self-expanding method (Mitchell et al. 2023): expandable MLP, optimizer hook, controller.

    Args:
        model: the runner's plain model; only its hidden widths are read, and only if ``start_widths`` is
            None.
        data: the task; ``input_shape`` (flattened) and ``num_outputs`` size the network.
        seed: seeds the network's initial parameters and the proposals.
        architecture: ``"mlp"`` (:class:`~.model.ExpandableMLP`, neurons and layers grow) or ``"cnn"``
            (:class:`~.model.ExpandableCNN` on (C, H, W) inputs, channels grow; one stage per entry of
            ``start_widths``).
            ``"model"``: the study's own model (``model:``, e.g. ``name: custom``) grows at the widths
            discovery finds in it (:mod:`.any_model`: Linear/Conv2d sites and groups; no layers).
        start_widths: initial hidden widths (``[]``: a linear model) or channels per CNN stage.
        sites: ``architecture: model`` only: the discovered sites or groups to grow (default: all).
        max_widths: cap per hidden-layer position; its length is the largest number of hidden layers.
        init, eps_mode: Linear init (``lecun`` official, ``torch``) and rational guard (``floor``, ``add``).
        optimizer: ``cg`` (official), ``kfac`` or ``default`` (the study's ``train.optimizer``).
        lr, damping, weight_decay, cg_maxiter, cg_tol: natural-gradient step (official 0.1, 0.1, 0, 100,
            1e-5); for K-FAC ``damping`` is λ of its factored damping.
        kfac_ema_decay, kfac_stat_every, kfac_inv_every, kfac_momentum, kfac_kl_clip, kfac_g_estimator:
            K-FAC options (``kfac_g_estimator``: ``sampled`` Monte-Carlo Fisher, or ``exact``).
        kfac_stat_batch: K-FAC: the most samples of a batch its factors are estimated on (None: all).
        output_metric: ``fisher`` (the loss's Gauss-Newton, default) or ``identity`` (official) for the
            optimiser, η and the G factors.
        eta_maxiter: CG iterations for the global η and the natural-gradient residual of the scores.
        eta_mode: that solve's Gauss-Newton products: ``auto``, ``jacobian`` (per-sample Jacobians) or
            ``autograd`` (matrix-free).
        dense: ``architecture: dense_cnn`` only: options of the densely connected CNN with buds and
            connection decisions (:func:`build_dense`).
        Others: see :class:`~.controller.ExpansionConfig` (``bias_in_factors`` is its ``bias``).
    """
    if architecture == "dense_cnn":
        return build_dense(data, seed=seed, options=dense or {})
    if dense is not None:
        raise ValueError(f"dense: only with architecture 'dense_cnn', not {architecture!r}")
    loss = "cross_entropy" if data.task == "classification" else "mse"
    widths = [] if architecture == "model" else _start_widths(model, start_widths)
    gen = torch.Generator().manual_seed(seed)
    if sites is not None and architecture != "model":
        raise ValueError(f"sites: only with architecture 'model' (architecture {architecture!r} grows all "
                         "its hidden layers)")
    if architecture == "model":
        if start_widths is not None:
            raise ValueError("start_widths: with architecture 'model' the model's own widths are the start "
                             "(set them in model:)")
        example = torch.stack([torch.as_tensor(data.train[i][0]) for i in range(min(2, len(data.train)))])
        net = SiteNetwork(model, example, None if sites is None else list(sites))
        widths = net.hidden_widths()
    elif architecture == "mlp":
        net = ExpandableMLP(math.prod(data.input_shape), data.num_outputs, widths, init=init,
                            eps_mode=eps_mode, generator=gen)
    elif architecture == "cnn":
        if len(data.input_shape) != 3:
            raise ValueError(f"architecture 'cnn' needs (C, H, W) inputs, the data has {data.input_shape}")
        net = ExpandableCNN(data.input_shape, data.num_outputs, widths, eps_mode=eps_mode, generator=gen)
    else:
        raise ValueError(f"architecture must be 'mlp', 'cnn', 'dense_cnn' or 'model', got {architecture!r}")
    if optimizer == "cg":
        opt_options = {"lr": lr, "damping": damping, "maxiter": cg_maxiter, "tol": cg_tol,
                       "weight_decay": weight_decay, "output_metric": output_metric}
    elif optimizer == "kfac":
        opt_options = {"lr": lr, "damping": damping, "weight_decay": weight_decay,
                       "ema_decay": kfac_ema_decay,
                       "stat_every": kfac_stat_every, "inv_every": kfac_inv_every,
                       "stat_batch": kfac_stat_batch, "momentum": kfac_momentum,
                       "kl_clip": kfac_kl_clip, "output_metric": output_metric,
                       "g_estimator": kfac_g_estimator}
    else:
        opt_options = {}
    hook = OptimizerHook(optimizer, loss, **opt_options)
    config = ExpansionConfig(
        tau=tau, alpha=alpha, alpha_layer=alpha_layer, cooldown=cooldown, layer_cooldown=layer_cooldown,
        layer_cost_mul=layer_cost_mul, max_widths=tuple(max_widths), proposals=proposals,
        layer_proposals=layer_proposals, refine=refine, mala_variant=mala_variant, mala_bursts=mala_bursts,
        mala_steps=mala_steps, mala_step_size=mala_step_size, temperature=temperature,
        mala_temperature=mala_temperature, mala_temperature_ratio=mala_temperature_ratio, selection=selection,
        ascent_steps=ascent_steps, ascent_lr=ascent_lr, output_metric=output_metric, g_estimator=g_estimator,
        g_damping=g_damping, bias=bias_in_factors, width_residual=width_residual, layer_init=layer_init,
        score_batch=score_batch, expand_at_start=expand_at_start, expand_at_end=expand_at_end,
        recursive=recursive, max_additions=max_additions, width_block=width_block, eta_maxiter=eta_maxiter,
        eta_mode=eta_mode,
        abs_normalizer=abs_normalizer, decision=decision, stop_below_cap=stop_below_cap,
        warm_start=warm_start, mala_warm_bursts=mala_warm_bursts, ascent_warm_steps=ascent_warm_steps,
        chance_correction=chance_correction, log_eta_global=log_eta_global, holdout=holdout,
        holdout_z=holdout_z, holdout_bootstrap=holdout_bootstrap,
        eta_damping=damping if optimizer == "cg" else 0.1,
        optimizer_mode="reset" if optimizer == "kfac" else "keep")
    summary: dict = {"start_widths": widths, "optimizer": optimizer}
    if architecture == "model":
        summary["sites"] = [p.name for p in net.places]
        controller: ExpansionController = SiteController(net, config, loss, seed=seed, summary=summary)
    else:
        controller = ExpansionController(net, config, loss, seed=seed, summary=summary)
    return MethodPlan(net, [hook, controller], summary)
