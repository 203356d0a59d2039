"""Neuron insertion by the natural expansion score in a model widthlab did not build (Linear sites).

The self-expanding method (Mitchell et al., 2023) scores a candidate neuron by the increase of the
natural-gradient norm its features would bring at the consuming layer, with K-FAC statistics of that
layer, and inserts the best with zero outgoing weights. The controller
(:class:`~widthlab.methods.expanding.controller.ExpansionController`) does this for its expandable
networks, whose candidate neurons carry their own rational activation. Here the same controller runs on
the single width sites ``torch.fx`` discovery finds between two ``nn.Linear`` layers of any model, with
two differences, both local to this module:

* a candidate's features are what the site's consumer would read from it: its pre-activation W h + b
  passed through the site's own per-unit operations (activations, dropout, and a BatchNorm as a new
  unit's identity-initialised BatchNorm in evaluation mode, z / sqrt(1 + eps)), replayed from the
  traced graph;
* insertion is plain width surgery on the site (rows of the producer, its norms, zero columns of the
  consumer), so the function is unchanged.

Layers are not inserted (a user's model offers no place for one), and sites whose producer reads more
than (batch, features) inputs, or whose path holds an operation other than per-unit ones, are skipped
with the reason. Convolution sites would need the channel features of the controller's CNN path; they
are not offered here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import fx, nn

from widthlab.methods.expanding import proposals, scores
from widthlab.methods.expanding.controller import Candidate, ExpansionController, ExpansionEvent
from widthlab.methods.expanding.fisher import per_sample_loss
from widthlab.nn.discovery import DiscoveryError, discover
from widthlab.nn.resize import ResizeEvent, WidthSite
from widthlab.nn.surgery import resize_site

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
Chain = Callable[[torch.Tensor], torch.Tensor]


def _chain(gm: fx.GraphModule, producer: str, consumer: str) -> Chain:
    """The per-unit operations between ``producer``'s output and ``consumer``'s input, as a function of a
    tensor whose last axis holds new units."""
    modules = dict(gm.named_modules())
    (node,) = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == producer]
    ops: list[Chain] = []
    while True:
        users = list(node.users)
        if len(users) != 1:
            raise DiscoveryError(f"site {producer!r}: its units reach {len(users)} operations")
        u = users[0]
        if u.op == "call_module" and u.target == consumer:
            break
        others = [a for a in (*u.args[1:], *u.kwargs.values()) if isinstance(a, fx.Node)]
        if u.args[:1] != (node,) or others:
            raise DiscoveryError(f"site {producer!r}: {u.name} combines its units with another tensor")
        rest, kwargs = u.args[1:], dict(u.kwargs)
        if u.op == "call_module":
            mod = modules[u.target]
            if isinstance(mod, _NORMS):
                scale = 1.0 / math.sqrt(1.0 + mod.eps)  # a new unit's norm: weight 1, bias 0, mean 0, var 1
                ops.append(lambda z, s=scale: z * s)
            elif isinstance(mod, (nn.LayerNorm, nn.RMSNorm)):
                raise DiscoveryError(f"site {producer!r}: {u.target} normalises over all units")
            else:
                ops.append(lambda z, m=mod: m(z))
        elif u.op == "call_function":
            ops.append(lambda z, f=u.target, r=rest, k=kwargs: f(z, *r, **k))
        else:
            ops.append(lambda z, f=u.target, r=rest, k=kwargs: getattr(z, f)(*r, **k))
        node = u

    def chain(z: torch.Tensor) -> torch.Tensor:
        for op in ops:
            z = op(z)
        return z

    return chain


def _score_fn(features: Callable[[torch.Tensor], torch.Tensor], r_perp: torch.Tensor, G_inv: torch.Tensor,
              n: int, norm: float, jitter: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """s(θ) = Δη′(features(θ)) / norm as the controller's, with a floor on A_f: a candidate behind a ReLU
    may read nothing (all features 0, a dead unit), whose score is then 0 instead of a singular solve."""

    def score(theta: torch.Tensor) -> torch.Tensor:
        f = features(theta)
        st = scores.candidate_stats(f, r_perp, n)
        eye = torch.eye(st.A_f.shape[-1], dtype=f.dtype, device=f.device)
        A = st.A_f + eye * (torch.finfo(f.dtype).tiny * 1e6)
        return scores.delta_eta_lb(st.C, A, G_inv, jitter=jitter) / norm

    return score


def _check_linear_inputs(net: nn.Module, example_inputs: torch.Tensor) -> None:
    """The controller's K-FAC rows read a Linear layer's input as (batch, features): refuse, with the
    layer's name, a model whose Linear layers see token sequences."""
    seen: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            seen.setdefault(name, tuple(args[0].shape))
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in net.named_modules()
             if isinstance(m, nn.Linear)]
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        with torch.no_grad():
            net(example_inputs)
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes:
            m.training = training
    bad = {n: shape for n, shape in seen.items() if len(shape) != 2}
    if bad:
        name, shape = next(iter(bad.items()))
        raise DiscoveryError(f"self-expansion reads every Linear layer's input as (batch, features), but "
                             f"{name} reads {shape} (token sequences are not supported)")


