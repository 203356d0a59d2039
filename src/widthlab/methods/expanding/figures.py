"""The 1-D regression figure of SENN experiment 1: the fit, the data and where the neurons sit.

A first-layer neuron computes σ(w x + b); its rational bump is centred where the pre-activation is 0,
i.e. at x = −b/w, and has a width of about 1/|w| in input units (Mitchell et al. 2023; Fig. 2 of the
paper plots new neurons over this location/scale plane). Later layers have no position in input space.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


def neuron_positions(model: nn.Module) -> list[dict[str, float]]:
    """Centre −b/w and scale 1/|w| of each first-layer neuron of a 1-input network (with its age order)."""
    layer = model.layers[0]
    if layer.in_features != 1 or model.depth == 0:
        return []
    w = layer.weight.detach().double().reshape(-1)
    b = layer.bias.detach().double()
    out = []
    for i, (wi, bi) in enumerate(zip(w.tolist(), b.tolist())):
        centre = -bi / wi if wi != 0 else float("nan")
        out.append({"index": i, "centre": centre, "scale": 1 / abs(wi) if wi != 0 else float("inf")})
    return out


@torch.no_grad()
def save_regression1d(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                      y_test: torch.Tensor, folder: str | Path, log: list[dict] | None = None) -> Path | None:
    """Write ``senn_fit.png`` and ``senn_neurons.json`` into ``folder``; None if not a 1-D regression."""
    if x_train.reshape(len(x_train), -1).shape[1] != 1 or y_train.reshape(len(y_train), -1).shape[1] != 1:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ref = next(model.parameters())
    lo = float(torch.cat([x_train.flatten(), x_test.flatten()]).min()) - 0.5
    hi = float(torch.cat([x_train.flatten(), x_test.flatten()]).max()) + 0.5
    grid = torch.linspace(lo, hi, 600, dtype=ref.dtype, device=ref.device)[:, None]
    fit = model(grid).flatten().cpu()
    order = torch.argsort(x_test.flatten())
    pos = neuron_positions(model)
    fig, ax = plt.subplots(figsize=(7.5, 4.3), dpi=110)
    ax.plot(x_test.flatten()[order].cpu(), y_test.flatten()[order].cpu(), color="0.6", lw=1.5,
            label="teacher")
    ax.plot(grid.flatten().cpu(), fit, color="C0", lw=1.8, label="network")
    ax.scatter(x_train.flatten().cpu(), y_train.flatten().cpu(), s=14, color="k", zorder=3, label="train")
    ymin, ymax = ax.get_ylim()
    for p in pos:
        if lo <= p["centre"] <= hi:
            ax.axvline(p["centre"], color="C3", alpha=0.5, lw=1)
    ax.set_ylim(ymin, ymax)
    ax.set_xlim(lo, hi)
    ax.set_xlabel("x")
    ax.set_title(f"fit and neuron centres −b/w (red), {len(pos)} neurons")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = folder / "senn_fit.png"
    fig.savefig(path)
    plt.close(fig)
    (folder / "senn_neurons.json").write_text(json.dumps({"neurons": pos, "events": log or []}, indent=1,
                                                         default=float))
    return path
