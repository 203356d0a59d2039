"""Graph classification data in plain PyTorch: a batched-graph object, the TU text format, a synthetic task.

The adaptive-width GIN experiments (Errica et al. 2025, architectures and experiments) use NCI1 and
REDDIT-BINARY from the TU
collection. Here they are read from the user's files in the standard TU text format (no graph library,
no download): a folder holding ``DS_A.txt`` (one edge ``i, j`` per line, 1-based node ids over the whole
collection), ``DS_graph_indicator.txt`` (the graph id of every node), ``DS_graph_labels.txt`` (one label
per graph) and optionally ``DS_node_labels.txt`` (integer node labels, one-hot encoded: NCI1's 37
features) and ``DS_node_attributes.txt`` (comma-separated floats). Graphs without node data get the
constant feature 1 (REDDIT-BINARY, §4).

A batch is a :class:`GraphBatch` (all nodes of the batch stacked, edges offset, a node -> graph index)
produced by :func:`collate_graphs`, the ``TaskData.collate`` of these datasets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold
from torch.utils.data import Dataset

from widthlab.data.base import TaskData
from widthlab.data.splits import split_indices, take


@dataclass
class Graph:
    """One graph: node features x (n, F) float32 and directed edges (2, E) int64 (src, dst)."""

    x: torch.Tensor
    edge_index: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return int(self.x.shape[0])


@dataclass
class GraphBatch:
    """Several graphs as one disjoint graph.

    Attributes:
        x: (N, F) node features of all graphs, graph after graph.
        edge_index: (2, E) edges with node ids offset into ``x``.
        batch: (N,) graph index of every node.
        counts: (G,) float node counts per graph (for mean pooling).
        num_graphs: G, a host int (so pooling never reads the device).
        node_sizes, edge_sizes: nodes and edges of each graph, on the host (so slicing never reads
            the device).
    """

    x: torch.Tensor
    edge_index: torch.Tensor
    batch: torch.Tensor
    counts: torch.Tensor
    num_graphs: int
    node_sizes: tuple[int, ...] = ()
    edge_sizes: tuple[int, ...] = ()

    def to(self, device, non_blocking: bool = False) -> GraphBatch:
        return GraphBatch(*(t.to(device, non_blocking=non_blocking) for t in
                            (self.x, self.edge_index, self.batch, self.counts)), self.num_graphs,
                          self.node_sizes, self.edge_sizes)

    def __len__(self) -> int:
        return self.num_graphs

    def __getitem__(self, idx: slice) -> GraphBatch:
        """Graphs ``idx`` (a slice with step 1) as a batch of their own, like ``x[:k]`` for tensors."""
        if not isinstance(idx, slice):
            raise TypeError("a GraphBatch is indexed by a slice of graphs, e.g. batch[:4]")
        start, stop, step = idx.indices(self.num_graphs)
        if step != 1:
            raise ValueError("GraphBatch slices must have step 1")
        stop = max(stop, start)
        n0, n1 = sum(self.node_sizes[:start]), sum(self.node_sizes[:stop])
        e0, e1 = sum(self.edge_sizes[:start]), sum(self.edge_sizes[:stop])
        return GraphBatch(self.x[n0:n1], self.edge_index[:, e0:e1] - n0, self.batch[n0:n1] - start,
                          self.counts[start:stop], stop - start, self.node_sizes[start:stop],
                          self.edge_sizes[start:stop])


class GraphDataset(Dataset):
    """A list of graphs with integer labels; items are ``(Graph, label)``."""

    def __init__(self, graphs: list[Graph], labels: np.ndarray):
        self.graphs = graphs
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.graphs)

    def __getitem__(self, i: int) -> tuple[Graph, int]:
        return self.graphs[i], int(self.labels[i])

    def subset(self, idx: np.ndarray) -> GraphDataset:
        return GraphDataset([self.graphs[i] for i in idx], self.labels[idx])


def collate_graphs(items: list[tuple[Graph, int]]) -> tuple[GraphBatch, torch.Tensor]:
    """Stack graphs into one :class:`GraphBatch` and their labels into a (G,) tensor."""
    xs, edges, batch, counts = [], [], [], []
    offset = 0
    for g, (graph, _) in enumerate(items):
        n = graph.num_nodes
        xs.append(graph.x)
        edges.append(graph.edge_index + offset)
        batch.append(torch.full((n,), g, dtype=torch.int64))
        counts.append(n)
        offset += n
    y = torch.tensor([label for _, label in items], dtype=torch.int64)
    gb = GraphBatch(torch.cat(xs), torch.cat(edges, 1), torch.cat(batch),
                    torch.tensor(counts, dtype=torch.float32).clamp(min=1), len(items), tuple(counts),
                    tuple(int(e.shape[1]) for e in edges))
    return gb, y


# --------------------------------------------------------------------------------------------- TU format


def _read_ints(path: Path, what: str) -> np.ndarray:
    try:
        return np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=1)
    except ValueError as e:
        raise ValueError(f"{path}: cannot read {what} as integers ({e})") from None


def read_tu(path: str | Path, name: str | None = None, node_features: str = "auto"
            ) -> tuple[list[Graph], np.ndarray, dict]:
    """Read a TU-format dataset folder.

    Args:
        path: the folder with ``NAME_A.txt``, ``NAME_graph_indicator.txt``, ``NAME_graph_labels.txt``...
        name: the file prefix NAME; None infers it from the single ``*_A.txt`` in the folder.
        node_features: ``auto`` (attributes if present, else one-hot node labels, else constant 1),
            ``attributes``, ``labels``, ``constant`` or ``degree`` (one-hot degree, capped at 64).

    Returns:
        graphs, labels mapped to 0..C-1 (sorted original values), and facts for the record.

    Raises:
        FileNotFoundError: missing folder or file. ValueError: inconsistent files.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: missing folder (expected TU-format files NAME_A.txt, ...)")
    if name is None:
        found = sorted(folder.glob("*_A.txt"))
        if len(found) != 1:
            raise FileNotFoundError(f"{folder}: expected exactly one NAME_A.txt, found "
                                    f"{[f.name for f in found]}; pass option name")
        name = found[0].name[:-len("_A.txt")]

    def file(suffix: str, required: bool = True) -> Path | None:
        f = folder / f"{name}_{suffix}.txt"
        if not f.is_file():
            if required:
                raise FileNotFoundError(f"{f}: missing TU file")
            return None
        return f

    edges = _read_ints(file("A"), "edges").reshape(-1, 2) - 1
    indicator = _read_ints(file("graph_indicator"), "graph indicator") - 1
    raw_labels = _read_ints(file("graph_labels"), "graph labels")
    n_nodes, n_graphs = len(indicator), len(raw_labels)
    if indicator.min() < 0 or indicator.max() != n_graphs - 1:
        raise ValueError(f"{folder}: graph indicator ids span [{indicator.min() + 1}, {indicator.max() + 1}] "
                         f"but there are {n_graphs} graph labels")
    if len(edges) and (edges.min() < 0 or edges.max() >= n_nodes):
        raise ValueError(f"{folder}: edge endpoints exceed the {n_nodes} nodes of the graph indicator")
    if np.any(np.diff(indicator) < 0):
        raise ValueError(f"{folder}: nodes are not grouped by graph in {name}_graph_indicator.txt")
    classes, labels = np.unique(raw_labels, return_inverse=True)

    attr_file, label_file = file("node_attributes", False), file("node_labels", False)
    mode = node_features
    if mode == "auto":
        mode = "attributes" if attr_file else "labels" if label_file else "constant"
    if mode == "attributes":
        if attr_file is None:
            raise FileNotFoundError(f"{folder}: node_features='attributes' but {name}_node_attributes.txt "
                                    "is missing")
        feats = np.loadtxt(attr_file, delimiter=",", dtype=np.float32, ndmin=2)
    elif mode == "labels":
        if label_file is None:
            raise FileNotFoundError(f"{folder}: node_features='labels' but {name}_node_labels.txt is missing")
        node_labels = _read_ints(label_file, "node labels")
        _, inv = np.unique(node_labels, return_inverse=True)
        feats = np.eye(inv.max() + 1, dtype=np.float32)[inv]
    elif mode == "degree":
        deg = np.bincount(edges[:, 1], minlength=n_nodes) if len(edges) else np.zeros(n_nodes, np.int64)
        feats = np.eye(65, dtype=np.float32)[np.minimum(deg, 64)]
    elif mode == "constant":
        feats = np.ones((n_nodes, 1), dtype=np.float32)
    else:
        raise ValueError(f"node_features must be auto, attributes, labels, constant or degree; got {mode!r}")
    if len(feats) != n_nodes:
        raise ValueError(f"{folder}: {len(feats)} node feature rows for {n_nodes} nodes")

    starts = np.searchsorted(indicator, np.arange(n_graphs + 1))
    edge_graph = indicator[edges[:, 0]] if len(edges) else np.zeros(0, np.int64)
    order = np.argsort(edge_graph, kind="stable")
    edges, edge_graph = edges[order], edge_graph[order]
    e_starts = np.searchsorted(edge_graph, np.arange(n_graphs + 1))
    x_all = torch.from_numpy(feats)
    graphs = []
    for g in range(n_graphs):
        a, b = starts[g], starts[g + 1]
        e = torch.from_numpy(edges[e_starts[g]:e_starts[g + 1]].T.copy()) - a
        graphs.append(Graph(x_all[a:b].clone(), e.long()))
    meta = {"source": str(folder), "tu_name": name, "node_features": mode, "graphs": n_graphs,
            "nodes": n_nodes, "edges": int(len(edges)), "class_values": classes.tolist()}
    return graphs, labels.astype(np.int64), meta


