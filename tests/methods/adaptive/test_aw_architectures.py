"""Every adaptive architecture of specs/awnn.md §4 trains on the CPU through the real trainer, changes
width, truncates, and exports to a plain model computing the same function."""

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
                          {"lambda0": 0.1, "activation": "leaky_relu", "adaptive_channels": True},
                          AdaptiveResNet),
    "rnn": ("digits_seq", {"subset": 256}, "rnn", {"hidden_size": 16, "depth": 1}, {"lambda0": 0.1},
            AdaptiveRNN),
    "gin": ("synthetic_graphs", {"n_graphs": 150}, "gin", {"embed_dim": 16, "layers": 3},
            {"lambda0": 0.1, "activation": "leaky_relu"}, AdaptiveGIN),
    "transformer": ("seq2seq", {"n_train": 128, "n_val": 32, "n_test": 32, "max_len": 6}, "transformer",
                    {"d_model": 16, "heads": 2, "layers": 1, "dropout": 0.0},
                    {"lambda0": 0.1, "activation": "relu", "sigma_theta": None}, AdaptiveTransformer),
}


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
    # Every adaptive MLP starts at D(0.1) = 25; adaptive channels at the trunk's widths 4, 8, 16.
    assert all(w == 25 if ("mid" not in k) else w == 4 * 2 ** (int(k[5]) - 1) for k, w in start.items())
    cfg = TrainConfig(epochs=1, batch_size=32, optimizer=OptimConfig(name="adam", lr=0.05),
                      checkpoint_every=0, progress="none", select_best=False, max_steps=6)
    res = Trainer(model, data, cfg, plan.callbacks).fit()
    assert res.status == "done", res.error
    assert model.widths() != start and plan.summary["resizes"] > 0
    # Truncate the trained model to half width, then export it: same function, no adaptive parameters.
    model.eval()
    x = first_batch(data)
    trained = model.widths()
    truncate(model, fraction=0.5, renormalize=False)
    assert model.widths() == {k: max(1, round(w / 2)) for k, w in trained.items()}
    assert [s.name for s in collect_sites(model)] == list(trained)
    want = model(x)
    dense = export_dense(model)
    dense.eval()
    assert torch.allclose(dense(x), want, atol=1e-4, rtol=1e-4)
    assert not any(".dist." in n for n, _ in dense.named_parameters())
