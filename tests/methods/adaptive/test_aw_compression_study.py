"""adaptive-compression-spiralhard: online compression (Errica et al. 2025, §5 and the annealing
ablation) as a paired study -- the uncompressed and the compressed run per seed, identical but for
the annealed lambda prior, whose mean sits on the target width so that the prior's pull vanishes there.
"""

import math

from widthlab.studies.load import expand_runs, load_study


def test_study_pairs_each_seed_with_its_uncompressed_run():
    runs = expand_runs(load_study("adaptive-compression-spiralhard"))
    assert sorted(r.seed for r in runs) == [0, 0, 1, 1, 2, 2]  # >= 3 seeds, both arms
    plain = [r for r in runs if r.spec.method.options().get("prior_lambda") is None]
    comp = [r for r in runs if r.spec.method.options().get("prior_lambda") is not None]
    assert len(plain) == len(comp) == 3
    for r in plain:
        assert r.spec.method.options().get("anneal") is None
    for a, b in zip(sorted(plain, key=lambda r: r.seed), sorted(comp, key=lambda r: r.seed)):
        opts = dict(b.spec.method.options())
        opts.pop("prior_lambda"), opts.pop("anneal")
        assert opts == {k: v for k, v in a.spec.method.options().items() if v is not None}
        assert a.spec.train == b.spec.train and a.spec.model == b.spec.model


def test_prior_mean_is_the_target_width_and_anneals_to_a_tenth():
    (r, *_) = [r for r in expand_runs(load_study("adaptive-compression-spiralhard"))
               if r.spec.method.options().get("prior_lambda") is not None]
    mu, sigma0 = r.spec.method.options()["prior_lambda"]
    anneal = r.spec.method.options()["anneal"]
    # Exponential importance, k = 0.9: D(lam) = floor(ln 10 / lam) + 2 (Errica et al. 2025, §2).
    assert math.floor(math.log(10) / mu) + 2 == 309
    # The prior turns on after the network has learned its own width and ends well before the lr step.
    milestones = r.spec.train.schedule.milestones
    assert 0 < anneal["start"] < anneal["end"] < min(milestones) < r.spec.train.epochs
    assert anneal.get("alpha", 0.9) == 0.9 and sigma0 < mu
