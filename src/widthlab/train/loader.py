"""Mini-batches with a shuffle order that depends only on (seed, epoch).

Seeding the order per epoch, instead of drawing from one long-lived generator, is what makes resume
exact: a run restarted at epoch e sees the same batches as one that never stopped.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset


def epoch_generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    g = torch.Generator()
    # Large odd multipliers keep (seed, epoch, salt) triples from colliding for realistic ranges.
    g.manual_seed((seed * 1_000_003 + epoch * 7_919 + salt * 104_729) % (2**63 - 1))
    return g


def dataset_len(ds: Dataset) -> int:
    return len(ds)  # type: ignore[arg-type]


def num_batches(ds: Dataset, batch_size: int) -> int:
    return -(-dataset_len(ds) // batch_size)


def batches(ds: Dataset, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
            num_workers: int = 0, collate=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches.

    In-memory ``TensorDataset``s are sliced directly (a DataLoader's per-sample collation costs more
    than a small model's whole step); other datasets go through a DataLoader with the same order.
    """
    n = dataset_len(ds)
    order = torch.randperm(n, generator=generator) if shuffle else None
    if isinstance(ds, TensorDataset):
        x, y = ds.tensors[0], ds.tensors[1]
        for i in range(0, n, batch_size):
            if order is None:
                yield x[i:i + batch_size], y[i:i + batch_size]
            else:
                idx = order[i:i + batch_size]
                yield x[idx], y[idx]
        return
    sampler = order.tolist() if order is not None else None
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=num_workers,
                        collate_fn=collate)
    yield from loader
