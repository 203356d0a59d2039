"""Find the width sites of any model by tracing it with ``torch.fx``.

Every width method in widthlab resizes *width sites*: a producer (Linear rows / Conv output channels),
the per-unit layers its units pass through (norms, element-wise activations, dropout, pooling), and the
one consumer that reads them (Linear columns / Conv input channels); see
:class:`~widthlab.nn.resize.WidthSite`. Built-in models declare theirs in ``width_sites()``; this module
finds them in a model that does not.

:func:`discover` traces the model symbolically, runs the example input through the traced graph to learn
every tensor's shape, and follows each producer's unit axis forward:

* through operations that treat each unit on its own (activations, dropout, BatchNorm/InstanceNorm,
  LayerNorm/RMSNorm over the unit axis, pooling, reductions and flattens that keep the unit axis,
  arithmetic with scalars or with tensors of size 1 along it);
* into consumers (a Linear reading the units on its last axis, a Conv reading them as channels).

A unit axis with one producer and one consumer is a :class:`~widthlab.nn.resize.WidthSite`. Where
several producers' outputs meet (a residual addition, an element-wise product) or one producer feeds
several consumers, the widths must change together: that is a :class:`WidthGroup`. A unit axis that
reaches something discovery cannot account for (the model's output, a concatenation, a reshape that
mixes units with other axes, an operation it does not know, a module called twice, tied weights) is
*fixed*: it is reported with the reason, and naming it as a site is refused with that reason.

A model whose forward branches on tensor values cannot be traced: :class:`DiscoveryError` names the
module whose forward did so. Such a model keeps working if it declares ``width_sites()`` itself.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from widthlab.nn.rational import RationalActivation
from widthlab.nn.resize import WidthSite

__all__ = ["Discovery", "DiscoveryError", "FixedWidth", "WidthGroup", "discover", "width_sites"]

_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CHANNEL_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                  nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_UNIT_AXIS_NORMS = (nn.LayerNorm, nn.RMSNorm)
# Modules and functions that act on each unit (and each position) independently.
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout,
)
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_ELEMENTWISE_FUNCTIONS = {
    torch.relu, torch.tanh, torch.sigmoid, torch.exp, torch.abs, torch.square, torch.sqrt,
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardtanh,
    F.hardswish, F.hardsigmoid, F.softplus, F.softsign, F.logsigmoid, F.tanh, F.sigmoid, F.dropout,
    F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.nn.functional.relu_,
    torch.clamp, torch.clip, torch.neg,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "tanh", "sigmoid", "exp", "abs", "square", "sqrt", "neg",
                        "clamp", "clamp_", "clip", "contiguous", "float", "double", "half", "to",
                        "type_as", "detach", "clone", "pow"}
_POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                   F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                   F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d}
_REDUCTIONS = {"mean", "sum", "amax", "amin"}
# Binary arithmetic: operands carrying units must share them; scalars and size-1 broadcasts are fine.
_ADDITIVE = {operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub,
             "add", "sub", "add_", "sub_"}
_MULTIPLICATIVE = {operator.mul, operator.truediv, operator.imul, operator.itruediv, torch.mul,
                   torch.div, "mul", "div", "mul_", "div_"}


class DiscoveryError(ValueError):
    """The model cannot be traced, or a named site is not one; the message names the module."""


@dataclass(frozen=True)
class WidthGroup:
    """Widths that must change together: several producers whose units meet (a residual addition, an
    element-wise product), or one width read by several consumers.

    Attributes:
        name: a label, the first producer's module name with ``"+"`` and the group's size.
        producers, norms, consumers: qualified module names, in forward order.
        reasons: where the widths are tied, e.g. ``"residual addition at layer1.0 (add)"``.
    """

    name: str
    producers: tuple[str, ...]
    norms: tuple[str, ...]
    consumers: tuple[str, ...]
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class FixedWidth:
    """A producer's width that no resize may change, with the reasons (e.g. it is the model output)."""

    producers: tuple[str, ...]
    reasons: tuple[str, ...]


