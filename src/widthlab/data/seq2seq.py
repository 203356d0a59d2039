"""A synthetic sequence-to-sequence task for the encoder-decoder Transformer (Errica et al. 2025,
architectures and experiments).

Multi30K cannot be held here (no download, no tokenizer), so the Transformer experiment runs on a
task with the same interface: translate a random token sequence into its *reverse*, each token mapped
through a fixed random substitution table. Solving it needs attention over the whole source (reversal)
and a per-token lookup (the substitution, which the feed-forward blocks can hold), and teacher forcing
makes it learnable in minutes on a CPU.

Token ids: 0 = PAD (as in the paper's data), 1 = BOS, 2 = EOS, 3..V-1 = words. One example is stored as
``x`` (2, L) int64 = (source, decoder input = BOS + target[:-1]) padded with 0, and ``y`` (L,) int64 =
target + EOS padded with -100 (ignored by the token-level loss and accuracy). Models read ``x[:, 0]`` and
``x[:, 1]``; outputs are (B, L, V) logits.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from widthlab.data.base import TaskData

PAD, BOS, EOS = 0, 1, 2
IGNORE_INDEX = -100  # targets the loss and accuracy skip (torch's cross_entropy default)


def reverse_substitute(n: int, *, vocab_size: int = 32, min_len: int = 4, max_len: int = 12,
                       generator_seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw ``n`` pairs; returns (x (n, 2, L), y (n, L), substitution table) with L = max_len + 1."""
    if vocab_size < 5 or not 1 <= min_len <= max_len:
        raise ValueError(f"need vocab_size >= 5 and 1 <= min_len <= max_len, got {vocab_size}, "
                         f"{min_len}, {max_len}")
    rs = np.random.RandomState(generator_seed)
    words = np.arange(3, vocab_size)
    table = np.zeros(vocab_size, dtype=np.int64)
    table[3:] = rs.permutation(words)
    L = max_len + 1
    x = np.full((n, 2, L), PAD, dtype=np.int64)
    y = np.full((n, L), IGNORE_INDEX, dtype=np.int64)
    for i in range(n):
        m = rs.randint(min_len, max_len + 1)
        src = rs.choice(words, m)
        tgt = table[src[::-1]]
        x[i, 0, :m] = src
        x[i, 1, 0] = BOS
        x[i, 1, 1:m + 1] = tgt
        y[i, :m] = tgt
        y[i, m] = EOS
    return x, y, table


def load_seq2seq(n_train: int = 4000, n_val: int = 500, n_test: int = 500, vocab_size: int = 32,
                 min_len: int = 4, max_len: int = 12, generator_seed: int = 0, seed: int = 0) -> TaskData:
    """Reverse-and-substitute translation (module docstring) as a TaskData; each split a separate draw
    from one stream (train, then validation, then test).

    Args:
        n_train, n_val, n_test: pairs per split.
        vocab_size: V, including PAD, BOS and EOS.
        min_len, max_len: source length range.
        generator_seed: numpy seed of the table and the pairs; ``seed`` (the common split seed) is
            added to it so that seeds of a study draw different data.
    """
    n = n_train + n_val + n_test
    x, y, table = reverse_substitute(n, vocab_size=vocab_size, min_len=min_len, max_len=max_len,
                                     generator_seed=generator_seed + seed)
    parts = np.split(np.arange(n), [n_train, n_train + n_val])
    ds = [TensorDataset(torch.from_numpy(x[p]), torch.from_numpy(y[p])) for p in parts]
    meta = {"generator": "reverse + substitution", "vocab_size": vocab_size, "pad": PAD, "bos": BOS,
            "eos": EOS,
            "lengths": [min_len, max_len], "generator_seed": generator_seed + seed,
            "sizes": {"train": n_train, "val": n_val, "test": n_test}}
    return TaskData(name="seq2seq", task="classification", train=ds[0], val=ds[1], test=ds[2],
                    input_shape=(2, max_len + 1), num_outputs=vocab_size, meta=meta)
