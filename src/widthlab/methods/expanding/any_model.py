"""Neuron insertion by the natural expansion score in a model widthlab did not build.

The self-expanding method (Mitchell et al., 2023) scores a candidate neuron by the increase of the
natural-gradient norm its features would bring at the consuming layer, with K-FAC statistics of that
layer (the lower bound Δη′ of the paper's score), and inserts the best with zero outgoing weights. The
controller (:class:`~widthlab.methods.expanding.controller.ExpansionController`) does this for its
expandable networks, whose candidate neurons carry their own rational activation. Here the same
controller runs on the widths ``torch.fx`` discovery finds in any model (:mod:`widthlab.nn.discovery`):

* **places**: every width site (one Linear/Conv2d producer, one consumer) and every group of widths that
  change together (a residual stream written by several convolutions and read by several layers, two
  towers summed into one mixer);
* **a candidate** is one new unit: the incoming weights (and bias) of that unit in every producer of the
  place. Its features are what each consumer would read from it, replayed on the traced graph through
  the width's own operations (:class:`widthlab.nn.new_units.UnitPath`: activations, dropout,
  pooling, residual additions; a BatchNorm as a new unit's identity-initialised one in evaluation mode),
  as K-FAC rows of that consumer: one per sample for (batch, features) inputs, one per sample and token
  for token sequences, the patches at every output location of a convolution (Grosse & Martens 2016);
* **its score** is Σ_c Δη′_c over the place's consumers, relative to Σ_c η_c. K-FAC's curvature is
  block-diagonal over layers, so the natural-gradient norm a unit adds through several consumers is the
  sum of what it adds at each (Mitchell et al. 2023, eq. for Δη′ per layer); the absolute score's
  normaliser is the sum of the consumers' rooms (``abs_normalizer="room"``), which keeps the
  "at most 1/α additions per place and event" bound;
* **insertion** is plain width surgery on the place (new rows of every producer, zero columns of every
  consumer), so the function is unchanged.

* **layers** are inserted where the model offers a place: a :class:`~widthlab.nn.layer_slot.LayerSlot`
  feeding a Linear layer. The layer candidate is scored as the paper's are (k = d units reading what
  the slot's consumer reads, at that consumer, with the natural-gradient residual, divided by
  ``layer_cost_mul`` against τ and α_layer) and inserted as the identity (weight I, a rational
  activation at its identity coefficients: bitwise the same function); its width is then a site like
  any other. A model without slots grows widths only.

A width whose path holds an operation a new unit cannot pass alone (a LayerNorm over its units, a view
with the width written into it, a grouped convolution) is skipped with the reason, or refused when
named.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from widthlab.methods.expanding import scores
from widthlab.methods.expanding.controller import Candidate, ExpansionController, ExpansionEvent
from widthlab.methods.expanding.kfac import conv_padding
from widthlab.nn.discovery import DiscoveryError, WidthGroup, discover
from widthlab.nn.group_surgery import resize_group
from widthlab.nn.layer_slot import LayerSlot
from widthlab.nn.new_units import UnitPath, produce, record_values
from widthlab.nn.resize import ResizeEvent, WidthSite
from widthlab.nn.surgery import resize_site

__all__ = ["Place", "PlaceLayout", "SiteController", "SiteNetwork", "Slot", "consumer_rows"]


def consumer_rows(consumer: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """New units ``z`` (the consumer's input with P candidates on its unit axis) as the consumer's K-FAC
    rows, in the order of :func:`~widthlab.methods.expanding.kfac.input_rows`: (P, N·T, 1) for a Linear
    (T tokens, 1 for (N, d) inputs), (P, N·T, kh·kw) patches at the T output locations of a Conv2d."""
    if isinstance(consumer, nn.Linear):
        p = z.shape[-1]
        return z.reshape(-1, p).T.unsqueeze(-1)
    n, p = z.shape[0], z.shape[1]
    cols = F.unfold(z, consumer.kernel_size, dilation=consumer.dilation, padding=conv_padding(consumer),
                    stride=consumer.stride)  # (N, P·kh·kw, T), channel-major like the weights
    t = cols.shape[2]
    return cols.reshape(n, p, -1, t).permute(1, 0, 3, 2).reshape(p, n * t, -1)


@dataclass(frozen=True)
class PlaceLayout:
    """A candidate row θ: for each producer of the place, its new unit's incoming weights (the
    producer's ``weight.shape[1:]``) and bias (if it has one), in producer order."""

    blocks: tuple[tuple[tuple[int, ...], bool], ...]

    @classmethod
    def of(cls, producers: list[nn.Module]) -> PlaceLayout:
        return cls(tuple((tuple(m.weight.shape[1:]), m.bias is not None) for m in producers))

    @property
    def size(self) -> int:
        return sum(_numel(shape) + int(bias) for shape, bias in self.blocks)

    def split(self, theta: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """θ (P, size) -> per producer (W (P, *shape), b (P,) or None)."""
        out, at = [], 0
        for shape, bias in self.blocks:
            k = _numel(shape)
            W = theta[:, at:at + k].reshape(theta.shape[0], *shape)
            at += k
            b = theta[:, at] if bias else None
            at += int(bias)
            out.append((W, b))
        return out

    def random(self, count: int, generator: torch.Generator | None, dtype: torch.dtype, device=None
               ) -> torch.Tensor:
        """``count`` candidates as the official code draws new units: LeCun-normal weights (variance
        1/fan-in), biases N(0, 1); drawn on the CPU so that every device sees the same."""
        parts = []
        for shape, bias in self.blocks:
            k = _numel(shape)
            parts.append(torch.randn(count, k, generator=generator, dtype=dtype) / k ** 0.5)
            if bias:
                parts.append(torch.randn(count, 1, generator=generator, dtype=dtype))
        return torch.cat(parts, 1).to(device)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass
class Place:
    """A width the controller grows: a discovered site or group, with the replay of its new units."""

    name: str
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    path: UnitPath
    site: WidthSite | None = None
    group: WidthGroup | None = None


def _score_fn(features: Callable[[torch.Tensor], list[torch.Tensor]], residuals: list[torch.Tensor],
              G_invs: list[torch.Tensor], n: int, norm: float, jitter: float
              ) -> Callable[[torch.Tensor], torch.Tensor]:
    """s(θ) = Σ_c Δη′_c(features_c(θ)) / norm over the place's consumers c, with a floor on A_f: a
    candidate behind a ReLU may read nothing (all features 0, a dead unit), whose score is then 0
    instead of a singular solve."""

    def score(theta: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for f, r_perp, G_inv in zip(features(theta), residuals, G_invs):
            st = scores.candidate_stats(f, r_perp, n)
            eye = torch.eye(st.A_f.shape[-1], dtype=f.dtype, device=f.device)
            A = st.A_f + eye * (torch.finfo(f.dtype).tiny * 1e6)
            total = total + scores.delta_eta_lb(st.C, A, G_inv, jitter=jitter)
        return total / norm

    return score


@dataclass
class Slot:
    """A :class:`~widthlab.nn.layer_slot.LayerSlot` of the model and the Linear layer that reads it."""

    name: str
    module: LayerSlot
    consumer: str


class SiteNetwork(nn.Module):
    """A user's model seen as the controller's expandable network: its discovered sites and groups, and
    the :class:`~widthlab.nn.layer_slot.LayerSlot` s where layers may be inserted.

    Module names inside are ``net.<the model's names>``; the model itself is edited in place.

    Args:
        net: the user's model.
        example_inputs: a small batch its forward accepts (for tracing and shapes).
        sites: names of the sites or groups to grow (None: every one new units can be computed for;
            the widths of layers inserted later are always grown).
    """

    def __init__(self, net: nn.Module, example_inputs: torch.Tensor, sites: list[str] | None = None):
        super().__init__()
        self.net = net
        # A buffer, so that it follows the model to another device (discovery runs it again after a
        # layer insertion); not saved with the weights.
        self.register_buffer("_example", example_inputs[:2].detach().clone(), persistent=False)
        self._named = None if sites is None else list(sites)
        self.slots = self._find_slots()
        self.refresh()
        self._check_runs(self._example)

    @property
    def supports_depth(self) -> bool:
        return bool(self.slots)

    def _find_slots(self) -> list[Slot]:
        """Every LayerSlot, with the Linear layer that reads its output (the consumer a new layer's
        units are scored at); a slot that does not feed one Linear on (batch, features) is refused."""
        names = [n for n, m in self.net.named_modules() if isinstance(m, LayerSlot)]
        if not names:
            return []
        graph = discover(self.net, self._example, leaf_modules=(LayerSlot,)).graph
        modules = dict(self.net.named_modules())
        slots = []
        for node in graph.graph.nodes:
            if node.op != "call_module" or node.target not in names:
                continue
            users = list(node.users)
            meta = node.args[0].meta.get("tensor_meta") if node.args else None
            if len(users) != 1 or users[0].op != "call_module" or \
                    not isinstance(modules.get(users[0].target), nn.Linear):
                raise DiscoveryError(f"layer slot {node.target!r} must feed exactly one nn.Linear layer")
            if meta is None or len(meta.shape) != 2:
                raise DiscoveryError(f"layer slot {node.target!r} must see (batch, features) inputs")
            slots.append(Slot(node.target, modules[node.target], users[0].target))
        return slots

    def refresh(self) -> None:
        """Discover the places again (after a layer insertion: the new layer's width is a new site)."""
        found = discover(self.net, self._example)
        options: dict[str, tuple[WidthSite | None, WidthGroup | None]]
        options = {s.name: (s, None) for s in found.sites}
        options.update({g.name: (None, g) for g in found.groups})
        inserted = [n for n in options if any(n.startswith(f"{s.name}.layers.") for s in self.slots)]
        if self._named is not None:
            for name in self._named:
                if name not in options:
                    found.site(name)  # raises naming why (tied, fixed, unknown)
        self.places: list[Place] = []
        self.skipped: dict[str, str] = {}
        chosen = list(options) if self._named is None else list(dict.fromkeys(self._named + inserted))
        for name in chosen:
            site, group = options[name]
            producers = (site.producer_name,) if site else group.producers
            consumers = (site.consumer_name,) if site else group.consumers
            try:
                path = UnitPath(found.graph, name, producers, consumers)
                self.places.append(Place(name, tuple(producers), tuple(consumers), path, site, group))
            except DiscoveryError as e:
                if self._named is not None and name in self._named:
                    raise DiscoveryError(f"{name!r} cannot grow by self-expansion: {e}") from None
                self.skipped[name] = str(e)
        if not self.places and not self.slots:
            fixed = "; ".join(f"{', '.join(f.producers)}: {'; '.join(f.reasons)}" for f in found.fixed)
            raise DiscoveryError(f"{type(self.net).__name__} has no width that self-expansion can grow "
                                 f"(skipped: {self.skipped or 'none found'}; fixed: {fixed or 'none'})")

    def insert_layer(self, index: int) -> ResizeEvent:
        """Insert an identity layer at the end of slot ``index`` (bitwise the same function) and
        discover the places again."""
        slot = self.slots[index]
        ev = slot.module.insert(prefix=slot.name)
        self.refresh()
        return ev

    def layers(self) -> dict[str, int]:
        """Layers inserted so far, per slot."""
        return {s.name: len(s.module.layers) for s in self.slots}

    def _check_runs(self, example_inputs: torch.Tensor) -> None:
        """Replay two random candidates at every place on the example, so that an operation new units
        cannot pass alone is reported now, by name, rather than in the middle of training."""
        modes = [(m, m.training) for m in self.net.modules()]
        self.net.eval()
        try:
            values = self.record(example_inputs)
            for place in self.places:
                layout = self.layout(place)
                theta = layout.random(2, None, torch.float32)
                self.features(place, values, theta)
        finally:
            for m, training in modes:
                m.training = training

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)

    def record(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The values every place's replay reads, from one forward pass on ``x`` (no gradients)."""
        if not self.places:
            return {}
        return record_values(self.places[0].path.graph, set().union(*(p.path.needed for p in self.places)), x)

    def module(self, name: str) -> nn.Module:
        return self.net.get_submodule(name)

    def layout(self, place: Place) -> PlaceLayout:
        return PlaceLayout.of([self.module(p) for p in place.producers])

    def features(self, place: Place, values: dict[str, torch.Tensor], theta: torch.Tensor
                 ) -> list[torch.Tensor]:
        """Candidates θ (P, D) as rows of each consumer of ``place`` (its order), on recorded values."""
        new = {}
        for name, (W, b) in zip(place.producers, self.layout(place).split(theta)):
            a = place.path.producer_input(name, values).to(theta.dtype)
            new[name] = produce(self.module(name), a, W, b)
        reads = place.path(values, new)
        return [consumer_rows(self.module(c), reads[c]) for c in place.consumers]

    @property
    def depth(self) -> int:
        return len(self.places)

    def width(self, place: Place) -> int:
        return self.module(place.producers[0]).weight.shape[0]

    def hidden_widths(self) -> list[int]:
        return [self.width(p) for p in self.places]

    def widths(self) -> dict[str, int]:
        return {p.name: self.width(p) for p in self.places}

    def site_layers(self, i: int) -> tuple[str, str]:
        p = self.places[i]
        return f"net.{p.producers[0]}", f"net.{p.consumers[0]}"

    def grow(self, place: Place, n_new: int, init_in="zeros") -> ResizeEvent:
        """Append ``n_new`` units to ``place`` (zero outgoing weights); ``init_in`` is called once per
        producer, in order, with its new rows (or is a named init)."""
        if place.site is not None:
            return resize_site(place.site, None, n_new, init_in=init_in, init_out="zeros", model=self.net)
        return resize_group(self.net, place.group, None, n_new, init_in=init_in, init_out="zeros")

    def architecture(self) -> dict:
        return {"kind": "sites", "widths": self.widths(), "layers": self.layers()}

    def set_architecture(self, arch: dict) -> None:
        """Take the layers and widths of ``arch`` (a checkpoint's, whose weights are loaded next: a later
        one when resuming, an earlier one when the best epoch is restored). Growth only appends, so an
        earlier state's units and layers are a prefix of the present ones: widths shrink to that prefix
        and layers beyond it are dropped."""
        for i, slot in enumerate(self.slots):
            n = int(arch.get("layers", {}).get(slot.name, 0))
            if n < len(slot.module.layers):
                # The consumer then reads what entered layer n: give it that many input columns (a
                # prefix, zero-padded; the checkpoint's weights replace them).
                d = slot.module.layers[n].linear.in_features
                del slot.module.layers[n:]
                consumer = self.module(slot.consumer)
                w = consumer.weight.detach()
                new = w.new_zeros(w.shape[0], d)
                new[:, :min(d, w.shape[1])] = w[:, :d]
                consumer.weight = nn.Parameter(new, requires_grad=consumer.weight.requires_grad)
                consumer.in_features = d
                self.refresh()
            while len(slot.module.layers) < n:
                self.insert_layer(i)
        for place in self.places:
            target = int(arch["widths"].get(place.name, self.width(place)))
            now = self.width(place)
            if target > now:
                self.grow(place, target - now)
            elif target < now:
                keep = torch.arange(target)
                if place.site is not None:
                    resize_site(place.site, keep, 0, model=self.net)
                else:
                    resize_group(self.net, place.group, keep, 0)


class SiteController(ExpansionController):
    """The expansion controller on a :class:`SiteNetwork`: candidates scored through each place's own
    operations at all its consumers, committed by width surgery."""

    def _width_candidates(self, model: SiteNetwork, ctx, layers: list[int]) -> dict[int, Candidate]:
        cfg = self.cfg
        out: dict[int, Candidate] = {}
        values = model.record(self._x)  # one forward pass for every place
        for i in layers:
            place = model.places[i]
            consumers = [f"net.{c}" for c in place.consumers]
            infos = [self._site(ctx, c, self._x[:1], cfg.width_residual) for c in consumers]
            norm = sum(s.norm for s in infos)
            # The rooms add up over consumers; the loss-scale normalisers are one number per event.
            norms = [self._abs_norm(ctx, c, cfg.width_residual) for c in consumers]
            abs_norm = sum(norms) if cfg.abs_normalizer == "room" else norms[0]

            def make(dt, jit, place=place, values=values, infos=infos, norm=norm):
                vals = {k: v.to(dt) for k, v in values.items()}
                return _score_fn(lambda th: model.features(place, vals, th.to(dt)),
                                 [s.r_perp.to(dt) for s in infos], [s.G_inv.to(dt) for s in infos],
                                 ctx.obs.n, norm, jit)

            dtype = getattr(torch, cfg.search_dtype)
            layout = model.layout(place)
            theta0 = layout.random(cfg.proposals, self.generator, dtype, self._x.device)
            shapes = tuple(tuple(values[k].shape) for k in sorted(place.path.needed))
            res = self._search(make(dtype, 1e-6 if dtype == torch.float32 else 1e-10), theta0,
                               tag=("place", i, shapes))
            thetas = res.theta.detach().to(torch.float64)
            exact = make(torch.float64, 1e-10)(thetas)
            exact = torch.where(torch.isfinite(exact), exact, res.score.to(torch.float64))
            out[i] = self._candidate(ctx, "width", i, exact, norm, thetas, layout, abs_norm)
        return out

    def _depth_allowed(self, model: SiteNetwork) -> bool:
        """A layer may be inserted after the layer cooldown into a slot with room."""
        return self.layer_cd <= 0 and any(s.module.room > 0 for s in model.slots)

    def _depth_candidate(self, model: SiteNetwork, ctx) -> Candidate:
        """The best new layer over the slots with room: k = d units reading what the slot's consumer
        reads now, scored at that consumer with the natural-gradient residual, as the paper's layer
        candidates (then inserted as the identity)."""
        best = None
        for i, slot in enumerate(model.slots):
            if slot.module.room <= 0:
                continue
            h = ctx.obs.layers[f"net.{slot.consumer}"].a
            (cand,) = self._evaluate_units(ctx, "depth", [(i, f"net.{slot.consumer}", h)], h.shape[1],
                                           self.cfg.layer_proposals, "natural")
            if best is None or cand.delta > best.delta:
                best = cand
        return best

    def _changed_by(self, model: SiteNetwork, index: int) -> list[int]:
        """The place that grew (its consumers' A) and every place whose producer is one of its consumers
        (that producer's fan-in grew)."""
        grown = set(model.places[index].consumers)
        return [index] + [j for j, p in enumerate(model.places) if grown & set(p.producers)]

    def _commit(self, model: SiteNetwork, cand: Candidate, x: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> ResizeEvent:
        if cand.kind == "depth":
            ev = self._preserving(model, lambda: model.insert_layer(cand.index), x, y)
            return ExpansionEvent(ev.params, ev.added, ev.removed, ev.description, dict(model.widths()),
                                  optimizer_mode=self.cfg.optimizer_mode)
        place = model.places[cand.index]
        ref = model.module(place.producers[0]).weight
        blocks = iter(cand.layout.split(cand.theta[None].to(dtype=ref.dtype, device=ref.device)))

        def init_in(w_block: torch.Tensor, b_block: torch.Tensor | None) -> None:  # once per producer
            W, b = next(blocks)
            w_block.copy_(W.reshape(w_block.shape))
            if b_block is not None:
                b_block.copy_(b)

        ev = self._preserving(model, lambda: model.grow(place, 1, init_in), x, y)
        return ExpansionEvent(ev.params, ev.added, ev.removed, f"{ev.description} (insert)",
                              dict(model.widths()), optimizer_mode=self.cfg.optimizer_mode)
