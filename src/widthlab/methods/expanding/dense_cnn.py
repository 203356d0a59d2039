"""The densely connected expandable CNN of self-expanding networks (Mitchell et al. 2023, CNN experiments).

:class:`ExpandableDense` is a stack of blocks. Layer ``j`` of a block is a 3x3 convolution (no bias, no
norm, swish) that reads the concatenation of the block input and the outputs of layers ``< j``; the
block output is its last layer's output, followed by a 3x3 stride-2 max-pool between blocks; the head is
a global average pool and a bias-free dense layer (stored as a 1x1 convolution on the pooled features).

The units that switch on and off are the *input rows* of every kernel (the kernel seen as
[C_in, kh·kw·C_out]): each layer keeps its kernel as one :class:`Chunk` per input source (block input,
earlier layers, bud), each with a boolean row mask. Inactive rows hold zeros; the controller masks their
gradients and re-zeroes them after each optimizer step. Every convolution owns a *bud*: a candidate layer
(random, width ``bud_width``) computed from the same inputs whose output is appended to the layer's input
with zero, permanently frozen rows, so it changes nothing but its rows receive gradients (and thaw
scores). All edits are function-preserving:

* :meth:`ExpandableDense.add_channels`: new output channels with zero incoming weights, zero frozen rows
  downstream;
* :meth:`ExpandableDense.promote_bud`: the bud of layer ``j`` becomes a new layer before ``j`` (its
  weights kept, all its rows active); layer ``j`` and the later layers read it through zero rows.

Every edit returns a :class:`~widthlab.nn.resize.ResizeEvent` for the optimizer surgery.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from widthlab.nn.resize import ParamResize, ResizeEvent

__all__ = ["Chunk", "ConnLayer", "ExpandableDense"]


class Chunk(nn.Module):
    """The part of a kernel that reads one input source: weight (C_out, C_in, k, k), row mask (C_in,).
    Counted in the run's weight count (``counted_weights``; buds included: they are computed)."""

    counted_weight = True

    def __init__(self, c_out: int, c_in: int, k: int, active: torch.Tensor | None = None,
                 frozen: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(c_out, c_in, k, k))
        mask = torch.zeros(c_in, dtype=torch.bool) if active is None else active.clone()
        self.register_buffer("mask", mask)
        self.frozen = frozen  # bud rows: never thawed


