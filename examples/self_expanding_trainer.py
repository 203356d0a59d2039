"""A self-expanding network grown by widthlab's Trainer on bundled digits: the path a study takes.

Self-expanding networks (Mitchell et al., 2023) start small and add a neuron (or a layer) when the
natural expansion score says the new capacity pays: the increase Delta eta' of the natural-gradient
norm eta = g^T F^-1 g that the candidate would bring (Section 3), relative to the current eta of its
layer (threshold tau) and to the loss's gradient scale (threshold alpha). Candidates are drawn at
random and refined by Langevin (MALA) steps on the score; a new neuron enters with zero outgoing
weights, so the network's function is unchanged at the moment it grows.

Here the method's builder (the same one a study's ``method: {name: expanding, ...}`` calls) makes the
expandable MLP, its K-FAC natural-gradient optimizer and the expansion controller; widthlab's Trainer
runs them. Sizes are small so that it runs in seconds: a few proposals, short refinement.

Run: ``python examples/self_expanding_trainer.py``.
"""

from __future__ import annotations

from widthlab.data.registry import load_dataset
from widthlab.methods.expanding.plan import build
from widthlab.train.config import TrainConfig
from widthlab.train.trainer import Trainer, seed_everything


def main() -> None:
    data = load_dataset("digits", subset=600)  # 600 training images of 8x8 pixels, 10 classes
    seed_everything(0)
    plan = build(
        None, data, seed=0,
        start_widths=[4],  # one hidden layer of 4 neurons to start from
        max_widths=[64],  # at most one hidden layer, at most 64 neurons
        optimizer="kfac",  # K-FAC natural gradient (the paper's optimizer is CG: optimizer="cg")
        lr=0.1, damping=0.1,
        tau=0.03, alpha=0.0025,  # the expansion thresholds (the paper's MNIST-width setting)
        cooldown=2,  # epochs between width events
        proposals=16, mala_bursts=3, mala_steps=5,  # few, cheap candidates
        score_batch=256,
    )
    net = plan.model
    print(f"start: hidden widths {net.hidden_widths()}")
    config = TrainConfig(epochs=8, batch_size=64, progress="none", checkpoint_every=0, num_threads=1)
    result = Trainer(net, data, config, plan.callbacks).fit()
    print(f"end:   hidden widths {net.hidden_widths()} after {result.epochs} epochs")
    for key in ("neurons_added", "layers_added", "expansion_events"):
        print(f"  {key}: {plan.summary.get(key)}")
    print(f"test accuracy {result.final['test_accuracy']:.3f}")
    if result.status != "done":
        raise SystemExit(f"training stopped: {result.error}")


if __name__ == "__main__":
    main()