class SiteNetwork(nn.Module):
    """A user's model seen as the controller's expandable network: its discovered Linear sites.

    Module names inside are ``net.<the model's names>``; the model itself is edited in place.
    """

    supports_depth = False

    def __init__(self, net: nn.Module, example_inputs: torch.Tensor, sites: list[str] | None = None):
        super().__init__()
        self.net = net
        _check_linear_inputs(net, example_inputs)
        found = discover(net, example_inputs)
        gm = fx.GraphModule(net, fx.Tracer().trace(net)) if found.sites else None
        self.sites: list[WidthSite] = []
        self.chains: list[Chain] = []
        self.skipped: dict[str, str] = {}
        chosen = found.sites if sites is None else [found.site(n) for n in sites]
        for s in chosen:
            why = None
            if not (isinstance(s.producer, nn.Linear) and isinstance(s.consumer, nn.Linear)):
                why = "not between two Linear layers"
            else:
                try:
                    chain = _chain(gm, s.producer_name, s.consumer_name)
                except DiscoveryError as e:
                    why = str(e)
            if why is None:
                self.sites.append(s)
                self.chains.append(chain)
            elif sites is not None:
                raise DiscoveryError(f"site {s.name!r} cannot grow by self-expansion: {why}")
            else:
                self.skipped[s.name] = why
        if not self.sites:
            tied = f"; tied widths (residual groups) do not grow: {[g.name for g in found.groups]}" \
                if found.groups else ""
            raise DiscoveryError(f"{type(net).__name__} has no Linear -> Linear width site to grow "
                                 f"({self.skipped or 'none found'}{tied})")

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)

    @property
    def depth(self) -> int:
        return len(self.sites)

    def hidden_widths(self) -> list[int]:
        return [s.width for s in self.sites]

    def widths(self) -> dict[str, int]:
        return {s.name: s.width for s in self.sites}

    def site_layers(self, i: int) -> tuple[str, str]:
        s = self.sites[i]
        return f"net.{s.producer_name}", f"net.{s.consumer_name}"

    def architecture(self) -> dict:
        return {"widths": self.hidden_widths()}  # widths come back with the weights (by name)

    def set_architecture(self, arch: dict) -> None:
        pass


class SiteController(ExpansionController):
    """The expansion controller on a :class:`SiteNetwork`: candidates scored through each site's own
    per-unit operations, committed by width surgery."""

    def _width_candidates(self, model: SiteNetwork, ctx, layers: list[int]) -> dict[int, Candidate]:
        cfg = self.cfg
        out: dict[int, Candidate] = {}
        for i in layers:
            producer, consumer = model.site_layers(i)
            h = ctx.obs.layers[producer].a
            if h.dim() != 2:
                continue  # (batch, tokens, features) inputs: not scored (module docstring)
            site = self._site(ctx, consumer, h, cfg.width_residual)
            layout = proposals.UnitLayout(1, h.shape[1])
            chain = model.chains[i]

            def make(dt, jit, hh=h, site=site, layout=layout, chain=chain):
                hh, rr, gg = hh.to(dt), site.r_perp.to(dt), site.G_inv.to(dt)

                def feats(th: torch.Tensor) -> torch.Tensor:
                    parts = layout.split(th.to(dt))
                    pre = torch.einsum("nd,pkd->pnk", hh, parts["W"]) + parts["b"][:, None, :]
                    return chain(pre)

                return _score_fn(feats, rr, gg, ctx.obs.n, site.norm, jit)

            dtype = getattr(torch, cfg.search_dtype)
            fn = make(dtype, 1e-6 if dtype == torch.float32 else 1e-10)
            theta0 = proposals.random_candidates(layout, cfg.proposals, generator=self.generator, dtype=dtype,
                                                 device=h.device)
            res = self._search(fn, theta0, tag=("site", i, tuple(h.shape)))
            thetas = res.theta.detach().to(torch.float64)
            exact = make(torch.float64, 1e-10)(thetas)
            exact = torch.where(torch.isfinite(exact), exact, res.score.to(torch.float64))
            out[i] = self._candidate(ctx, "width", i, exact, site.norm, thetas, layout,
                                     self._abs_norm(ctx, consumer, cfg.width_residual))
        return out

    def _commit(self, model: SiteNetwork, cand: Candidate, x: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> ResizeEvent:
        site = model.sites[cand.index]
        ref = site.producer.weight
        parts = cand.layout.split(cand.theta[None].to(dtype=ref.dtype, device=ref.device))
        w, b = parts["W"][0], parts["b"][0]

        def init_in(w_block: torch.Tensor, b_block: torch.Tensor | None) -> None:
            w_block.copy_(w.reshape(w_block.shape))
            if b_block is not None:
                b_block.copy_(b)

        if x is not None:
            with torch.no_grad():
                before = per_sample_loss(self.loss, model(x), y).mean()
        ev = resize_site(site, None, w.shape[0], init_in=init_in, init_out="zeros", model=model.net)
        if x is not None:
            with torch.no_grad():
                after = per_sample_loss(self.loss, model(x), y).mean()
            change = float((after - before).abs() / before.abs().clamp_min(1e-12))
            if not change <= self.cfg.check_tol:
                raise RuntimeError(f"self-expansion: {ev.description} changed the loss by {change:.3g}")
        return ExpansionEvent(ev.params, ev.added, ev.removed, f"{ev.description} (insert)",
                              dict(model.widths()), optimizer_mode=self.cfg.optimizer_mode)
