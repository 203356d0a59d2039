"""Every adaptive architecture of AWNN (Errica et al. 2025) trains on the CPU through the real trainer,
changes width, truncates, and exports to a plain model computing the same function."""

import pytest
import torch

from widthlab.data.registry import load_dataset
from widthlab.methods.adaptive.gin import AdaptiveGIN
from widthlab.methods.adaptive.layer import collect_sites
from widthlab.methods.adaptive.plan import build
from widthlab.methods.adaptive.resnet import AdaptiveResNet
from widthlab.methods.adaptive.rnn import AdaptiveRNN
from widthlab.methods.adaptive.transformer import AdaptiveTransformer
from widthlab.methods.adaptive.truncation import export_dense, truncate
from widthlab.models import create_model
from widthlab.train.config import OptimConfig, TrainConfig
from widthlab.train.trainer import Trainer

CASES = {
    # name: (dataset, dataset options, model, model options, method options, adaptive class)
    "resnet20-head": ("digits", {"as_image": True, "subset": 128}, "resnet20", {"width": 4},
                      {"lambda0": 0.1, "activation": "leaky_relu"}, AdaptiveResNet),
    "resnet20-channels": ("digits", {"as_image": True, "subset": 128}, "resnet20", {"width": 4},
                          {"lambda0": 0.1, "activation": "leaky_relu", "adaptive_channels": True,
                           "channels_lambda0": 0.1},
                          AdaptiveResNet),
    "rnn": ("digits_seq", {"subset": 256}, "rnn", {"hidden_size": 16, "depth": 1}, {"lambda0": 0.1},
            AdaptiveRNN),
    "gin": ("synthetic_graphs", {"n_graphs": 150}, "gin", {"embed_dim": 16, "layers": 3},
            {"lambda0": 0.1, "activation": "leaky_relu"}, AdaptiveGIN),
    "transformer": ("seq2seq", {"n_train": 128, "n_val": 32, "n_test": 32, "max_len": 6}, "transformer",
                    {"d_model": 16, "heads": 2, "layers": 1, "dropout": 0.0},
                    {"lambda0": 0.1, "activation": "relu", "sigma_theta": None}, AdaptiveTransformer),
}


class WidthLog:
    """Trainer callback (after the adaptive one) recording the live widths after every optimizer step."""

    def __init__(self):
        self.widths = []

    def on_step_end(self, trainer):
        self.widths.append(trainer.model.widths())


def first_batch(data, n=16):
    ds = data.test
    if data.collate is not None:
        return data.collate([ds[i] for i in range(min(n, len(ds)))])[0]
    return ds.tensors[0][:n]


@pytest.mark.parametrize("case", list(CASES))
def test_architecture_trains_changes_width_and_truncates(case):
    dname, dopts, mname, mopts, opts, cls = CASES[case]
    data = load_dataset(dname, **dopts)
    plain = create_model(mname, input_shape=data.input_shape, num_outputs=data.num_outputs, **mopts)
    plan = build(plain, data, seed=0, **opts)
    model = plan.model
    assert isinstance(model, cls)
    start = dict(plan.summary["initial_widths"])
    assert model.widths() == start
    # Every adaptive MLP starts at D(0.1) = 25, and so do the adaptive channels (channels_lambda0 0.1:
    # at the trunk's widths 4, 8, 16 their rates sit mid-way between thresholds far apart, and the
    # first few steps may not move some of them).
    assert all(w == 25 for w in start.values())
    if opts.get("adaptive_channels"):  # by default the channels start at the trunk's widths 4, 8, 16
        default = build(plain, data, seed=0, **{k: v for k, v in opts.items() if k != "channels_lambda0"})
        assert {k: w for k, w in default.summary["initial_widths"].items() if "mid" in k} == \
            {k: 4 * 2 ** (int(k[5]) - 1) for k in start if "mid" in k}
    # Every site's rate is used by the forward: each distribution parameter receives a non-zero gradient.
    x = first_batch(data)
    model(x).float().square().mean().backward()
    rates = {n: q for n, q in model.named_parameters() if ".dist." in n}
    assert len(rates) == len(start)  # one rate per site
    for n, q in rates.items():
        assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().item() > 0, n
    model.zero_grad(set_to_none=True)
    cfg = TrainConfig(epochs=1, batch_size=32, optimizer=OptimConfig(name="adam", lr=0.05),
                      checkpoint_every=0, progress="none", select_best=False, max_steps=6)
    log = WidthLog()
    res = Trainer(model, data, cfg, [*plan.callbacks, log]).fit()
    assert res.status == "done", res.error
    # Every site changed width at some step (a site may come back to its start by the end).
    seen = {k: {start[k], *(w[k] for w in log.widths)} for k in start}
    assert all(len(v) > 1 for v in seen.values()), {k: sorted(v) for k, v in seen.items()}
    assert plan.summary["resizes"] >= len(start)
    # Truncate the trained model to half width, then export it: same function, no adaptive parameters.
    model.eval()
    trained = model.widths()
    truncate(model, fraction=0.5, renormalize=False)
    assert model.widths() == {k: max(1, round(w / 2)) for k, w in trained.items()}
    assert [s.name for s in collect_sites(model)] == list(trained)
    want = model(x)
    dense = export_dense(model)
    dense.eval()
    assert torch.allclose(dense(x), want, atol=1e-4, rtol=1e-4)
    assert not any(".dist." in n for n, _ in dense.named_parameters())