@dataclass
class Discovery:
    """What :func:`discover` found: resizable sites, groups that must change together, fixed widths."""

    sites: list[WidthSite] = field(default_factory=list)
    groups: list[WidthGroup] = field(default_factory=list)
    fixed: list[FixedWidth] = field(default_factory=list)
    graph: fx.GraphModule | None = field(default=None, repr=False)  # the traced model (shares its modules)

    def site(self, name: str) -> WidthSite:
        """The site called ``name`` (its producer's module name); a clear error for groups/fixed ones."""
        for s in self.sites:
            if s.name == name:
                return s
        for g in self.groups:
            if name in g.producers:
                raise DiscoveryError(f"{name!r} is not a site of its own: its width is tied to "
                                     f"{', '.join(p for p in g.producers if p != name) or 'its consumers'} "
                                     f"({'; '.join(g.reasons)}); the group {g.name!r} resizes them "
                                     "together")
        for f in self.fixed:
            if name in f.producers:
                raise DiscoveryError(f"{name!r} cannot be resized: {'; '.join(f.reasons)}")
        raise DiscoveryError(f"no width site {name!r}; found {[s.name for s in self.sites]}")


# --- tracing ------------------------------------------------------------------------------------------


class _Tracer(fx.Tracer):
    """fx's tracer, keeping torch.nn's own modules as leaves and recording which user module is being
    traced, so that a failure names it."""

    def __init__(self, leaf_modules: Sequence[type] = ()):
        super().__init__()
        self.extra_leaves = tuple(leaf_modules)
        self.stack: list[tuple[str, str]] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (RationalActivation, *self.extra_leaves)) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        self.stack.append((qualname, type(m).__name__))
        out = super().call_module(m, forward, args, kwargs)
        self.stack.pop()  # not on failure: then the innermost entry names the module that failed
        return out


def _trace(model: nn.Module, example_inputs: tuple, leaf_modules: Sequence[type]) -> fx.GraphModule:
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, RuntimeError... for untraceable code
        where = tracer.stack[-1] if tracer.stack else ("", type(model).__name__)
        name = where[0] or "the model"
        kind = ("its forward branches on tensor values (data-dependent control flow)"
                if "control flow" in str(e) or "iterate" in str(e) else f"tracing failed: {e}")
        raise DiscoveryError(f"cannot trace {name} ({where[1]}): {kind}. Declare the model's width "
                             "sites with a width_sites() method, or pass this module's class in "
                             "leaf_modules to treat it as opaque") from None
    gm = fx.GraphModule(tracer.root, graph)
    # Eval mode while shapes propagate (the same shapes), so that discovery leaves BatchNorm's running
    # statistics as they were; the graph module shares the model's submodules.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as e:
        raise DiscoveryError(f"the example input does not run through {type(model).__name__}: "
                             f"{type(e).__name__}: {e}") from None
    finally:
        for m, training in modes:
            m.training = training
    return gm


# --- following unit axes ------------------------------------------------------------------------------


class _Width:
    """One unit axis as discovery follows it (merged by union-find when widths meet)."""

    def __init__(self):
        self.parent = self
        self.producers: list[str] = []
        self.norms: list[str] = []
        self.consumers: list[str] = []
        self.ties: list[str] = []
        self.fixed: list[str] = []

    def root(self) -> _Width:
        w = self
        while w.parent is not w:
            w.parent = w.parent.parent
            w = w.parent
        return w


def _union(a: _Width, b: _Width, reason: str) -> _Width:
    a, b = a.root(), b.root()
    if a is not b:
        b.parent = a
        for attr in ("producers", "norms", "consumers", "ties", "fixed"):
            getattr(a, attr).extend(getattr(b, attr))
    a.ties.append(reason)
    return a


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _describe(node: fx.Node) -> str:
    t = node.target
    name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
    return f"{node.op} {name}"


