"""Width surgery on a group: several producers and consumers that share one width.

A residual stream is the common case: every block's last convolution (and the stage's shortcut) writes
into the same channels, which every next block and the stage's exit read. :func:`resize_group` keeps the
same units, in the same order, in every producer's rows, every per-unit norm and every consumer's
columns, then appends ``n_new`` units everywhere. With zero outgoing weights (the default) the new
units are read by nothing, so the function is unchanged in exact arithmetic (as for a single site, see
:mod:`widthlab.nn.surgery`), whatever the producers write into them.

Groups come from :func:`widthlab.nn.discovery.discover`; a group is described by module names, which
are looked up in the model at each call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from widthlab.nn.discovery import WidthGroup
from widthlab.nn.resize import ResizeEvent, WidthSite
from widthlab.nn.surgery import (
    Edit,
    InitIn,
    InitOut,
    _apply_edits,
    _check_keep,
    _check_site,
    _new_incoming,
    _new_outgoing,
    _norm_edits,
    _set_width_attributes,
)


def resize_group(
    model: nn.Module,
    group: WidthGroup,
    keep: torch.Tensor | Sequence[int] | None = None,
    n_new: int = 0,
    *,
    init_in: InitIn = "kaiming",
    init_out: InitOut = "zeros",
    generator: torch.Generator | None = None,
) -> ResizeEvent:
    """Keep ``keep`` units of every module of ``group`` (in that order) and append ``n_new`` units.

    Arguments as :func:`widthlab.nn.surgery.resize_site`; ``init_in`` fills each producer's new rows,
    ``init_out`` each consumer's new columns. Returns one event listing every replaced parameter
    (producers' weights and biases and norm parameters along dim 0, consumers' weights along dim 1).

    Raises:
        ValueError: the modules disagree on the width or cannot be edited (the message names the
            group); the model is left untouched on error.
    """
    producers = [model.get_submodule(n) for n in group.producers]
    norms = [model.get_submodule(n) for n in group.norms]
    consumers = [model.get_submodule(n) for n in group.consumers]
    if not producers or not consumers:
        raise ValueError(f"group {group.name!r}: needs at least one producer and one consumer")
    # One pseudo-site per producer and per consumer, so that the single-site checks and initialisers
    # apply. A module may be both (a residual branch reading and writing the stream): it is paired with
    # another module of the group.
    def partner(mods: list[nn.Module], names: tuple[str, ...], module: nn.Module) -> tuple[nn.Module, str]:
        for m, n in zip(mods, names):
            if m is not module:
                return m, n
        raise ValueError(f"group {group.name!r}: {type(module).__name__} reads and writes the width alone "
                         "(a recurrence); not supported")

    sites = []
    for p, name in zip(producers, group.producers):
        c, c_name = partner(consumers, group.consumers, p)
        sites.append(WidthSite(group.name, p, c, (), name, c_name))
    for c, name in zip(consumers, group.consumers):
        p, p_name = partner(producers, group.producers, c)
        sites.append(WidthSite(group.name, p, c, (), p_name, name))
    sites.append(WidthSite(group.name, sites[0].producer, sites[0].consumer, tuple(norms)))
    widths = {_check_site(s, model) for s in sites}
    if len(widths) != 1:
        raise ValueError(f"group {group.name!r}: its modules disagree on the width ({sorted(widths)})")
    width = widths.pop()
    keep, n_new = _check_keep(sites[0], keep, width, n_new)
    new_width = len(keep) + n_new
    if n_new == 0 and torch.equal(keep, torch.arange(width)):
        return ResizeEvent(description=f"{group.name}: unchanged ({width})", widths={group.name: width})

    # Every new block first, so that a failing initialiser changes nothing. Rows (producers) before
    # columns (consumers): a module that is both gets its columns edited on its already resized rows.
    edits: list[Edit] = []
    for site, name in zip(sites, group.producers):
        w_in, b_in = _new_incoming(site, n_new, init_in, generator)
        edits += [(site.producer, "weight", name, 0, w_in), (site.producer, "bias", name, 0, b_in)]
    for norm, name in zip(norms, group.norms):
        edits += _norm_edits(norm, name, n_new)
    for site, name in zip(sites[len(producers):], group.consumers):
        block = _new_outgoing(site, n_new, new_width, init_out, generator)
        if any(site.consumer is p for p in producers):
            # Its rows are the group's units too: the block follows them (survivors, then zeros for the
            # new units' rows, which then read nothing new).
            corner = block.new_zeros((n_new, *block.shape[1:]))
            block = torch.cat([block.index_select(0, keep.to(block.device)), corner], 0)
        edits.append((site.consumer, "weight", name, 1, block))

    resized = _apply_edits(edits, keep, n_new)
    for site in sites:
        _set_width_attributes(site, new_width)
    return ResizeEvent(params=tuple(resized), widths={group.name: new_width},
                       description=f"{group.name}: {width} -> {new_width} ({len(keep)} kept, {n_new} new)")
