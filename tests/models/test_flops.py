"""Training-compute estimates against closed forms (2 x multiply-adds of the weight layers)."""

import torch
from torch import nn

from conftest import make_blobs_task
from widthlab.models.flops import forward_flops, spatial_factors
from widthlab.train.compute import ComputeMeter
from widthlab.train.config import TrainConfig
from widthlab.train.trainer import Trainer


def test_mlp_and_conv_forward_flops():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    f = spatial_factors(mlp, torch.zeros(64))
    assert forward_flops(mlp, f) == 2 * (64 * 32 + 32 * 10)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, padding=1),
                         nn.Flatten(), nn.Linear(4 * 16 * 16, 10))
    f = spatial_factors(conv, torch.zeros(3, 32, 32))
    expect = 2 * (8 * 3 * 9 * 32 * 32 + 4 * 8 * 9 * 16 * 16 + 4 * 16 * 16 * 10)
    assert forward_flops(conv, f) == expect


def test_masked_layer_counts_its_mask_and_tokenwise_linear_its_length():
    lin = nn.Linear(10, 6)
    lin.register_buffer("weight_mask", torch.rand(6, 10) < 0.3)
    m = nn.Sequential(lin)
    f = spatial_factors(m, torch.zeros(7, 10))  # a sequence of 7 tokens
    assert f == {"0": 7}
    assert forward_flops(m, f) == 2 * 7 * int(lin.weight_mask.sum())
    assert forward_flops(m, f, nonzero=False) == 2 * 7 * 60


def test_meter_over_a_fit_is_three_forwards_per_example_seen():
    data = make_blobs_task(n=96)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    meter = ComputeMeter()
    Trainer(model, data, TrainConfig(epochs=2, batch_size=32, progress="none"), [meter]).fit()
    per_example = 2 * (8 * 16 + 16 * 3)
    assert meter.train_flops == 3 * per_example * 96 * 2 == meter.train_flops_dense


def test_selecting_an_earlier_best_epoch_keeps_the_compute_of_the_whole_run():
    data = make_blobs_task(n=96)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    meter = ComputeMeter()
    # Monitoring the epoch number, minimised: epoch 1 is the best, restored at the end.
    cfg = TrainConfig(epochs=3, batch_size=32, progress="none", select_best=True, monitor="epoch")
    res = Trainer(model, data, cfg, [meter]).fit()
    assert res.best_epoch == 1
    assert meter.train_flops == 3 * 2 * (8 * 16 + 16 * 3) * 96 * 3
