"""Exact-k masks (Golubeva et al. 2021, §2: uniformly random static masks with an exact zero count): zero
counts, uniformity, seeding, the io_only variant."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

from widthlab.methods.widesparse.masks import MASK_STREAM, io_only_pairs, layer_generator, random_mask


@pytest.mark.parametrize("shape, k", [((7, 5), 0), ((7, 5), 1), ((7, 5), 34), ((16, 8, 3, 3), 1000),
                                      ((10, 784), 7_000)])
def test_exact_zero_count(shape, k):
    m = random_mask(shape, k, generator=layer_generator(0, "x"))
    assert m.dtype == torch.bool and tuple(m.shape) == shape
    assert int((~m).sum()) == k


def test_bad_k():
    with pytest.raises(ValueError):
        random_mask((3, 3), 10, generator=layer_generator(0, "x"))


def test_same_seed_same_mask_other_seed_or_layer_differs():
    a = random_mask((32, 16, 3, 3), 3000, generator=layer_generator(7, "layer1.0.conv1"))
    b = random_mask((32, 16, 3, 3), 3000, generator=layer_generator(7, "layer1.0.conv1"))
    c = random_mask((32, 16, 3, 3), 3000, generator=layer_generator(8, "layer1.0.conv1"))
    d = random_mask((32, 16, 3, 3), 3000, generator=layer_generator(7, "layer1.0.conv2"))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)


def test_zero_positions_are_uniform_over_every_marginal():
    # Chi-square over the out, in, kh and kw marginals of the zeros pooled over 40 independent masks:
    # each marginal bin expects k * 40 / size zeros. Fixed seeds, so the test is deterministic.
    shape, k, draws = (12, 10, 3, 3), 300, 40
    zeros = torch.zeros(shape)
    for s in range(draws):
        zeros += (~random_mask(shape, k, generator=layer_generator(s, "conv"))).float()
    assert zeros.sum() == k * draws
    for dim in range(4):
        observed = zeros.sum(dim=[d for d in range(4) if d != dim]).numpy()
        p = stats.chisquare(observed).pvalue
        assert p > 1e-3, (dim, observed, p)
    # Every single position is hit at the rate k / N (binomial), not e.g. only the leading block.
    rate = zeros.flatten().numpy() / draws
    assert abs(rate.mean() - k / zeros.numel()) < 1e-9
    assert stats.chisquare(np.bincount(np.arange(zeros.numel()) % 9, weights=zeros.flatten().numpy())
                           ).pvalue > 1e-3


def test_io_only_constant_across_kernel_positions():
    shape = (8, 6, 3, 3)
    m = random_mask(shape, 9 * 20 + 4, generator=layer_generator(0, "c"), io_only=True)
    assert torch.equal(m, m[:, :, :1, :1].expand(shape))  # whole kernels in or out
    assert int((~m).sum()) == 9 * io_only_pairs(9 * 20 + 4, shape) == 9 * 20
    assert io_only_pairs(9 * 20 + 5, shape) == 21  # rounds to the nearest kernel count
    # A linear layer has kernel area 1: io_only is the plain exact-k mask.
    lin = random_mask((5, 4), 7, generator=layer_generator(0, "l"), io_only=True)
    assert int((~lin).sum()) == 7


def _mask_in_new_process(hash_seed: str) -> str:
    """The initial seed and the first mask of layer "layers.0" of run seed 3, drawn in a fresh Python
    process whose str hashes are salted with ``hash_seed``."""
    code = ("from widthlab.methods.widesparse.masks import layer_generator, random_mask\n"
            "g = layer_generator(3, 'layers.0')\n"
            "print(g.initial_seed(), random_mask((8, 8), 20, generator=g).flatten().tolist())")
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout


def test_generator_is_stable_across_processes():
    """The mask of a layer is a function of (seed, name) alone: two processes with differently salted
    str hashes (so Python's hash() of the name differs) draw the same seed and the same mask, and that
    mask is the one this process draws; another name or stream gives another seed."""
    a, b = _mask_in_new_process("1"), _mask_in_new_process("2")
    assert a == b and a.strip()
    g = layer_generator(3, "layers.0")
    assert a.split()[0] == str(g.initial_seed())
    assert a.split(" ", 1)[1].strip() == str(random_mask((8, 8), 20, generator=g).flatten().tolist())
    keys = [(3, "layers.0", 0), (3, "layers.1", 0), (3, "layers.0", 1), (4, "layers.0", 0)]
    seeds = {layer_generator(seed, name, stream=MASK_STREAM + k).initial_seed() for seed, name, k in keys}
    assert len(seeds) == 4
