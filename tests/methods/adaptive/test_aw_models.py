"""The plain fixed-width baselines added for the adaptive experiments (rnn, gin, transformer): they build
from the registry, run forward/backward, and their width sites resize through the core surgery."""

import pytest
import torch

from widthlab.data.graphs import collate_graphs, synthetic_graphs
from widthlab.data.seq2seq import reverse_substitute
from widthlab.models import count_weights, create_model
from widthlab.nn.surgery import resize


def inputs(name):
    g = torch.Generator().manual_seed(0)
    if name == "rnn":
        return (5, 3), 4, {"width": 6, "hidden_size": 7}, torch.randn(16, 5, 3, generator=g)
    if name == "gin":
        graphs, labels = synthetic_graphs(16, generator_seed=1)
        batch, _ = collate_graphs([(gr, int(y)) for gr, y in zip(graphs, labels)])
        return (1,), 3, {"width": 6, "embed_dim": 8, "layers": 3}, batch
    x, _, _ = reverse_substitute(16, vocab_size=10, min_len=2, max_len=5, generator_seed=0)
    options = {"width": 12, "d_model": 8, "heads": 2, "layers": 1, "dropout": 0.0}
    return (2, 6), 10, options, torch.from_numpy(x)


@pytest.mark.parametrize("name", ["rnn", "gin", "transformer"])
def test_plain_baseline_forward_backward_and_surgery(name):
    torch.manual_seed(0)
    shape, n_out, options, x = inputs(name)
    model = create_model(name, input_shape=shape, num_outputs=n_out, **options)
    model.eval()
    out = model(x)
    assert out.shape[0] == 16 and out.shape[-1] == n_out
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert count_weights(model) > 0
    sites = model.width_sites()
    assert set(model.widths()) == {s.name for s in sites} and sites
    # Growing a site with zero outgoing weights keeps the function.
    before = model(x).detach()
    ev = resize(model, sites[0].name, n_new=3, init_out="zeros", generator=torch.Generator().manual_seed(0))
    assert ev and model.widths()[sites[0].name] == sites[0].width
    assert torch.allclose(model(x), before, atol=1e-5)


def test_bad_input_shapes_are_named():
    with pytest.raises(ValueError, match="rnn needs sequence inputs"):
        create_model("rnn", input_shape=(3,), num_outputs=2)
    with pytest.raises(ValueError, match="transformer needs"):
        create_model("transformer", input_shape=(3, 4), num_outputs=5)
    with pytest.raises(ValueError, match="divisible"):
        create_model("transformer", input_shape=(2, 4), num_outputs=5, d_model=10, heads=3)


def test_transformer_embeddings_have_the_scale_of_the_positions():
    """Embeddings are multiplied by sqrt(d_model): drawn with std d_model^-1/2 they add to the unit-scale
    sinusoidal positions at the same scale (N(0, 1) would drown the positions and stall reordering)."""
    torch.manual_seed(0)
    model = create_model("transformer", input_shape=(2, 13), num_outputs=512, d_model=64)
    scaled = model.embed.weight[1:].detach() * 64**0.5
    assert scaled.std().item() == pytest.approx(1.0, rel=0.05)
    assert model.positions.abs().max().item() == pytest.approx(1.0, abs=1e-6)
    assert model.embed.weight[0].abs().max().item() == 0.0  # PAD