class _Follower:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.unit: dict[fx.Node, tuple[_Width, int]] = {}  # node -> (width, unit axis)
        self.widths: list[_Width] = []
        self.calls: dict[str, list[_Width]] = {}

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.visit(node)

    # -- helpers
    def carried(self, args: Iterable) -> list[tuple[fx.Node, _Width, int]]:
        out = []
        for a in args:
            if isinstance(a, (list, tuple)):
                out.extend(self.carried(a))
            elif isinstance(a, fx.Node) and a in self.unit:
                w, axis = self.unit[a]
                out.append((a, w.root(), axis))
        return out

    def fix_inputs(self, node: fx.Node, reason: str) -> None:
        for _, w, _ in self.carried(list(node.args) + list(node.kwargs.values())):
            w.fixed.append(reason)

    def new_width(self, node: fx.Node, producer: str, axis: int) -> None:
        w = _Width()
        w.producers.append(producer)
        self.widths.append(w)
        self.calls.setdefault(producer, []).append(w)
        self.unit[node] = (w, axis)

    # -- one graph node
    def visit(self, node: fx.Node) -> None:
        if node.op in ("placeholder", "get_attr"):
            return
        inputs = self.carried(list(node.args) + list(node.kwargs.values()))
        if node.op == "output":
            for _, w, _ in inputs:
                w.fixed.append("it is an output of the model")
            return
        if not inputs:
            if node.op == "call_module" and isinstance(self.modules[node.target], _PRODUCERS):
                self.produce(node)
            return
        if node.op == "call_module":
            self.visit_module(node, inputs)
        else:
            self.visit_function(node, inputs)

    def produce(self, node: fx.Node) -> None:
        mod = self.modules[node.target]
        shape = _shape(node)
        axis = (len(shape) - 1 if isinstance(mod, nn.Linear) else 1) if shape else 1
        self.new_width(node, node.target, axis)
        if len(self.calls[node.target]) > 1:
            for w in self.calls[node.target]:
                w.root().fixed.append(f"{node.target} is called more than once")

    def visit_module(self, node: fx.Node, inputs) -> None:
        mod, name = self.modules[node.target], node.target
        (src, w, axis), *rest = inputs
        shape = _shape(src)
        if rest:
            self.fix_inputs(node, f"{name} ({type(mod).__name__}) takes several unit-carrying inputs")
            return
        if isinstance(mod, _PRODUCERS):
            in_axis = len(shape) - 1 if isinstance(mod, nn.Linear) else 1
            if axis != in_axis:
                w.fixed.append(f"{name} reads another axis than the units")
            elif getattr(mod, "groups", 1) != 1:
                w.fixed.append(f"{name} is a grouped convolution")
            else:
                w.consumers.append(name)
            self.produce(node)
        elif isinstance(mod, _CHANNEL_NORMS):
            if axis == 1:
                w.norms.append(name)
                self.unit[node] = (w, axis)
            else:
                w.fixed.append(f"{name} ({type(mod).__name__}) normalises another axis than the units")
        elif isinstance(mod, _UNIT_AXIS_NORMS):
            if shape and axis == len(shape) - 1 and len(tuple(mod.normalized_shape)) == 1:
                w.norms.append(name)
                self.unit[node] = (w, axis)
            else:
                w.fixed.append(f"{name} ({type(mod).__name__}) normalises over more than the unit axis")
        elif isinstance(mod, RationalActivation):
            if axis == (mod.dim % len(shape) if shape else -1):
                w.norms.append(name)  # per-unit coefficients: resized with the width, like a norm
                self.unit[node] = (w, axis)
            else:
                w.fixed.append(f"{name} (RationalActivation) has its units on another axis")
        elif isinstance(mod, nn.PReLU) and mod.num_parameters > 1:
            w.fixed.append(f"{name} (PReLU) has one slope per unit, which resizing does not edit")
        elif isinstance(mod, _ELEMENTWISE_MODULES):
            self.unit[node] = (w, axis)
        elif isinstance(mod, _POOL_MODULES):
            self.pass_pool(node, w, axis, name)
        elif isinstance(mod, nn.Flatten):
            self.pass_reshape(node, w, axis, src, f"{name} (Flatten)")
        else:
            w.fixed.append(f"{name} ({type(mod).__name__}) reads the units; discovery does not know it")

    def pass_pool(self, node, w, axis, what) -> None:
        if axis == 1:
            self.unit[node] = (w, axis)
        else:
            w.fixed.append(f"{what} pools over the unit axis")

    def pass_reshape(self, node, w, axis, src, what) -> None:
        """A flatten/view/squeeze keeps the units when some output axis holds exactly them: the same size,
        with as many elements before it as before the unit axis (row-major order then maps unit u of
        every position to unit u)."""
        before, after = _shape(src), _shape(node)
        if before and after:
            lead = torch.Size(before[:axis]).numel()
            for k, size in enumerate(after):
                if size == before[axis] and torch.Size(after[:k]).numel() == lead:
                    self.unit[node] = (w, k)
                    return
        w.fixed.append(f"{what} mixes the units with other axes")

    def visit_function(self, node: fx.Node, inputs) -> None:
        target = node.target
        what = _describe(node)
        (src, w, axis), *rest = inputs
        if target in _ELEMENTWISE_FUNCTIONS or (node.op == "call_method" and target in _ELEMENTWISE_METHODS):
            if rest or any(isinstance(a, fx.Node) and a not in self.unit and (_shape(a) or ())
                           for a in node.args[1:]):
                self.fix_inputs(node, f"{what} combines the units with another tensor")
                return
            self.unit[node] = (w, axis)
        elif target in _POOL_FUNCTIONS:
            self.pass_pool(node, w, axis, what)
        elif target in _ADDITIVE or target in _MULTIPLICATIVE:
            self.pass_binary(node, inputs, what)
        elif (target in (torch.flatten, "flatten", "view", "reshape", "squeeze", "unsqueeze")
              or target in (torch.squeeze, torch.unsqueeze, torch.reshape)):
            self.pass_reshape(node, w, axis, src, what)
        elif node.op == "call_method" and target in _REDUCTIONS or target in (torch.mean, torch.sum,
                                                                           torch.amax, torch.amin):
            self.pass_reduction(node, w, axis, src, what)
        elif target is torch.cat or target == "cat":
            for _, wi, _ in inputs:
                wi.fixed.append(f"it is concatenated at {node.name} ({what})")
        else:
            self.fix_inputs(node, f"{what} at {node.name} reads the units; discovery does not know it")

    def pass_binary(self, node, inputs, what) -> None:
        out_shape = _shape(node)
        first_w, first_axis = inputs[0][1], inputs[0][2]
        axes = {(len(_shape(n) or ()) - a) for n, _, a in inputs}  # unit axis counted from the right
        if len(axes) != 1:
            self.fix_inputs(node, f"{what} at {node.name} aligns units with another axis")
            return
        # A tensor operand without units must broadcast along the unit axis (size 1 there).
        right = axes.pop()
        for a in node.args:
            if isinstance(a, fx.Node) and a not in self.unit:
                s = _shape(a)
                if s and len(s) >= right and s[len(s) - right] != 1:
                    # Keep following: a later addition still ties this width to others.
                    self.fix_inputs(node, f"{what} at {node.name} combines the units with a tensor "
                                          "whose units discovery cannot trace (a model input, a "
                                          "constant, or an opaque module's output)")
        w = first_w
        if len(inputs) > 1:
            kind = "residual addition" if node.target in _ADDITIVE else "element-wise product"
            for _, wi, _ in inputs[1:]:
                w = _union(w, wi, f"{kind} at {node.name}")
        self.unit[node] = (w, len(out_shape) - right if out_shape else first_axis)

    def pass_reduction(self, node, w, axis, src, what) -> None:
        before, after = _shape(src), _shape(node)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if before is None or after is None or dims is None:
            w.fixed.append(f"{what} reduces over the unit axis")
            return
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = sorted(d % len(before) for d in dims)
        if axis in dims:
            w.fixed.append(f"{what} reduces over the unit axis")
            return
        keepdim = len(after) == len(before)
        self.unit[node] = (w, axis if keepdim else axis - sum(d < axis for d in dims))