def _task(name: str, graphs: list[Graph], labels: np.ndarray, meta: dict, *, seed: int, fold: int | None,
          folds: int, val_fraction: float | None, test_fraction: float | None,
          subset: int | None) -> TaskData:
    """Split graphs (stratified) into a TaskData: a seeded hold-out split or outer fold ``fold`` of
    ``folds`` stratified folds (the paper's 10-fold protocol), with validation carved from the rest."""
    ds = GraphDataset(graphs, labels)
    n = len(ds)
    if fold is not None:
        if test_fraction is not None:
            raise ValueError(f"{name}: give fold or test_fraction, not both")
        if not 0 <= fold < folds:
            raise ValueError(f"{name}: fold must lie in [0, {folds}), got {fold}")
        skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        rest, test = list(skf.split(np.zeros(n), labels))[fold]
        rng = np.random.default_rng(seed)
        val, train = take(rest, round(len(rest) * (0.1 if val_fraction is None else val_fraction)), rng,
                          labels)
    else:
        train, val, test = split_indices(n, test_fraction=0.1 if test_fraction is None else test_fraction,
                                         val_fraction=0.1 if val_fraction is None else val_fraction,
                                         seed=seed, y=labels)
    if subset is not None:
        if subset > len(train):
            raise ValueError(f"{name}: subset={subset} but the training split has only {len(train)} graphs")
        train, _ = take(train, subset, np.random.default_rng([seed, 1]), labels)
    meta = {**meta, "seed": seed, "fold": fold, "sizes": {"train": len(train), "val": len(val),
                                                           "test": len(test)}}
    return TaskData(name=name, task="classification", train=ds.subset(train), val=ds.subset(val),
                    test=ds.subset(test), input_shape=(int(graphs[0].x.shape[1]),),
                    num_outputs=int(labels.max()) + 1, meta=meta, collate=collate_graphs)


