"""Recurrent layers: LSTM, GRU, RNN."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from graphspace.graphs.analysis.context import (
    Act,
    TupleOut,
)
from graphspace.graphs.analysis.ops.table import _op_name, _path, _shapes, op
from graphspace.graphs.analysis.ops.walker import Walker
from graphspace.graphs.analysis.records import Use
from graphspace.graphs.errors import UnsupportedOperationError

# ---------------------------------------------------------------------------------------------
# recurrent layers
# ---------------------------------------------------------------------------------------------

_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


@op("lstm", "gru", "rnn_tanh", "rnn_relu", weights=True)
def _rnn(w: Walker, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    """LSTM/GRU/RNN: per layer and direction, a gate set (`gates x H` neurons: rows of
    `weight_ih`/`weight_hh`, biases in columns 0 and 1) and a hidden set of `H` neurons
    (struct edges gate -> hidden). A hidden unit's gate rows and recurrence move together."""
    name = _op_name(node)
    ctx = w.ctx
    path = _path(node)
    mod = path.split(" (")[0]
    # (input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
    x, _, params, has_b, layers, _, _, bidir, _ = args[:9]
    gates = _GATES[name]
    ndir = 2 if bidir else 1
    per = 4 if has_b else 2
    params = list(params)
    if len(params) != layers * ndir * per:
        raise UnsupportedOperationError(path, name, "projections (proj_size) are not supported")
    shapes = _shapes(node)
    out_shape = shapes[0]
    h = params[1].shape[1]
    cur: Act | None = None
    inp = x
    depth = x.depth if isinstance(x, Act) else 0
    hidden_sets: list[list[int]] = []
    for layer in range(layers):
        in_size = params[layer * ndir * per].shape[1]
        if layer == 0:
            xa = ctx.resolve(inp, in_size, path, -1, name)
            src = xa.along(-1, path, name)
            ctx.add_use(xa, Use("param", xa.chain, params[0].param or ""))
        else:
            assert cur is not None
            src = cur.ids.reshape(-1)
        hs = []
        for d in range(ndir):
            base = (layer * ndir + d) * per
            w_ih, w_hh = params[base], params[base + 1]
            dep = depth + 1 + layer
            tag = f"{mod}.l{layer}{'_reverse' if d else ''}"
            gid = ctx.new_set(gates * h, "recurrent", f"{tag}.gates", dep)
            hid = ctx.new_set(h, "recurrent", tag, dep)
            gn, hn = ctx.sets[gid].nodes, ctx.sets[hid].nodes
            k_ih, f_ih = w.weight(w_ih, path)
            k_hh, f_hh = w.weight(w_hh, path)
            if f_ih is not None or f_hh is not None:
                raise UnsupportedOperationError(path, name, "reshaped recurrent weights")
            ctx.add_edge_param(k_ih, gn, src, "linear", dep, mod, dst_sets=[gid],
                               src_sets=ctx.sets_of(src))
            ctx.add_edge_param(k_hh, gn, hn, "recurrent", dep, mod, dst_sets=[gid],
                               src_sets=[hid])
            if has_b:
                for col, bp in ((0, params[base + 2]), (1, params[base + 3])):
                    bk, _ = w.weight(bp, path, "bias")
                    ctx.add_node_param(bk, gn, col, mod, dep, sets=[gid])
            gv = gn.view(gates, h)
            for g in range(gates):
                ctx.cell(gv[g], "gate")
                ctx.tie_nodes(gv[g], hn)
                ctx.add_struct_edges(gv[g], hn, 1.0, "recurrent", dep)
            hs.append(hn)
            hidden_sets.append([hid])
            ctx.uses.setdefault(hid, []).append(Use("other", (), path))
        allh = torch.cat(hs)
        cur = Act(allh, (True,), (allh.numel(),), depth + 1 + layer)
    assert cur is not None
    # outputs: (B, T, D*H) and final states (L*D, B, H)
    nd = len(out_shape)
    ids = cur.ids.view((1,) * (nd - 1) + (-1,))
    out = Act(ids, (False,) * (nd - 1) + (True,), out_shape, cur.depth)
    states = []
    allh = torch.stack([ctx.sets[s[0]].nodes for s in hidden_sets])  # (L*D, H)
    for shp in shapes[1:]:
        states.append(Act(allh.view(allh.shape[0], 1, allh.shape[1]), (True, False, True),
                          shp, cur.depth))
    return TupleOut([out] + states)