# --- public -------------------------------------------------------------------------------------------


def discover(model: nn.Module, example_inputs: torch.Tensor | tuple, *,
             leaf_modules: Sequence[type] = ()) -> Discovery:
    """Trace ``model`` on ``example_inputs`` and return its width sites, groups and fixed widths.

    Args:
        model: any ``nn.Module`` whose forward ``torch.fx`` can trace (no branching on tensor values).
        example_inputs: one input tensor, or a tuple of the forward's positional inputs; only their
            shapes matter (one small batch is enough).
        leaf_modules: module classes to treat as opaque (their inputs and outputs carry no units).

    Returns:
        A :class:`Discovery`. Sites are named after their producer's qualified module name.

    Raises:
        DiscoveryError: the model cannot be traced (naming the module) or does not run on the input.
    """
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    gm = _trace(model, inputs, leaf_modules)
    follower = _Follower(gm)
    follower.run()
    real = dict(model.named_modules())
    shared = _tied_modules(model)

    out = Discovery(graph=gm)
    seen: set[int] = set()
    order = {name: i for i, name in enumerate(follower.calls)}  # producers in forward order
    for w in follower.widths:
        r = w.root()
        if id(r) in seen:
            continue
        seen.add(id(r))
        r.producers = sorted(dict.fromkeys(r.producers), key=order.__getitem__)
        fixed = list(dict.fromkeys(r.fixed))
        for name in (*r.producers, *r.norms, *r.consumers):
            if name in shared:
                fixed.append(f"{name} shares its weights with {shared[name]} (tied weights)")
        if not r.consumers and not fixed:
            fixed.append("no layer consumes its units")
        if fixed:
            out.fixed.append(FixedWidth(tuple(r.producers), tuple(fixed)))
        elif len(r.producers) == 1 and len(r.consumers) == 1:
            p, c = r.producers[0], r.consumers[0]
            out.sites.append(WidthSite(p, real[p], real[c], tuple(real[n] for n in r.norms), p, c,
                                       tuple(r.norms)))
        else:
            ties = list(dict.fromkeys(r.ties)) or [f"{len(r.consumers)} consumers read it"]
            if len(r.consumers) > 1 and len(r.producers) == 1:
                ties = [f"{len(r.consumers)} consumers read it ({', '.join(r.consumers)})"]
            name = r.producers[0] + (f"+{len(r.producers) - 1}" if len(r.producers) > 1 else "")
            out.groups.append(WidthGroup(name, tuple(r.producers), tuple(dict.fromkeys(r.norms)),
                                         tuple(dict.fromkeys(r.consumers)), tuple(ties)))
    return out


