"""A self-expanding network grown from a plain PyTorch loop on scikit-learn's bundled digits.

Self-expanding networks (Mitchell et al., 2023) start small and add a neuron when the natural expansion
score says the new capacity pays: the increase of the natural-gradient norm eta = g^T F^-1 g that the
candidate would bring, relative to its layer's eta (threshold tau) and to the loss's gradient
scale (threshold alpha). Candidates are drawn at random and refined by Langevin (MALA) steps on the
score; a new neuron enters with zero outgoing weights, so the network computes the same function at the
moment it grows.

``SelfExpanding`` drives the method's controller from your own loop: ``start()`` before training,
``epoch_end()`` after each epoch (an expansion event every ``cooldown`` epochs), and the optimizer it
was given is remapped after each insertion: Adam keeps the state of every old weight, and the new
neurons' moments start at m = 0, v = 1. The same object grows your own model too: at every width of
``nn.Linear``/``nn.Conv2d`` layers that ``torch.fx`` discovery finds (sites, and groups tied by residual
additions; ``examples/residual_network.py`` grows a ResNet's), candidates are scored through that
width's own operations (here a ReLU) and inserted with zero outgoing weights. Sizes are small so that
it runs in seconds.

Run: ``python examples/self_expanding_plain_loop.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from widthlab.data.registry import load_dataset
from widthlab.methods.expanding.model import ExpandableMLP
from widthlab.methods.expanding.plain_loop import SelfExpanding

EPOCHS = 6


def as_tensors(split) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(split[i] for i in range(len(split))))
    return torch.stack(xs), torch.as_tensor(ys)


def grow(net: nn.Module, x, y, x_test, y_test) -> None:
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    se = SelfExpanding(net, optimizer, (x, y), epochs=EPOCHS,
                       tau=0.03, alpha=0.0025,  # the expansion thresholds
                       cooldown=2, max_widths=[64],  # an event every 2 epochs; one layer, at most 64
                       proposals=16, mala_bursts=3, mala_steps=5, score_batch=256)  # few, cheap candidates
    se.start()  # the event before the first epoch
    print(f"after the first event: hidden widths {se.widths()}")

    g = torch.Generator().manual_seed(0)
    for epoch in range(EPOCHS):
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = F.cross_entropy(net(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        added = se.epoch_end()  # grows where the score passes; the optimizer is remapped
        with torch.no_grad():
            acc = (net(x_test).argmax(1) == y_test).float().mean().item()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {acc:.3f}, hidden widths "
              f"{se.widths()}" + (f" (+{len(added)} neurons)" if added else ""))
    s = se.summary()
    print(f"{s['neurons_added']} neurons added in {s['expansion_events']} events "
          f"({s['expansion_seconds']:.1f} s expanding)")


def main() -> None:
    data = load_dataset("digits", subset=600)  # 600 training images as 64 features, 10 classes
    x, y = as_tensors(data.train)
    x_test, y_test = as_tensors(data.test)

    print("the method's expandable MLP (a rational activation per neuron):")
    torch.manual_seed(0)
    grow(ExpandableMLP(64, 10, widths=[4]), x, y, x_test, y_test)  # one hidden layer of 4 neurons

    print("your own MLP:")
    torch.manual_seed(0)
    grow(nn.Sequential(nn.Linear(64, 4), nn.ReLU(), nn.Linear(4, 10)), x, y, x_test, y_test)


if __name__ == "__main__":
    main()
