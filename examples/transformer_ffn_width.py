"""A Transformer block's feed-forward width learned by backpropagation, on scikit-learn's bundled digits.

Each 8x8 digit is read as a sequence of 8 rows (tokens of 8 pixels). The model is an ordinary pre-norm
encoder block: an input projection to d_model, self-attention and a position-wise feed-forward network
d_model -> d_ff -> d_model, each added to the residual stream, then mean pooling and a classifier.

Of its widths only d_ff can change on its own: d_model is read by the attention (whose heads split it)
and is tied across the residual stream, so discovery reports it as fixed, with the reason. The
adaptive-width method (Errica et al., 2025; its Transformer experiment adapts exactly this width in
every feed-forward block) weighs the d_ff units by a learned importance distribution and
grows or cuts them at the tail as its rate lambda moves. Here d_ff starts at 64.

Run: ``python examples/transformer_ffn_width.py`` (a few seconds on a CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import widthlab
from widthlab.data.registry import load_dataset

EPOCHS = 6


class EncoderClassifier(nn.Module):
    """Input projection, one pre-norm encoder block (attention + feed-forward), mean pool, classifier."""

    def __init__(self, d_in: int = 8, d_model: int = 32, d_ff: int = 64, heads: int = 4, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(d_in, d_model)
        self.pos = nn.Parameter(torch.zeros(1, 8, d_model))
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Linear(d_ff, d_model))
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 8, 8) -> tokens (B, 8, 8)
        h = self.embed(x.flatten(1, 2)) + self.pos
        a = self.norm1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.ffn(self.norm2(h))
        return self.head(h.mean(1))


def as_tensors(split) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(split[i] for i in range(len(split))))
    return torch.stack(xs), torch.as_tensor(ys)


def main() -> None:
    data = load_dataset("digits", as_image=True)  # (1, 8, 8) images, 10 classes; no download
    x, y = as_tensors(data.train)
    x_test, y_test = as_tensors(data.test)

    torch.manual_seed(0)
    model = EncoderClassifier()
    found = widthlab.discover(model, x[:2])
    print("resizable:", [s.name for s in found.sites])
    for f in found.fixed:
        print(f"fixed    : {', '.join(f.producers)}: {f.reasons[0]}")

    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    # As in the paper's Transformer runs, plain cross-entropy: no weight prior (sigma_theta=None).
    aw = widthlab.AdaptiveWidth(model, optimizer, x[:2], sites=["ffn.0"], n_observations=len(x),
                                sigma_theta=None)
    g = torch.Generator().manual_seed(0)
    for epoch in range(EPOCHS):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = aw.loss(F.cross_entropy(model(x[idx]), y[idx]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            aw.step()
        model.eval()
        with torch.no_grad():
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        (lam,) = [s.scale.dist.lam.item() for s in aw.sites()]
        print(f"epoch {epoch + 1}: d_ff {aw.widths()['ffn.0']:3d} (lambda {lam:.4f}), "
              f"loss {loss.item():.3f}, test accuracy {acc:.3f}")
    assert model.ffn[0].out_features == model.ffn[2].in_features == aw.widths()["ffn.0"]


if __name__ == "__main__":
    main()
