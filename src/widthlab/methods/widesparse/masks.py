"""Static random masks with an exact number of zeros (Golubeva et al. 2021, §2.3).

A layer with N_l weights loses exactly k_l of them, chosen uniformly without replacement over all
dimensions of the weight tensor: (out, in, kh, kw) for convolutions, (out, in) for linear layers.
This is an exact-count random subset, not independent Bernoulli draws.

Variant ``io_only`` (Golubeva et al. 2021, §2.3, paper App. C): the subset is drawn over (out, in) channel
pairs and whole kh x kw kernels are removed, so k_l is rounded to a multiple of the kernel area.

Randomness: each layer draws from its own ``torch.Generator`` seeded by (seed, layer name), so a
layer's mask does not change when another layer's k changes, and the same seed always gives the same
masks (the official ResNet code never seeded its masks, the official code).
"""

from __future__ import annotations

import math
import zlib

import torch

# Stream tags, so the mask and the re-initialisation of one layer never share random numbers.
MASK_STREAM = 0
INIT_STREAM = 1


def layer_generator(seed: int, name: str, stream: int = MASK_STREAM) -> torch.Generator:
    """A CPU generator for layer ``name`` of a run with ``seed``; stable across Python processes.

    Args:
        seed: the run's (or the mask's) seed.
        name: the layer's qualified module name.
        stream: :data:`MASK_STREAM` or :data:`INIT_STREAM`.
    """
    g = torch.Generator()
    # crc32 rather than hash(): Python salts str hashes per process.
    key = (int(seed) * 1_000_003 + zlib.crc32(name.encode()) * 7_919 + stream * 104_729) % (2**63 - 1)
    g.manual_seed(key)
    return g


def kernel_area(shape: tuple[int, ...]) -> int:
    """kh * kw (1 for a linear layer): the number of weights one (out, in) pair holds."""
    return math.prod(shape[2:]) if len(shape) > 2 else 1


def io_only_pairs(k: int, shape: tuple[int, ...]) -> int:
    """Number of (out, in) pairs to remove so that ``pairs * kernel_area`` is nearest to ``k``.

    Rounds half up; the removal count then misses k by at most half a kernel area (Golubeva et al. 2021, §2.3
    allows up to one area).
    """
    area = kernel_area(shape)
    pairs = (2 * k + area) // (2 * area)
    return min(pairs, shape[0] * shape[1])


def random_mask(shape: tuple[int, ...], k: int, *, generator: torch.Generator,
                io_only: bool = False) -> torch.Tensor:
    """A bool mask of ``shape`` with exactly ``k`` False entries at uniformly random positions.

    Args:
        shape: the weight's shape, (out, in) or (out, in, kh, kw).
        k: number of weights to remove, 0 <= k <= prod(shape). With ``io_only`` the number removed is
            ``io_only_pairs(k, shape) * kernel_area(shape)``.
        generator: the source of randomness (CPU); see :func:`layer_generator`.
        io_only: draw (out, in) pairs and remove whole kernels (constant across kernel positions).

    Returns:
        bool tensor on the CPU, True where the weight is kept.
    """
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    if not 0 <= k <= n:
        raise ValueError(f"cannot remove {k} of {n} weights of a tensor of shape {shape}")
    if io_only and len(shape) > 2:
        pairs = io_only_pairs(k, shape)
        io = _exact_k_mask(shape[0] * shape[1], pairs, generator).view(shape[0], shape[1])
        return io.view(shape[0], shape[1], *([1] * (len(shape) - 2))).expand(shape).contiguous()
    return _exact_k_mask(n, k, generator).view(shape)


def _exact_k_mask(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    if k:
        # The first k entries of a uniform random permutation: a uniform k-subset without replacement.
        keep[torch.randperm(n, generator=generator)[:k]] = False
    return keep