def width_sites(model: nn.Module, example_inputs: torch.Tensor | tuple | None = None,
                names: Sequence[str] | None = None, **kwargs) -> list[WidthSite]:
    """The model's resizable sites: its own ``width_sites()`` when it declares them, else discovered.

    ``names`` selects sites (a discovered group or fixed width named here is refused with its reason).
    """
    if callable(getattr(model, "width_sites", None)):
        sites = list(model.width_sites())
        if names is None:
            return sites
        by_name = {s.name: s for s in sites}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise DiscoveryError(f"no width site {missing[0]!r}; the model declares {list(by_name)}")
        return [by_name[n] for n in names]
    if example_inputs is None:
        raise DiscoveryError(f"{type(model).__name__} declares no width_sites(): pass an example input "
                             "so that its sites can be discovered")
    found = discover(model, example_inputs, **kwargs)
    return list(found.sites) if names is None else [found.site(n) for n in names]


def _tied_modules(model: nn.Module) -> dict[str, str]:
    """Module name -> the other module holding one of its parameters (tied weights)."""
    owners: dict[int, list[str]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(mname)
    tied = {}
    for names in owners.values():
        uniq = list(dict.fromkeys(names))
        if len(uniq) > 1:
            for n in uniq:
                tied[n] = ", ".join(o for o in uniq if o != n)
    return tied
