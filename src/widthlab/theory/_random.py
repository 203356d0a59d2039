"""Seeded, independent random streams for the theory Monte Carlo."""

from __future__ import annotations

import hashlib

import torch


def make_generator(seed: int | torch.Generator, stream: str) -> torch.Generator:
    """A CPU generator for one random stream, or the given generator itself (callers chain draws).

    An int seed is mixed with the stream name, so that, e.g., pairs drawn with seed 0 and networks
    drawn with seed 0 are independent: a plain ``manual_seed(0)`` for both would make the first
    network's rows equal to the first inputs.
    """
    if isinstance(seed, torch.Generator):
        return seed
    digest = hashlib.blake2b(f"widthlab.theory/{stream}/{int(seed)}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def bernoulli_mask(shape: tuple[int, ...], p: float, generator: torch.Generator) -> torch.Tensor:
    """Bool mask with entries i.i.d. Bernoulli(p), exact to 2^-53 at any p.

    ``rand < p`` keeps an entry with probability ceil(p / q) q for uniforms on a grid of step q:
    float32 uniforms (q = 2^-24) would keep every entry with probability >= 2^-24 whatever p, and bias
    p ~ 4e-6 by up to 1.5%, so the uniforms are float64 (q = 2^-53).
    """
    return torch.rand(shape, generator=generator, dtype=torch.float64) < p
