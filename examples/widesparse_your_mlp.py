"""Your own MLP made wide & sparse, trained in a plain PyTorch loop on scikit-learn's bundled digits.

Wide & sparse (Golubeva, Gur-Ari, Neyshabur, ICLR 2021, Section 2): take a dense base network of width
w0 with N(w0) weights, build the same network at a larger width w, and remove exactly
T = N(w) - N(w0) weights at random, once, before training. The wide member then has as many weights
as the base, spread over more units. Which layers lose how many weights is the paper's allocation
"according to layer size" (Appendix B), which is a cap: the largest layers are cut down first.

Three library calls do it for any ``nn.Module`` whose layers are ``nn.Linear`` / ``nn.Conv2d``:

1. ``count_weights(base)`` - N(w0), counting Linear/Conv weights only, no biases (Appendix A);
2. ``allocate(wide, N0)`` - k_l weights to remove from each layer, summing to exactly T;
3. ``sparsify(wide, removals, seed=...)`` - exact-count random masks (Section 2.3) and the fan-in
   corrected initialisation U(+-1/sqrt(fan_in * c_l)).

Masked layers compute with W * M, so masked weights get exactly zero gradients; re-applying the masks
after each optimizer step keeps them zero under any optimizer.

Run: ``python examples/widesparse_your_mlp.py`` (a few seconds on a CPU).
"""

from __future__ import annotations

import torch
from torch import nn

from widthlab.data.registry import load_dataset
from widthlab.methods.widesparse import allocate, sparsify
from widthlab.models.counting import count_nonzero_weights, count_weights
from widthlab.nn.masked import masked_layers

BASE_WIDTH = 32  # w0: the dense base whose weight count every member keeps
WIDE_WIDTH = 96  # w: the wide member, 3x wider, same number of weights
EPOCHS = 8


class MyMLP(nn.Module):
    """An ordinary two-hidden-layer MLP: nothing widthlab-specific in it."""

    def __init__(self, n_in: int, width: int, n_out: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.head = nn.Linear(width, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def as_tensors(split) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(split[i] for i in range(len(split))))
    return torch.stack(xs).float(), torch.as_tensor(ys)


def train(model: nn.Module, data, epochs: int, seed: int) -> float:
    """Adam, cross-entropy, minibatches of 64; returns the test accuracy."""
    x, y = as_tensors(data.train)
    x_test, y_test = as_tensors(data.test)
    masked = [layer for _, layer in masked_layers(model)]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            for layer in masked:  # cheap guard: a masked weight stays exactly zero
                layer.apply_mask_()
    model.eval()
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item()


def main() -> None:
    data = load_dataset("digits")  # 8x8 images as 64 standardised features, 10 classes; no download
    n_in, n_out = data.input_shape[0], data.num_outputs

    torch.manual_seed(0)
    base = MyMLP(n_in, BASE_WIDTH, n_out)
    N0 = count_weights(base)

    torch.manual_seed(0)
    wide = MyMLP(n_in, WIDE_WIDTH, n_out)
    N = count_weights(wide)
    alloc = allocate(wide, N0)  # k_l per layer name, sum = N - N0
    removals = {name: k for name, k in alloc.removals.items() if k}
    sparsify(wide, removals, seed=0)

    nonzero = count_nonzero_weights(wide)
    print(f"base   w0={BASE_WIDTH:4d}: {N0:6,d} weights")
    print(f"wide   w ={WIDE_WIDTH:4d}: {N:6,d} dense weights, {nonzero:,d} kept "
          f"(connectivity {nonzero / N:.3f})")
    for name, k in alloc.removals.items():
        print(f"  {name:8s} {alloc.sizes[name]:6,d} weights, {k:6,d} removed")
    assert nonzero == N0, "the wide & sparse member keeps exactly the base's weight count"

    acc_base = train(base, data, EPOCHS, seed=0)
    acc_wide = train(wide, data, EPOCHS, seed=0)
    assert count_nonzero_weights(wide) == N0, "masked weights stayed zero through training"
    print(f"test accuracy: dense base {acc_base:.3f}, wide & sparse {acc_wide:.3f} "
          f"(same {N0:,d} weights)")


if __name__ == "__main__":
    main()
