"""Data of the adaptive-width experiments: sequences from images, TU-format graphs, seq2seq pairs."""

import numpy as np
import pytest
import torch

from widthlab.data.graphs import collate_graphs, load_tu, read_tu
from widthlab.data.registry import dataset_options, load_dataset
from widthlab.data.seq2seq import BOS, EOS, IGNORE_INDEX, PAD, reverse_substitute
from widthlab.data.sequences import permutation, rows_as_sequence
from widthlab.models.gin import mean_pool, sum_neighbours


def test_rows_as_sequence_with_and_without_permutation():
    imgs = np.arange(2 * 16, dtype=np.float32).reshape(2, 1, 4, 4)
    seq = rows_as_sequence(imgs, permute=False)
    assert seq.shape == (2, 4, 4) and np.array_equal(seq[1, 2], imgs[1, 0, 2])
    perm = rows_as_sequence(imgs, permute=True, perm_seed=42)
    p = permutation(16, 42)
    assert np.array_equal(perm.reshape(2, 16), imgs.reshape(2, 16)[:, p])  # one permutation for all images
    assert np.array_equal(p, np.random.RandomState(42).permutation(16))
    d = load_dataset("digits_seq", permute=True)
    assert d.input_shape == (8, 8) and d.num_outputs == 10 and float(d.train.tensors[0].max()) <= 1.0


def write_tu(folder, name="TOY", node_labels=True):
    """Three graphs in the TU text format: a triangle (label 1), an edge (label -1), a 3-path (label 1)."""
    folder.mkdir()
    # Undirected edges listed in both directions, 1-based node ids over the collection.
    edges = [(1, 2), (2, 1), (2, 3), (3, 2), (1, 3), (3, 1), (4, 5), (5, 4), (6, 7), (7, 6), (7, 8), (8, 7)]
    (folder / f"{name}_A.txt").write_text("".join(f"{a}, {b}\n" for a, b in edges))
    (folder / f"{name}_graph_indicator.txt").write_text("1\n1\n1\n2\n2\n3\n3\n3\n")
    (folder / f"{name}_graph_labels.txt").write_text("1\n-1\n1\n")
    if node_labels:
        (folder / f"{name}_node_labels.txt").write_text("0\n2\n0\n2\n2\n0\n0\n5\n")


def test_tu_reader_and_collate(tmp_path):
    write_tu(tmp_path / "TOY")
    graphs, labels, meta = read_tu(tmp_path / "TOY")
    assert meta["tu_name"] == "TOY" and meta["node_features"] == "labels"
    assert labels.tolist() == [1, 0, 1] and meta["class_values"] == [-1, 1]
    assert [g.num_nodes for g in graphs] == [3, 2, 3]
    assert graphs[0].x.shape == (3, 3)  # one-hot over the 3 distinct node labels {0, 2, 5}
    assert graphs[2].x.argmax(1).tolist() == [0, 0, 2]
    assert sorted(map(tuple, graphs[2].edge_index.T.tolist())) == [(0, 1), (1, 0), (1, 2), (2, 1)]
    gb, y = collate_graphs([(g, int(lab)) for g, lab in zip(graphs, labels)])
    assert gb.num_graphs == 3 and gb.batch.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert gb.edge_index.max() == 7 and y.tolist() == [1, 0, 1]
    tail = gb[1:]  # slicing graphs, as tensors slice examples
    assert tail.num_graphs == 2 and tail.batch.tolist() == [0, 0, 1, 1, 1]
    assert tail.edge_index.min() == 0 and tail.edge_index.max() == 4 and tail.x.shape == (5, 3)
    deg = sum_neighbours(torch.ones(8, 1), gb.edge_index).flatten().tolist()
    assert deg == [2, 2, 2, 1, 1, 1, 2, 1]
    assert mean_pool(torch.arange(8.0).unsqueeze(1), gb.batch, gb.counts, 3).flatten().tolist() == [1, 3.5, 6]
    # Constant features when the files have none (REDDIT-BINARY).
    write_tu(tmp_path / "BARE", name="BARE", node_labels=False)
    g2, _, m2 = read_tu(tmp_path / "BARE")
    assert m2["node_features"] == "constant" and g2[0].x.tolist() == [[1.0]] * 3


def test_tu_task_splits_and_errors(tmp_path):
    folder = tmp_path / "T"
    folder.mkdir()
    lines_a, ind, lab = [], [], []
    node = 1
    for g in range(40):  # 40 path graphs of 3..6 nodes, 2 classes
        n = 3 + g % 4
        for i in range(n - 1):
            lines_a += [f"{node + i}, {node + i + 1}", f"{node + i + 1}, {node + i}"]
        ind += [g + 1] * n
        lab.append(g % 2)
        node += n
    (folder / "T_A.txt").write_text("\n".join(lines_a) + "\n")
    (folder / "T_graph_indicator.txt").write_text("\n".join(map(str, ind)) + "\n")
    (folder / "T_graph_labels.txt").write_text("\n".join(map(str, lab)) + "\n")
    data = load_tu(str(folder), fold=3, folds=10)
    assert len(data.test) == 4 and len(data.train) + len(data.val) == 36
    assert data.collate is collate_graphs and data.input_shape == (1,)
    again = load_dataset("tu", path=str(folder), fold=3)
    assert [data.test[i][1] for i in range(4)] == [again.test[i][1] for i in range(4)]
    with pytest.raises(FileNotFoundError, match="missing folder"):
        load_tu(str(tmp_path / "nope"))
    (folder / "T_graph_labels.txt").write_text("0\n1\n")
    with pytest.raises(ValueError, match="graph labels"):
        read_tu(folder)
    assert "fold" in dataset_options("tu") and "n_graphs" in dataset_options("synthetic_graphs")


def test_seq2seq_pairs():
    x, y, table = reverse_substitute(50, vocab_size=12, min_len=2, max_len=5, generator_seed=3)
    assert x.shape == (50, 2, 6) and y.shape == (50, 6)
    for i in range(50):
        m = int((x[i, 0] != PAD).sum())
        src = x[i, 0, :m]
        assert y[i, :m].tolist() == table[src[::-1]].tolist() and y[i, m] == EOS
        assert (y[i, m + 1:] == IGNORE_INDEX).all()
        assert x[i, 1, 0] == BOS and x[i, 1, 1:m + 1].tolist() == y[i, :m].tolist()
    d = load_dataset("seq2seq", n_train=20, n_val=5, n_test=5)
    assert d.input_shape == (2, 13) and d.num_outputs == 32 and d.train.tensors[0].dtype == torch.int64