def load_tu(path: str, name: str | None = None, node_features: str = "auto", seed: int = 42,
            fold: int | None = None, folds: int = 10, val_fraction: float | None = None,
            test_fraction: float | None = None, subset: int | None = None) -> TaskData:
    """A TU-format graph classification dataset from the user's folder (NCI1, REDDIT-BINARY, ...).

    Args:
        path: folder with the TU text files (module docstring).
        name: file prefix (inferred when the folder holds one dataset).
        node_features: ``auto`` | ``attributes`` | ``labels`` | ``constant`` | ``degree``.
        seed: seed of the split draws.
        fold: outer fold of ``folds`` stratified folds used as the test set (None: a hold-out split
            with ``test_fraction``, default 0.1).
        val_fraction: share of the non-test graphs held out for validation (default 0.1).
        subset: keep this many training graphs.
    """
    graphs, labels, meta = read_tu(path, name, node_features)
    return _task(meta["tu_name"], graphs, labels, meta, seed=seed, fold=fold, folds=folds,
                 val_fraction=val_fraction, test_fraction=test_fraction, subset=subset)


def synthetic_graphs(n_graphs: int = 600, min_nodes: int = 8, max_nodes: int = 24,
                     densities: tuple[float, ...] = (0.1, 0.2, 0.35), generator_seed: int = 0
                     ) -> tuple[list[Graph], np.ndarray]:
    """Undirected Erdős-Rényi graphs whose class is their edge density; constant node feature 1.

    A task GIN's sum aggregation learns in a few epochs (node degrees tell the density), drawn from
    ``np.random.RandomState(generator_seed)``; classes are balanced.
    """
    rs = np.random.RandomState(generator_seed)
    graphs, labels = [], []
    for i in range(n_graphs):
        c = i % len(densities)
        n = rs.randint(min_nodes, max_nodes + 1)
        upper = np.triu(rs.rand(n, n) < densities[c], 1)
        src, dst = np.nonzero(upper | upper.T)
        graphs.append(Graph(torch.ones(n, 1), torch.from_numpy(np.stack([src, dst])).long()))
        labels.append(c)
    return graphs, np.asarray(labels, dtype=np.int64)


def load_synthetic_graphs(n_graphs: int = 600, min_nodes: int = 8, max_nodes: int = 24,
                          generator_seed: int = 0, seed: int = 42, fold: int | None = None, folds: int = 10,
                          val_fraction: float | None = None, test_fraction: float | None = None,
                          subset: int | None = None) -> TaskData:
    """Synthetic 3-class graph classification (edge density of Erdős-Rényi graphs), for tests and quick
    studies; same split options as ``tu``."""
    graphs, labels = synthetic_graphs(n_graphs, min_nodes, max_nodes, generator_seed=generator_seed)
    meta = {"generator": "erdos-renyi densities (0.1, 0.2, 0.35)", "generator_seed": generator_seed}
    return _task("synthetic_graphs", graphs, labels, meta, seed=seed, fold=fold, folds=folds,
                 val_fraction=val_fraction, test_fraction=test_fraction, subset=subset)