def _as_rows(parts: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """Tensors (A, c_i, ...) stacked channel-major as rows (Σ c_i, A·...), in one copy (in ``dtype``)."""
    ts = [t.transpose(0, 1) for t in parts]
    x = torch.cat(ts) if dtype is None else torch.cat(ts, out=ts[0].new_empty(0, dtype=dtype))
    return x.reshape(x.shape[0], -1)


class ConnLayer(nn.Module):
    """One kernel over a list of sources (a conv layer, a bud, or the head); optionally with a bud."""

    def __init__(self, in_sizes: Sequence[int], c_out: int, k: int = 3, act: bool = True,
                 bud_width: int | None = None):
        super().__init__()
        self.k, self.act, self.c_out = k, act, c_out
        self.chunks = nn.ModuleList(Chunk(c_out, c, k) for c in in_sizes)
        self.bud = ConnLayer(in_sizes, bud_width, k, act) if bud_width else None
        self.bud_rows = Chunk(c_out, bud_width, k, frozen=True) if bud_width else None
        self.record = False
        # with ``record``: the sources (and bud output) of the last forward pass that tracked gradients,
        # detached; ``input_rows`` lays them out for the input factor. Only references here: the copy
        # is the controller's (timed) work, and evaluation passes record nothing.
        self.last_inputs: list[torch.Tensor] | None = None
        self.activation_hook = None  # callable(z) -> swish(z), e.g. the curvature sampler's probe

    def all_chunks(self) -> list[Chunk]:
        """The chunks in row order (sources, then the bud rows)."""
        return list(self.chunks) + ([self.bud_rows] if self.bud_rows is not None else [])

    def forward(self, sources: Sequence[torch.Tensor]) -> torch.Tensor:
        pad = self.k // 2
        z = None
        for s, c in zip(sources, self.chunks):
            t = F.conv2d(s, c.weight, padding=pad)
            z = t if z is None else z + t
        inputs = list(sources)
        if self.bud is not None:
            b = self.bud(sources)
            inputs.append(b)
            z = z + F.conv2d(b, self.bud_rows.weight, padding=pad)
        if self.record and torch.is_grad_enabled():
            self.last_inputs = [t.detach() for t in inputs]
        if not self.act:
            return z
        return F.silu(z) if self.activation_hook is None else self.activation_hook(z)

    def input_rows(self) -> torch.Tensor | None:
        """The last recorded input as rows, (C_in, N·H·W), channel-major (one copy), or None."""
        return None if self.last_inputs is None else _as_rows(self.last_inputs)

    def mask(self) -> torch.Tensor:
        return torch.cat([c.mask for c in self.all_chunks()])

    def rows(self, attr: str = "weight", dtype: torch.dtype | None = None) -> torch.Tensor:
        """The kernel (or its gradient, ``attr="grad"``) as [C_in, k·k·C_out] over all chunks, optionally
        converted to ``dtype`` (in the one copy that lays the rows out)."""
        parts = []
        for c in self.all_chunks():
            t = c.weight if attr == "weight" else c.weight.grad
            parts.append(torch.zeros_like(c.weight) if t is None else t.detach())
        return _as_rows(parts, dtype)  # a weight (C_out, C_in, k, k) -> rows (C_in, C_out·k·k)

    def set_rows(self, theta: torch.Tensor, mask: torch.Tensor) -> None:
        """Write [C_in, k·k·C_out] weights and a row mask back into the chunks."""
        i = 0
        with torch.no_grad():
            for c in self.all_chunks():
                n = c.weight.shape[1]
                block = theta[i:i + n].reshape(n, self.c_out, self.k, self.k).transpose(0, 1)
                c.weight.copy_(block * mask[i:i + n].view(1, -1, 1, 1).to(block.dtype))
                c.mask.copy_(mask[i:i + n])
                i += n

    def thawable(self) -> torch.Tensor:
        return torch.cat([torch.full_like(c.mask, not c.frozen) for c in self.all_chunks()])


def _init_rows(weight: torch.Tensor, mask: torch.Tensor, gen: torch.Generator, cols=None) -> None:
    """Draw the active rows of ``weight`` (optionally only output columns ``cols``) from N(0, 1/fan_in)
    with fan_in = k·k·(number of active rows), the LeCun-normal init of the official code's flax convs."""
    n_act = max(int(mask.sum()), 1)
    std = 1.0 / math.sqrt(n_act * weight.shape[2] * weight.shape[3])
    w = (torch.randn(weight.shape, generator=gen, dtype=weight.dtype) * std).to(weight.device)
    w = w * mask.view(1, -1, 1, 1).to(w.dtype)
    with torch.no_grad():
        if cols is None:
            weight.copy_(w)
        else:
            cols = torch.as_tensor(cols, device=weight.device)
            weight[cols] = w[cols]


class ExpandableDense(nn.Module):
    """Blocks of densely connected swish convolutions with buds and row masks (module docstring).

    Args:
        input_shape: (C, H, W) of one example.
        num_classes: outputs of the head.
        widths: channels per layer, per block, e.g. ``[[128], [128], [128]]`` (the paper's CIFAR start).
        bud_width: channels of every bud (official 64).
        init_active: input rows kept active per kernel at the start ("init_prune", official 8).
        max_width: cap on any layer's channels (official 512).
        generator: seeds the initial weights.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, widths: Sequence[Sequence[int]],
                 bud_width: int = 64, init_active: int = 8, max_width: int = 512,
                 generator: torch.Generator | None = None):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"ExpandableDense needs (C, H, W) inputs, got {tuple(input_shape)}")
        if not widths or any(not b for b in widths):
            raise ValueError(f"widths must list at least one layer per block, got {widths}")
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes, self.bud_width = int(num_classes), int(bud_width)
        self.init_active, self.max_width = int(init_active), int(max_width)
        self._build([[int(w) for w in b] for b in widths])
        gen = generator or torch.Generator().manual_seed(0)
        for layer in self.kernels():
            for c, m in zip(layer.all_chunks(), self._init_masks(layer)):
                c.mask.copy_(m)
        for layer in self.kernels(with_buds=True):
            for c in layer.chunks:
                _init_rows(c.weight, c.mask, gen)  # inactive rows stay zero

    # ------------------------------------------------------------------ structure

    def _build(self, widths: list[list[int]]) -> None:
        self.blocks = nn.ModuleList()
        c_in = self.input_shape[0]
        for bw in widths:
            block = nn.ModuleList()
            for j, w in enumerate(bw):
                block.append(ConnLayer([c_in] + bw[:j], w, 3, True, self.bud_width))
            self.blocks.append(block)
            c_in = bw[-1]
        self.head = ConnLayer([c_in], self.num_classes, 1, False, None)

    def _init_masks(self, layer: ConnLayer) -> list[torch.Tensor]:
        left, out = self.init_active, []
        for c in layer.all_chunks():
            n = c.weight.shape[1]
            m = torch.zeros(n, dtype=torch.bool)
            if not c.frozen:
                take = min(left, n)
                m[:take] = True
                left -= take
            out.append(m)
        for c in (layer.bud.chunks if layer.bud is not None else []):
            c.mask.fill_(True)  # buds: every row active (random candidate features)
        return out

    def block_widths(self) -> list[list[int]]:
        """Channels per layer, per block."""
        return [[layer.c_out for layer in b] for b in self.blocks]

    def widths(self) -> dict[str, int]:
        """Channels of every layer by name (``blocks.<block>.<layer>``)."""
        return {f"blocks.{i}.{j}": w for i, b in enumerate(self.block_widths()) for j, w in enumerate(b)}

    def architecture(self) -> dict:
        return {"widths": self.block_widths()}

    def set_architecture(self, arch: dict) -> None:
        """Rebuild modules of the shapes in ``arch`` (zeros; a checkpoint's weights and masks load next)."""
        if arch["widths"] != self.block_widths():
            ref = self.head.chunks[0].weight
            self._build([list(b) for b in arch["widths"]])
            self.to(device=ref.device, dtype=ref.dtype)

    def hidden_widths(self) -> list[int]:
        return [w for b in self.block_widths() for w in b]

    @property
    def depth(self) -> int:
        return sum(len(b) for b in self.blocks)

    def kernels(self, with_buds: bool = False) -> list[ConnLayer]:
        """Every kernel with row masks: the conv layers in order, then the head (and buds if asked)."""
        out = []
        for b in self.blocks:
            for layer in b:
                out.append(layer)
                if with_buds and layer.bud is not None:
                    out.append(layer.bud)
        return out + [self.head]

    def named_kernels(self) -> list[tuple[str, ConnLayer]]:
        names = [f"blocks.{i}.{j}" for i, b in enumerate(self.blocks) for j in range(len(b))]
        return list(zip(names + ["head"], self.kernels()))

    def set_record(self, on: bool) -> None:
        """Keep (or stop keeping) every kernel's last training input (``ConnLayer.input_rows``), for the
        input factors (buds: never)."""
        kernels = {id(k) for k in self.kernels()}
        for layer in self.kernels(with_buds=True):
            layer.record = on and id(layer) in kernels
            if not layer.record:
                layer.last_inputs = None

    def active_connections(self) -> int:
        return int(sum(int(layer.mask().sum()) for layer in self.kernels()))

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            if i > 0:
                x = F.max_pool2d(x, 3, stride=2, padding=1)
            sources = [x]
            for layer in block:
                sources.append(layer(sources))
            x = sources[-1]
        pooled = x.mean(dim=(2, 3), keepdim=True)
        return self.head([pooled]).flatten(1)

    # ------------------------------------------------------------------ edits

    def consumers(self, b: int, j: int) -> list[tuple[ConnLayer, int]]:
        """(kernel, chunk index) pairs that read layer (b, j)'s output (buds included)."""
        block = self.blocks[b]
        out = []
        for k in range(j + 1, len(block)):
            out.append((block[k], j + 1))
            out.append((block[k].bud, j + 1))
        if j == len(block) - 1:
            if b + 1 < len(self.blocks):
                for layer in self.blocks[b + 1]:
                    out += [(layer, 0), (layer.bud, 0)]
            else:
                out.append((self.head, 0))
        return out

    def used_channels(self, b: int, j: int) -> torch.Tensor:
        """Which output channels of layer (b, j) some consumer (not a bud) reads through an active row."""
        used = torch.zeros(self.blocks[b][j].c_out, dtype=torch.bool, device=self.head.chunks[0].mask.device)
        for layer, ci in self.consumers(b, j):
            if layer.bud_rows is not None or layer is self.head:
                used |= layer.chunks[ci].mask
        return used

    def add_channels(self, b: int, j: int, n: int) -> ResizeEvent:
        """Append ``n`` output channels to layer (b, j): zero incoming weights (rows as before), zero,
        inactive rows in every consumer. The network's function is unchanged."""
        layer = self.blocks[b][j]
        params = []
        for c in layer.all_chunks():
            params.append(_grow(c, 0, n, f"{self._name(c)}.weight"))
        layer.c_out += n
        for cons, ci in self.consumers(b, j):
            c = cons.chunks[ci]
            params.append(_grow(c, 1, n, f"{self._name(c)}.weight", active=cons.bud_rows is None
                                and cons is not self.head))
        return ResizeEvent(tuple(params), description=f"+{n} channels at blocks.{b}.{j}",
                           widths={f"blocks.{b}.{j}": layer.c_out})

    def promote_bud(self, b: int, j: int, generator: torch.Generator) -> ResizeEvent:
        """Make the bud of layer (b, j) a new layer before it (weights kept, all its rows active); layer
        (b, j) reads it through its former bud rows (zero, now thawable), later layers through new zero
        rows; both get fresh buds with zero frozen rows. The network's function is unchanged."""
        block = self.blocks[b]
        old = block[j]
        bud = old.bud
        ref = old.chunks[0].weight
        new = ConnLayer([c.weight.shape[1] for c in bud.chunks], bud.c_out, 3, True, self.bud_width)
        new.to(device=ref.device, dtype=ref.dtype)
        new.chunks = bud.chunks  # same Parameter objects: the optimizer keeps their state
        for c in new.chunks:
            c.mask.fill_(True)
        _fresh_bud(new, generator)
        added = [p for p in new.bud.parameters()] + [new.bud_rows.weight]
        # old layer: former bud rows become an ordinary (thawable) chunk reading the new layer
        rows = old.bud_rows
        rows.frozen = False
        old.chunks.append(rows)
        in_sizes = [c.weight.shape[1] for c in old.chunks]
        old.bud = ConnLayer(in_sizes, self.bud_width, 3, True, None)
        old.bud_rows = Chunk(old.c_out, self.bud_width, 3, frozen=True)
        old.bud.to(device=ref.device, dtype=ref.dtype)
        old.bud_rows.to(device=ref.device, dtype=ref.dtype)
        _fresh_bud(old, generator)
        added += list(old.bud.parameters()) + [old.bud_rows.weight]
        for k in range(j + 1, len(block)):
            for cons in (block[k], block[k].bud):
                c = Chunk(cons.c_out, new.c_out, 3, active=torch.zeros(new.c_out, dtype=torch.bool))
                c.to(device=ref.device, dtype=ref.dtype)
                cons.chunks.insert(j + 1, c)
                added.append(c.weight)
        block.insert(j, new)
        names = dict((id(p), n) for n, p in self.named_parameters())
        return ResizeEvent(added=tuple((names[id(p)], p) for p in added),
                           description=f"new layer blocks.{b}.{j} (bud promoted)",
                           widths={f"blocks.{b}.{j}": new.c_out})

    def _name(self, chunk: Chunk) -> str:
        for n, m in self.named_modules():
            if m is chunk:
                return n
        raise KeyError("chunk not in model")


def _fresh_bud(layer: ConnLayer, gen: torch.Generator) -> None:
    for c in layer.bud.chunks:
        c.mask.fill_(True)
        _init_rows(c.weight, c.mask, gen)


def _grow(c: Chunk, dim: int, n: int, name: str, active: bool = False) -> ParamResize:
    old = c.weight
    shape = list(old.shape)
    shape[dim] = n
    new = nn.Parameter(torch.cat([old.detach(), old.new_zeros(shape)], dim))
    c.weight = new
    if dim == 1:
        c.mask = torch.cat([c.mask, torch.full((n,), active, dtype=torch.bool, device=c.mask.device)])
    return ParamResize(name, old, new, dim, torch.arange(old.shape[dim]), n)
