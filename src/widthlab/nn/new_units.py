"""What new units of a width compute, up to its consumers, replayed from the model's traced graph.

Units that enter a width with zero outgoing weights leave the model's function unchanged, whatever
they compute (:mod:`widthlab.nn.surgery`). A method that *chooses* new units by what they would
contribute, as self-expanding networks do with the natural expansion score (Mitchell et al. 2023, the
score of a candidate neuron), needs that contribution: the values each consumer of the width would
read from a new unit, as a function of its incoming weights. :class:`UnitPath` replays, on the
``torch.fx`` graph of :func:`widthlab.nn.discovery.discover`, the operations between a width's
producers and its consumers, on new units only:

* a producer's new units: the producer's own operation (``F.linear``; ``F.conv2d`` with its stride,
  padding and dilation) of the candidate weights on the producer's actual input;
* per-unit operations (activations, dropout, pooling, reductions and flattens that keep the unit axis,
  arithmetic between the width's tensors, with scalars or with broadcasts): applied to the new units
  as the graph applies them to the old ones;
* a rational activation (Mitchell et al. 2023): a new unit's own, at its identity coefficients;
* a BatchNorm, or an InstanceNorm that tracks running statistics: a new unit's own, in evaluation
  mode (weight 1, bias 0, running mean 0, variance 1: z / √(1 + eps)); an InstanceNorm without running
  statistics normalises the new unit over its own positions;
* a LayerNorm, RMSNorm or GroupNorm over the unit axis is refused: a new unit would enter the
  normalisation of every other unit, so no insertion there preserves the function.

Tensors keep the graph's layout with P candidates in place of the width on the unit axis (last for a
Linear output, 1 for a convolution's). The other operands (producers' inputs, broadcast factors) are
recorded by one forward pass of the graph (:meth:`UnitPath.record`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.node import map_arg

from widthlab.nn.discovery import DiscoveryError
from widthlab.nn.rational import RationalActivation

__all__ = ["UnitPath", "produce", "record_values"]

_LAYERS = (nn.Linear, nn.Conv2d)
_RUNNING_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_WIDTH_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)


def produce(module: nn.Module, a: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """New units of a Linear/Conv2d producer: incoming weights ``W`` (P, *weight.shape[1:]) and biases
    ``b`` (P,) (or None) applied to its input ``a``, as the producer applies its own."""
    if isinstance(module, nn.Linear):
        return F.linear(a, W, b)
    return F.conv2d(a, W, b, module.stride, module.padding, module.dilation)


def _nodes(args: Iterable) -> list[fx.Node]:
    found: list[fx.Node] = []
    map_arg(tuple(args), lambda n: found.append(n))
    return found


class _Recorder(fx.Interpreter):
    """Runs the graph, keeping the values of the named nodes."""

    def __init__(self, gm: fx.GraphModule, names: set[str]):
        super().__init__(gm)
        self.names = names
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = out
        return out


def record_values(graph: fx.GraphModule, names: set[str] | frozenset[str], *inputs: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
    """One forward pass of ``graph`` on ``inputs`` without gradients, in the modules' current train/eval
    modes, keeping the values of the nodes called ``names``."""
    rec = _Recorder(graph, set(names))
    with torch.no_grad():
        rec.run(*inputs)
    return rec.values


class UnitPath:
    """The operations from a width's producers to its consumers, replayed on new units.

    Args:
        graph: the traced model (``Discovery.graph``; it shares the model's modules, so it follows
            every resize).
        name: the width's name, for messages.
        producers, consumers: qualified module names (Linear or Conv2d with one group and zero padding).

    Raises:
        DiscoveryError: naming the width and the operation a new unit cannot pass.
    """

    def __init__(self, graph: fx.GraphModule, name: str, producers: Sequence[str], consumers: Sequence[str]):
        self.graph, self.name = graph, name
        self.producers, self.consumers = tuple(producers), tuple(consumers)
        modules = dict(graph.named_modules())
        for role, names in (("producer", self.producers), ("consumer", self.consumers)):
            for n in names:
                m = modules[n]
                if not isinstance(m, _LAYERS):
                    raise DiscoveryError(f"width {name!r}: its {role} {n} is a {type(m).__name__} (new units "
                                         "are computed for Linear and Conv2d layers)")
                if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"):
                    raise DiscoveryError(f"width {name!r}: {role} {n} is a grouped or non-zero-padded "
                                         "convolution")
        carried: set[fx.Node] = set()
        self._needed: set[str] = set()
        self._inputs: dict[str, fx.Node] = {}  # producer -> the node it reads
        self._reads: dict[str, fx.Node] = {}  # consumer -> the node of the width it reads
        self._steps: list[tuple[fx.Node, str, object]] = []
        for node in graph.graph.nodes:
            args = _nodes((node.args, node.kwargs))
            ins = [a for a in args if a in carried]
            module_name = node.target if node.op == "call_module" else None
            if module_name in self.consumers and ins:
                if node.args[0] not in carried:
                    raise DiscoveryError(f"width {name!r}: {module_name} reads its units through another "
                                         "argument than its input")
                self._reads[module_name] = node.args[0]
            if module_name in self.producers:
                self._inputs[module_name] = node.args[0]
                self._needed.add(node.args[0].name)
                self._steps.append((node, "produce", None))
                carried.add(node)
                continue
            if not ins or module_name in self.consumers:
                continue
            if node.op == "output":
                raise DiscoveryError(f"width {name!r}: its units reach the model's output")
            self._steps.append((node, *self._step(node, modules)))
            self._needed.update(a.name for a in args if a not in carried)
            carried.add(node)
        missing = [c for c in self.consumers if c not in self._reads]
        if missing or len(self._inputs) != len(self.producers):
            raise DiscoveryError(f"width {name!r}: the traced graph does not connect its producers "
                                 f"{list(self.producers)} to its consumers {missing or list(self.consumers)}")

    def _step(self, node: fx.Node, modules: Mapping[str, nn.Module]) -> tuple[str, object]:
        if node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, RationalActivation):
                return "scale", 1.0  # a new unit's coefficients start at the identity (v = c = 0, l = 1)
            if isinstance(m, _RUNNING_NORMS) or (isinstance(m, _INSTANCE_NORMS) and m.track_running_stats):
                return "scale", 1.0 / math.sqrt(1.0 + m.eps)
            if isinstance(m, _INSTANCE_NORMS):
                return "instance_norm", m.eps
            if isinstance(m, _WIDTH_NORMS):
                raise DiscoveryError(f"width {self.name!r}: {node.target} ({type(m).__name__}) normalises "
                                     "over all units, so a new unit would change the others")
            return "module", m
        if node.op in ("call_function", "call_method"):
            return node.op, node.target
        raise DiscoveryError(f"width {self.name!r}: {node.name} ({node.op}) is not an operation on units")

    def producer_input(self, producer: str, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The recorded input of ``producer``."""
        return values[self._inputs[producer].name]

    @property
    def needed(self) -> frozenset[str]:
        """Names of the graph nodes whose values the replay reads."""
        return frozenset(self._needed)

    def record(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """The values the replay reads (by node name), from one forward pass on ``inputs``."""
        return record_values(self.graph, self._needed, *inputs)

    def __call__(self, values: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
        """The new units each consumer reads (by consumer name), from each producer's new units ``new``
        (e.g. :func:`produce`) and the recorded ``values``."""
        env: dict[fx.Node, torch.Tensor] = {}

        def value(a: fx.Node):
            return env[a] if a in env else values[a.name]

        for node, kind, how in self._steps:
            if kind == "produce":
                env[node] = new[node.target]
                continue
            args, kwargs = map_arg(node.args, value), map_arg(node.kwargs, value)
            try:
                if kind == "scale":
                    env[node] = args[0] * how
                elif kind == "instance_norm":
                    env[node] = F.instance_norm(args[0], eps=how)
                elif kind in ("module", "call_function"):
                    env[node] = how(*args, **kwargs)
                else:
                    env[node] = getattr(args[0], how)(*args[1:], **kwargs)
            except Exception as e:  # e.g. a view with the old width written into it
                raise DiscoveryError(f"width {self.name!r}: {node.name} ({node.op} {how}) does not run on "
                                     f"new units alone: {type(e).__name__}: {e}") from None
        return {c: env[n] for c, n in self._reads.items()}
