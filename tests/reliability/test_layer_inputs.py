"""Bad inputs to the metanetwork, EGNN and subgraph layers: one clear error that names the
argument (never a raw torch error, never silent acceptance), and empty / zero-edge graphs
that give outputs of the right shape (issue 17, item 1)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch_geometric.nn import GraphConv

from graphspace.nn.conv import (
    EGNN,
    DSConv,
    DSSConv,
    EGNNConv,
    MetaNetworkConv,
    SPENConv,
    SubgraphBagPool,
)
from graphspace.nn.validation import GraphInputError, validation

N, E = 6, 10
ERRORS = (GraphInputError, TypeError, ValueError)


def _ei(n: int = N, e: int = E, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, n, (2, e), generator=torch.Generator().manual_seed(seed))


def _layers():
    """name -> (layer, good keyword inputs, call). Bag layers see a bag of 2 * 3 nodes."""
    torch.manual_seed(0)
    node_map = torch.arange(3).repeat(2)
    sub = torch.arange(2).repeat_interleave(3)
    return {
        "metanetwork": (MetaNetworkConv(4, 4, edge_dim=2),
                        dict(x=torch.randn(N, 4), edge_index=_ei(),
                             edge_attr=torch.randn(E, 2)),
                        lambda m, a: m(a["x"], a["edge_index"], a["edge_attr"])),
        "egnn": (EGNNConv(4, 4, hidden_channels=8, edge_dim=2),
                 dict(x=torch.randn(N, 4), pos=torch.randn(N, 3), edge_index=_ei(),
                      edge_attr=torch.randn(E, 2)),
                 lambda m, a: m(a["x"], a["pos"], a["edge_index"], a["edge_attr"])),
        "egnn_model": (EGNN(4, 8, 2, num_layers=2),
                       dict(x=torch.randn(N, 4), pos=torch.randn(N, 3), edge_index=_ei()),
                       lambda m, a: m(a["x"], a["pos"], a["edge_index"])),
        "ds": (DSConv(GraphConv(4, 4)), dict(x=torch.randn(N, 4), edge_index=_ei()),
               lambda m, a: m(a["x"], a["edge_index"])),
        "dss": (DSSConv(GraphConv(4, 4)),
                dict(x=torch.randn(N, 4), edge_index=_ei(), node_map=node_map,
                     orig_edge_index=_ei(3, 4)),
                lambda m, a: m(a["x"], a["edge_index"], a["node_map"], a["orig_edge_index"],
                                num_nodes=3)),
        "spen": (SPENConv(4, 4),
                 dict(x=torch.randn(N, 4), edge_index=_ei(), node_map=node_map,
                      subgraph_id=sub),
                 lambda m, a: m(a["x"], a["edge_index"], a["node_map"], a["subgraph_id"],
                                num_nodes=3, num_subgraphs=2)),
    }


LAYERS = list(_layers())


def _bad(name: str, arg: str, kind: str):
    layer, good, call = _layers()[name]
    bad = dict(good)
    t = good[arg]
    if kind == "no_tensor":
        bad[arg] = t.tolist()
    elif kind == "flat":
        bad[arg] = t.reshape(-1)
    elif kind == "extra_dim":
        bad[arg] = t.unsqueeze(0)
    elif kind == "channels":
        bad[arg] = torch.cat([t, t[:, :1]], dim=1)
    elif kind == "rows":
        bad[arg] = t[:-1]
    elif kind == "int":
        bad[arg] = t.long() if t.is_floating_point() else t.float()
    elif kind == "transposed":
        bad[arg] = t.t().contiguous()
    elif kind == "too_big":
        bad[arg] = t.clone()
        bad[arg].view(-1)[-1] = 1000
    elif kind == "negative":
        bad[arg] = t.clone()
        bad[arg].view(-1)[0] = -1
    return layer, bad, call


# (layer, argument, kind of damage)
CASES = [(n, "x", k) for n in LAYERS for k in ("no_tensor", "flat", "extra_dim", "channels",
                                                "int")]
CASES += [(n, a, k) for n in LAYERS for a in ("edge_index", "orig_edge_index")
          if a in _layers()[n][1]
          for k in ("no_tensor", "transposed", "int", "too_big", "negative", "flat")]
CASES += [(n, "edge_attr", k) for n in ("metanetwork", "egnn")
          for k in ("rows", "channels", "int", "extra_dim")]
CASES += [(n, "pos", k) for n in ("egnn", "egnn_model") for k in ("rows", "int", "flat")]
CASES += [(n, a, k) for n in ("dss", "spen") for a in ("node_map", "subgraph_id")
          if a in _layers()[n][1] for k in ("rows", "too_big", "negative", "int", "extra_dim")]


@pytest.mark.parametrize("name,arg,kind", CASES)
def test_bad_input_names_the_argument(name, arg, kind):
    layer, bad, call = _bad(name, arg, kind)
    with pytest.raises(ERRORS) as info:
        call(layer, bad)
    msg = str(info.value)
    assert arg in msg, msg
    assert "\n" not in msg


def test_messages_name_expected_and_actual():
    layer, bad, call = _bad("metanetwork", "x", "channels")
    with pytest.raises(GraphInputError, match=r"MetaNetworkConv: x must have 4 channels.*"
                                              r"got shape \(6, 5\)"):
        call(layer, bad)
    layer, bad, call = _bad("egnn", "edge_index", "transposed")
    with pytest.raises(GraphInputError, match=r"shape \(2, E\), got \(10, 2\).*transposed"):
        call(layer, bad)
    layer, bad, call = _bad("spen", "edge_index", "negative")
    with pytest.raises(GraphInputError, match="negative node index"):
        call(layer, bad)
    # MetaNetworkConv range-checks the sources too, not only edge_index[1]
    layer, good, call = _layers()["metanetwork"]
    good["edge_index"] = good["edge_index"].clone()
    good["edge_index"][0, 0] = N
    with pytest.raises(GraphInputError, match=f"refers to node {N}"):
        call(layer, good)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("empty", ["no_edges", "no_nodes"])
def test_empty_and_edgeless_graphs(name, empty):
    layer, good, call = _layers()[name]
    inp = dict(good)
    inp["edge_index"] = torch.zeros(2, 0, dtype=torch.long)
    if "edge_attr" in inp:
        inp["edge_attr"] = inp["edge_attr"][:0]
    if empty == "no_nodes":
        for k in ("x", "pos", "node_map", "subgraph_id"):
            if k in inp:
                inp[k] = inp[k][:0]
        if "orig_edge_index" in inp:
            inp["orig_edge_index"] = inp["edge_index"]
    out = call(layer, inp)
    outs = out if isinstance(out, tuple) else (out,)
    n = inp["x"].size(0)
    assert outs[0].size(0) == n and torch.isfinite(outs[0]).all()
    if name.startswith("egnn"):
        assert outs[1].shape == inp["pos"].shape
        if empty == "no_edges":  # nothing moves without neighbours
            torch.testing.assert_close(outs[1], inp["pos"])


def test_metanetwork_zero_edges_returns_edge_attr_of_right_shape():
    conv = MetaNetworkConv(4, 4, edge_dim=2, edge_out_channels=3)
    out, e = conv(torch.randn(N, 4), torch.zeros(2, 0, dtype=torch.long), torch.randn(0, 2),
                  return_edge_attr=True)
    assert out.shape == (N, 4) and e.shape == (0, 3)


def test_bag_pool_checks_and_empty_bag():
    pool = SubgraphBagPool()
    x = torch.randn(6, 3)
    sub = torch.arange(2).repeat_interleave(3)
    sb = torch.zeros(2, dtype=torch.long)
    assert pool(x, sub, sb).shape == (1, 3)
    with pytest.raises(GraphInputError, match="subgraph_id"):
        pool(x, sub + 5, sb)
    with pytest.raises(GraphInputError, match="subgraph_id"):
        pool(x, sub[:-1], sb)
    assert pool(x[:0], sub[:0], sb[:0], num_graphs=2).shape == (2, 3)


def test_validation_can_be_switched_off():
    layer, good, call = _layers()["spen"]
    ref = call(layer, good)
    with validation(False):
        torch.testing.assert_close(call(layer, good), ref)
        _, bad, _ = _bad("spen", "node_map", "rows")
        with pytest.raises(Exception) as info:  # the raw error of the unchecked kernel
            call(layer, bad)
        assert not isinstance(info.value, GraphInputError)
    _, bad, _ = _bad("spen", "node_map", "rows")
    with pytest.raises(GraphInputError):
        call(layer, bad)


KINDS = ["no_tensor", "flat", "extra_dim", "channels", "rows", "int", "transposed", "too_big",
         "negative"]


@settings(max_examples=50, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(LAYERS), data=st.data())
def test_fuzz_bad_inputs_give_clear_errors(name, data):
    """Random damage to a random argument of a random layer: a GraphInputError / TypeError /
    ValueError naming the argument, or (where the damage leaves the input valid: a
    repeated edge) a correct-shape output."""
    layer, good, call = _layers()[name]
    arg = data.draw(st.sampled_from(sorted(good)))
    kind = data.draw(st.sampled_from(KINDS))
    t = good[arg]
    if kind in ("channels", "transposed") and t.dim() != 2:
        kind = "flat"
    if kind in ("too_big", "negative") and t.is_floating_point():
        kind = "int"
    if kind == "flat" and t.dim() == 1:
        kind = "extra_dim"
    _, bad, _ = _bad(name, arg, kind)
    try:
        out = call(layer, bad)
    except ERRORS as err:
        assert arg in str(err), (arg, kind, str(err))
        return
    # accepted: only damage that leaves a valid input (one more edge, repeating the first)
    out = out[0] if isinstance(out, tuple) else out
    assert (arg, kind) in {("edge_index", "channels"), ("orig_edge_index", "channels")}, \
        f"{name}: {arg} damaged by {kind} was accepted (output {tuple(out.shape)})"
    assert out.size(0) == bad["x"].size(0)


def test_the_index_range_memo_never_skips_a_changed_or_new_tensor():
    from graphspace.nn.validation import GraphInputError, check_edge_index

    e = torch.tensor([[0, 1], [1, 2]])
    check_edge_index(e, 3)
    check_edge_index(e, 3)  # remembered
    with pytest.raises(GraphInputError, match="node 2"):
        check_edge_index(e, 2)  # same tensor, fewer nodes
    e[1, 1] = 7  # in place: the version counter moves
    with pytest.raises(GraphInputError, match="node 7"):
        check_edge_index(e, 3)
    with pytest.raises(GraphInputError, match="negative"):
        check_edge_index(torch.tensor([[0, -1], [1, 2]]), 3)  # a new tensor


def test_index_range_check_works_on_inference_tensors():
    from graphspace.nn.validation import GraphInputError, check_edge_index

    with torch.inference_mode():  # Lightning's test and predict loops
        e = torch.tensor([[0, 1], [1, 2]])
        check_edge_index(e, 3)
        with pytest.raises(GraphInputError, match="node 2"):
            check_edge_index(e, 2)
