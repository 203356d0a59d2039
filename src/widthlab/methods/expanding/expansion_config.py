"""Knobs of the self-expansion loop (Mitchell et al. 2023, the expansion loop; the official experiment
settings), validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from widthlab.methods.expanding import kfac, proposals
from widthlab.methods.expanding.natural_gradient import GN_MODES

ABS_NORMALIZERS = ("room", "sqnorm", "metric")
DECISIONS = ("softmax_mean", "chosen")


@dataclass(frozen=True)
class ExpansionConfig:
    """Knobs of the expansion loop; defaults are experiment 2's (the official experiment settings) with the
    correct sampler.

    Attributes:
        tau, alpha, alpha_layer: relative and absolute thresholds (τ, α, α_layer).
        cooldown: epochs between expansion events; ``layer_cooldown``: events between layer insertions.
        layer_cost_mul: a layer candidate's Δη′ is divided by this before the thresholds.
        max_widths: cap per hidden-layer position; its length is the maximum number of hidden layers.
        proposals, layer_proposals: candidates drawn per layer and per event for width and for depth.
        refine: ``"mala"``, ``"ascent"`` or ``"none"``; ``mala_variant``: ``"correct"``, ``"official"``,
            ``"official_legacy"``; ``mala_bursts`` × ``mala_steps`` MALA steps from ``mala_step_size``.
        temperature: T of ``selection="sample"`` and of the softmax-mean decision score (official 1).
        mala_temperature: T of the MALA target exp(s/T); None (default): ``mala_temperature_ratio`` ×
            the best starting draw's score at the site (``proposals.auto_temperature``); the official
            code uses ``temperature`` (give ``mala_temperature: 1.0``).
        selection: ``"argmax"`` or ``"sample"`` (∝ softmax(s/T)).
        output_metric, g_estimator: how G is formed (``kfac.g_cotangents``); ``g_damping`` its relative
            damping in the scores (official 0.1).
        bias: homogeneous coordinate in A (official: no).
        width_residual: ``"grad"`` (ρ = ∇_yℓ, experiments 1, 2, 4) or ``"natural"`` (ρ = ∇_yℓ − c·Jx, as
            for depth; experiment 3's legacy width path).
        layer_init: ``"identity"`` (exact) or ``"basis"`` (official basis change with the candidate's B, β).
        score_batch: None scores on the whole training set; an int on a fixed random subset of that size.
        expand_at_start, expand_at_end: also expand before the first / after the last epoch.
        recursive: keep adding one candidate at a time within an event until nothing passes.
        max_additions: safety cap on additions (commits) per event; a block of ``width_block`` units
            counts once.
        width_block: units per width candidate (1: the paper's one-neuron candidates). With k > 1 a
            width candidate is k new units at one site, refined jointly on their joint score
            Δη′ = tr(Cᵀ A_f⁻¹ C G⁻¹) (Mitchell et al. 2023, the score bound; a layer candidate's
            score), the proposal kept by it; the block is decided like a one-unit candidate, on each
            proposal's best unit scored alone (``decision`` and the chance level as for one unit), and
            a passing block keeps the prefix, in greedy order, of its units whose marginal gains
            (``unit_score.greedy_gains``) pass τ and α themselves. At a site with less room the block
            is what fits. One search then adds up to k units where the one-unit loop searches once per
            unit: for CNNs, whose channel searches are costly, the cheap way to grow several channels
            per event.
        eta_damping, eta_maxiter, eta_tol: CG for the global η and the natural-gradient residual.
        eta_mode: that solve's Gauss-Newton products (``natural_gradient.GaussNewtonOperator``):
            ``"auto"`` (per-sample Jacobians while they have at most 10⁷ entries, else matrix-free),
            ``"jacobian"`` or ``"autograd"`` (matrix-free: no per-sample Jacobians, which are slow to
            build for convolutions). The same solve either way, up to rounding.
        optimizer_mode: how the trainer remaps optimizer state (``"keep"``; ``"reset"`` for K-FAC).
        check_tol: largest relative loss change an insertion may cause before it is reported as a bug.
        search_dtype: precision of the proposal search (``"float32"`` or ``"float64"``); decisions always
            re-score the chosen candidate in float64.
        abs_normalizer: denominator of the absolute score. ``"room"`` (default): the consuming layer's
            ρ = (T/N) tr(r_⊥ᵀ r_⊥ G⁻¹) measured before the event (``scores.room``), the largest Δη any
            number of new units there can reach, so that with argmax selection the additions of one
            event at one site have absolute scores summing to at most 1 and at most 1/α of them pass,
            whatever the output metric and G estimator (the paper's rate bound). ``"sqnorm"``:
            E‖∇_yℓ‖² (official), that bound only for the identity metric and the exact Fisher;
            ``"metric"``: E[∇ℓᵀH⁺∇ℓ], the bound of the exact η under ``output_metric``.
        decision: the score compared with τ and α: ``"softmax_mean"`` (default, official) the
            softmax(s/T)-weighted mean of all proposals' scores; ``"chosen"`` the kept proposal's own.
        chance_correction: subtract from every candidate's Δη′ what k new units whose features are
            unrelated to the residual score on average on the N scoring examples, k·ρ/N (ρ the
            consumer's room; exact for (N, d) inputs, an under-estimate where rows are correlated,
            e.g. patches). Without it a random unit's absolute score is k/N on average, so α below
            1/N passes by chance and small scoring sets grow more. Needs ``abs_normalizer="room"``.
        log_eta_global: solve for the global natural gradient at every event to log η_global = gᵀx (a CG
            solve of ``eta_maxiter`` Gauss-Newton products). Off: the solve runs only where a score
            needs its residual (depth candidates, ``width_residual="natural"``) and η_global is logged
            as NaN otherwise; decisions are the same either way.
        holdout: fraction of the scoring examples kept out of the proposal search; the decision then
            scores the refined proposals on these held-out examples only (cross-fitting, ``held_out.py``:
            a search's maximum is biased upwards on the examples it was fitted to), and the chance
            correction uses their number. 0 (default, official): search and decide on the same examples.
            MLP units only (``architecture: mlp``).
        holdout_z, holdout_bootstrap: with ``holdout``, the decision score is the held-out score's
            lower bound D − z·SE, SE its standard deviation over ``holdout_bootstrap`` resamples of the
            held-out rows (0 draws or z = 0: D itself).
        stop_below_cap: stop width growth at max_width − 1 as the official loop does (content <
            capacity − 1); the default grows up to max_width.
        warm_start: within one event, a site searched again after an addition (the recursive loop)
            continues its MALA chains from where they ended, with their adapted step sizes and
            temperature, for ``mala_warm_bursts`` bursts (None: a quarter of ``mala_bursts``) instead of
            starting over from the prior. An addition changes the target only along the new unit (its
            feature leaves the residual), so the chains start near their new target; the official code
            restarts (``warm_start: false``). Either way a site whose input gained units continues
            with zero weights on them (the same features, so the same scores to start from). With
            ``refine="ascent"`` only such sites continue, their refined proposals for
            ``ascent_warm_steps`` Adam steps (None: a quarter of ``ascent_steps``) from a fresh Adam
            state; the site that grew is searched afresh (ascent is greedy: its proposals sit where the
            committed unit was).
    """

    tau: float = 1.0
    alpha: float = 2.5e-3
    alpha_layer: float = 2.5e-3
    cooldown: int = 30
    layer_cooldown: int = 3
    layer_cost_mul: float = 2.0
    max_widths: tuple[int, ...] = (16, 16, 16)
    proposals: int = 100
    layer_proposals: int = 100
    refine: str = "mala"
    mala_variant: str = "correct"
    mala_bursts: int = 300
    mala_steps: int = 10
    mala_step_size: float = 0.3
    temperature: float = 1.0
    mala_temperature: float | None = None
    mala_temperature_ratio: float = 0.1
    selection: str = "argmax"
    ascent_steps: int = 300
    ascent_lr: float = 0.03
    output_metric: str = "fisher"
    g_estimator: str = "exact"
    g_damping: float = 0.1
    bias: bool = True
    width_residual: str = "grad"
    layer_init: str = "identity"
    score_batch: int | None = None
    expand_at_start: bool = True
    expand_at_end: bool = False
    recursive: bool = True
    max_additions: int = 64
    width_block: int = 1
    eta_damping: float = 0.1
    eta_maxiter: int = 100
    eta_tol: float = 1e-5
    eta_mode: str = "auto"
    optimizer_mode: str = "keep"
    check_tol: float = 1e-3
    search_dtype: str = "float32"
    abs_normalizer: str = "room"
    decision: str = "softmax_mean"
    stop_below_cap: bool = False
    warm_start: bool = True
    mala_warm_bursts: int | None = None
    ascent_warm_steps: int | None = None
    chance_correction: bool = False
    log_eta_global: bool = True
    holdout: float = 0.0
    holdout_z: float = 1.0
    holdout_bootstrap: int = 50

    @property
    def warm_bursts(self) -> int:
        return self.mala_warm_bursts if self.mala_warm_bursts is not None else max(1, self.mala_bursts // 4)

    @property
    def warm_ascent_steps(self) -> int:
        steps = self.ascent_warm_steps
        return steps if steps is not None else max(1, self.ascent_steps // 4)

    def __post_init__(self):
        object.__setattr__(self, "max_widths", tuple(int(w) for w in self.max_widths))
        checks = [
            (self.refine in proposals.REFINES, f"refine must be one of {proposals.REFINES}"),
            (self.mala_variant in proposals.MALA_VARIANTS,
             f"mala_variant must be one of {proposals.MALA_VARIANTS}"),
            (self.selection in proposals.SELECTIONS, f"selection must be one of {proposals.SELECTIONS}"),
            (self.g_estimator in kfac.G_ESTIMATORS, f"g_estimator must be one of {kfac.G_ESTIMATORS}"),
            (self.width_residual in ("grad", "natural"), "width_residual must be 'grad' or 'natural'"),
            (self.layer_init in ("identity", "basis"), "layer_init must be 'identity' or 'basis'"),
            (self.cooldown >= 1 and self.layer_cooldown >= 0, "cooldown must be >= 1, layer_cooldown >= 0"),
            (self.proposals >= 1 and self.layer_proposals >= 1, "proposals must be >= 1"),
            (self.width_block >= 1, "width_block must be >= 1"),
            (not (self.holdout and self.width_block > 1),
             "holdout decides on one-unit width candidates: it needs width_block 1"),
            (self.layer_cost_mul > 0 and self.temperature > 0, "layer_cost_mul and temperature must be > 0"),
            ((self.mala_temperature is None or self.mala_temperature > 0) and self.mala_temperature_ratio > 0,
             "mala_temperature and mala_temperature_ratio must be > 0"),
            (all(w >= 1 for w in self.max_widths), "max_widths must be positive"),
            (self.optimizer_mode in ("keep", "reset"), "optimizer_mode must be 'keep' or 'reset'"),
            (self.search_dtype in ("float32", "float64"), "search_dtype must be 'float32' or 'float64'"),
            (self.eta_mode in GN_MODES, f"eta_mode must be one of {GN_MODES}"),
            (self.abs_normalizer in ABS_NORMALIZERS, f"abs_normalizer must be one of {ABS_NORMALIZERS}"),
            (self.decision in DECISIONS, f"decision must be one of {DECISIONS}"),
            (self.mala_warm_bursts is None or self.mala_warm_bursts >= 1, "mala_warm_bursts must be >= 1"),
            (self.ascent_warm_steps is None or self.ascent_warm_steps >= 1, "ascent_warm_steps must be >= 1"),
            (0 <= self.holdout < 1, "holdout must be in [0, 1)"),
            (self.holdout_z >= 0 and self.holdout_bootstrap >= 0,
             "holdout_z and holdout_bootstrap must be >= 0"),
            (not self.chance_correction or self.abs_normalizer == "room",
             "chance_correction needs abs_normalizer 'room' (the chance level is k·room/N)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
