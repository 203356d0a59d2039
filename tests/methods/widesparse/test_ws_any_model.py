"""Wide & sparse (Golubeva et al. 2021, §2.3) on models widthlab did not build, from a plain loop: a wider
copy of each user model (an ``nn.Sequential`` MLP, a ResNet-style CNN with BatchNorm, a Transformer
block with a wider feed-forward layer, a user-written forward) is brought to exactly the base's weight
count by ``allocate`` + ``sparsify``, trains, and its removed weights stay exactly zero."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from user_models import EncoderBlock, ResNet, TwoTowers, sequential_mlp
from widthlab import allocate, sparsify
from widthlab.models.counting import count_nonzero_weights, count_weights, counted_layers
from widthlab.nn.masked import MaskedMixin

CASES = {  # (base, wider member, inputs, classes)
    "sequential": (lambda: sequential_mlp((16, 12)), lambda: sequential_mlp((32, 24)),
                   lambda: torch.randn(32, 5), 3),
    "resnet": (lambda: ResNet((8, 16)), lambda: ResNet((16, 32)), lambda: torch.randn(8, 3, 8, 8), 4),
    "transformer": (lambda: EncoderBlock(ff=32), lambda: EncoderBlock(ff=128), lambda: torch.randn(8, 5, 6),
                    3),
    "custom-forward": (lambda: TwoTowers(10), lambda: TwoTowers(40), lambda: torch.randn(32, 6), 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_wider_user_model_keeps_the_base_weight_count_and_its_zeros(case):
    base, wider, inputs, classes = CASES[case]
    torch.manual_seed(0)
    N0 = count_weights(base())
    model, x = wider(), inputs()
    y = torch.randint(0, classes, (x.shape[0],))
    assert count_weights(model) > N0
    alloc = allocate(model, N0)
    sparsify(model, {n: k for n, k in alloc.removals.items() if k}, seed=0)
    assert count_nonzero_weights(model) == N0  # exactly the base's budget, at the wider width
    masked = {n: m for n, m in counted_layers(model) if isinstance(m, MaskedMixin)}
    assert masked
    zeros = {n: m.weight.detach() == 0 for n, m in masked.items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    for n, m in masked.items():  # removed weights get zero gradients and stay exactly zero
        assert torch.all(m.weight.detach()[zeros[n]] == 0), n
    assert count_nonzero_weights(model) == N0
