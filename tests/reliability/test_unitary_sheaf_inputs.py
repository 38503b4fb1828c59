"""Bad and edge-case inputs to the unitary and sheaf layers (issue 17): one-line errors that
name the argument, or outputs of the right shape for empty and edge-less graphs."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphspace.nn.conv.sheaf_conv import ConnectionSheafConv, SheafConv, undirected_edges
from graphspace.nn.conv.unitary_conv import (
    GUMPConv,
    LieUnitaryConv,
    UnitaryConv,
    gump_arcs,
    node_to_arc,
)
from graphspace.nn.validation import GraphInputError, validation

N = 6
EI = torch.tensor([[0, 1, 1, 2, 2, 3, 3, 4, 4, 5], [1, 0, 2, 1, 3, 2, 4, 3, 5, 4]])


def _layers():
    torch.manual_seed(0)
    return {
        "UnitaryConv": (UnitaryConv(2, 3), 4, 6),
        "LieUnitaryConv": (LieUnitaryConv(3, 4), 3, 4),
        "LieUnitaryConv-complex": (LieUnitaryConv(2, 2, complex=True), 4, 4),
        "SheafConv": (SheafConv(4, stalk_dim=2, map_type="general"), 4, 4),
        "ConnectionSheafConv": (ConnectionSheafConv(4, 6, stalk_dim=2), 4, 6),
    }


LAYERS = sorted(_layers())


def _get(name):
    return _layers()[name]


@pytest.mark.parametrize("name", LAYERS)
def test_wrong_feature_dims_and_channels(name):
    conv, width, _ = _get(name)
    with pytest.raises(GraphInputError, match=r"x must be 2-D, got shape \(6,\)"):
        conv(torch.randn(N), EI)
    with pytest.raises(GraphInputError, match=r"x must be 2-D, got shape \(6, 1, "):
        conv(torch.randn(N, 1, width), EI)
    with pytest.raises(GraphInputError, match=rf"{name.split('-')[0]}: .*x.*got shape \(6, 7\)"):
        conv(torch.randn(N, 7), EI)


@pytest.mark.parametrize("name", LAYERS)
def test_int_features_refused(name):
    conv, width, _ = _get(name)
    with pytest.raises(GraphInputError, match="x must be a floating-point tensor, got torch.int64"):
        conv(torch.ones(N, width, dtype=torch.long), EI)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("bad,msg", [
    (torch.tensor([[0, 1], [1, 6]]), "refers to node 6, but the graph has 6 nodes"),
    (torch.tensor([[0, -1], [1, 0]]), r"negative node index \(-1\)"),
    (EI.t().contiguous(), r"shape \(2, E\), got \(10, 2\) \(it looks transposed"),
    (EI.float(), "must be an integer tensor"),
    (torch.zeros(3, 4, dtype=torch.long), r"shape \(2, E\), got \(3, 4\)"),
])
def test_bad_edge_index(name, bad, msg):
    conv, width, _ = _get(name)
    with pytest.raises(GraphInputError, match=msg):
        conv(torch.randn(N, width), bad)


def test_node_6_is_not_node_1_any_more():
    """SheafConv used to map a nonexistent node 6 of a 6-node graph to node 1."""
    conv, width, _ = _get("SheafConv")
    with pytest.raises(GraphInputError, match="edge_index"):
        conv(torch.randn(N, width), torch.tensor([[0], [6]]))
    with pytest.raises(ValueError, match="outside"):
        undirected_edges(torch.tensor([[0], [6]]), 6)


@pytest.mark.parametrize("name", LAYERS)
def test_sparse_adjacency_of_the_wrong_size(name):
    conv, width, _ = _get(name)
    adj = torch.sparse_coo_tensor(EI.flip(0), torch.ones(EI.size(1)), (7, 7))
    with pytest.raises(GraphInputError, match=r"size \(7, 7\) but the graph has 6 nodes"):
        conv(torch.randn(N, width), adj)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("n", [0, 1, 5])
def test_zero_edge_and_empty_graphs_give_outputs_of_the_right_shape(name, n):
    conv, width, out_width = _get(name)
    x = torch.randn(n, width)
    out = conv(x, torch.empty(2, 0, dtype=torch.long))
    assert out.shape == (n, out_width) and torch.isfinite(out).all()


def test_unitary_layers_edge_weight_and_complex_checks():
    conv = UnitaryConv(2, 2)
    with pytest.raises(GraphInputError, match=r"edge_weight must have 10 rows .* got shape \(3,\)"):
        conv(torch.randn(N, 4), EI, torch.ones(3))
    with pytest.raises(GraphInputError, match="complex=True"):
        LieUnitaryConv(2, 2)(torch.randn(N, 2, dtype=torch.complex64), EI)
    with pytest.raises(GraphInputError, match="2 complex channels"):
        conv(torch.randn(N, 3, dtype=torch.complex64), EI)


def test_connection_pos_checks():
    conv, width, _ = _get("ConnectionSheafConv")
    with pytest.raises(GraphInputError, match=r"pos must have 6 rows .* got shape \(5, 3\)"):
        conv(torch.randn(N, width), EI, pos=torch.randn(5, 3))
    with pytest.raises(GraphInputError, match="pos must be a floating-point"):
        conv(torch.randn(N, width), EI, pos=torch.ones(N, 3, dtype=torch.long))


def test_gump_input_checks_and_empty_graphs():
    conv = GUMPConv(4, 3)
    arcs = gump_arcs(EI)
    with pytest.raises(GraphInputError, match=r"x holds one row per arc, so it must have 10 rows"):
        conv(torch.randn(7, 4), arcs)
    with pytest.raises(GraphInputError, match=r"must have 4 channels"):
        conv(torch.randn(10, 5), arcs)
    with pytest.raises(GraphInputError, match="negative node index"):
        conv(torch.randn(2, 4), torch.tensor([[0, -1], [-1, 0]]))
    with pytest.raises(GraphInputError, match="transposed"):
        conv(torch.randn(10, 4), arcs.t().contiguous())
    with pytest.raises(GraphInputError, match="refers to node 6"):
        node_to_arc(torch.randn(N, 2), torch.tensor([[0], [6]]))
    empty = torch.empty(2, 0, dtype=torch.long)
    assert conv(torch.randn(0, 4), empty).shape == (0, 3)
    assert gump_arcs(empty, 3).shape == (2, 0)


def test_validation_can_be_switched_off():
    conv, width, _ = _get("LieUnitaryConv")
    with validation(False):
        out = conv(torch.randn(N, width), EI)
    assert out.shape == (N, 4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(LAYERS),
    n=st.integers(0, 6),
    rows=st.integers(0, 3),
    cols=st.integers(0, 5),
    lo=st.integers(-3, 0),
    hi=st.integers(1, 9),
    xdim=st.integers(1, 3),
    extra=st.integers(-1, 1),
    seed=st.integers(0, 2**16),
)
def test_fuzz_layers_fail_cleanly_or_give_the_right_shape(name, n, rows, cols, lo, hi, xdim,
                                                          extra, seed):
    """Random edge_index / x shapes and values: either a GraphInputError, or (for a valid
    input) a finite output of shape (n, out) -- never a raw torch error."""
    conv, width, out_width = _get(name)
    g = torch.Generator().manual_seed(seed)
    ei = torch.randint(lo, hi, (rows, cols), generator=g)
    shape = [(n,), (n, width + extra), (n, 1, width)][xdim - 1]
    x = torch.randn(*shape, generator=g)
    valid = (rows == 2 and xdim == 2 and extra == 0
             and (cols == 0 or (int(ei.min()) >= 0 and int(ei.max()) < n)))
    if valid:
        out = conv(x, ei)
        assert out.shape == (n, out_width) and torch.isfinite(out).all()
    else:
        with pytest.raises(GraphInputError):
            conv(x, ei)
