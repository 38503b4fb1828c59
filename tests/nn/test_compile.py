"""The layers trace under ``torch.compile(fullgraph=True)`` (no graph breaks), forward and
backward, and the compiled module computes what the eager one does.

Run with ``-m full`` (deselected by default: tracing takes a few seconds per layer).
"""

from __future__ import annotations

import pytest
import torch
from torch_geometric.nn import GraphConv

from graphspace.data.subgraph_transforms import ToSubgraphBag
from graphspace.nn.conv.egnn_conv import EGNNConv
from graphspace.nn.conv.metanetwork_conv import MetaNetworkConv
from graphspace.nn.conv.sheaf_conv import SheafConv
from graphspace.nn.conv.subgraph_conv import DSSConv, SPENConv
from graphspace.nn.conv.unitary_conv import LieUnitaryConv, UnitaryConv

pytestmark = pytest.mark.full

N, E = 12, 40


def _graph(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ei = torch.randint(0, N, (2, E), generator=g)
    ei = ei[:, ei[0] != ei[1]]
    ei = torch.cat([ei, ei.flip(0)], 1)  # undirected (sheaf/unitary need symmetric operators)
    return ei


def _check(module, *args, fullgraph=True):
    torch._dynamo.reset()
    eager = module(*args)
    compiled = torch.compile(module, fullgraph=fullgraph, backend="aot_eager")
    out = compiled(*args)
    outs = out if isinstance(out, tuple) else (out,)
    refs = eager if isinstance(eager, tuple) else (eager,)
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)
    sum(o.float().square().sum() for o in outs).backward()
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)


def test_metanetwork_conv_compiles():
    ei = _graph()
    _check(MetaNetworkConv(8, 8, edge_dim=4), torch.randn(N, 8), ei, torch.randn(ei.size(1), 4))


def test_egnn_conv_compiles():
    ei = _graph()
    _check(EGNNConv(5, 5, hidden_channels=16, edge_dim=2), torch.randn(N, 5), torch.randn(N, 3),
           ei, torch.randn(ei.size(1), 2))


@pytest.mark.parametrize("map_type", ["diag", "orthogonal", "general"])
def test_sheaf_conv_compiles(map_type):
    _check(SheafConv(6, stalk_dim=3, map_type=map_type), torch.randn(N, 6), _graph())


def test_unitary_convs_compile():
    # the scaling-and-squaring step count depends on a norm bound of the data (t, the graph,
    # the weight), read back as a Python number: one graph break, so not fullgraph
    ei = _graph()
    _check(UnitaryConv(4, 4), torch.randn(N, 8), ei, fullgraph=False)
    _check(LieUnitaryConv(4, 4), torch.randn(N, 4), ei, fullgraph=False)


def test_subgraph_convs_compile():
    from torch_geometric.data import Data

    ei = _graph()
    b = ToSubgraphBag("ego", num_hops=1)(Data(x=torch.randn(N, 3), edge_index=ei))
    _check(DSSConv(GraphConv(3, 4)), b.x, b.edge_index, b.node_map, b.orig_edge_index, N)
    b = ToSubgraphBag("ego", num_hops=1, keep_all_nodes=False)(Data(x=torch.randn(N, 3),
                                                                     edge_index=ei))
    _check(SPENConv(3, 4), b.x, b.edge_index, b.node_map, b.subgraph_id)
