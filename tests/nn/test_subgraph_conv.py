import pytest
import torch
from torch import nn
from torch_geometric.data import Batch, Data
from torch_geometric.loader import DataLoader
from torch_geometric.nn import GINConv, GraphConv, global_add_pool
from torch_geometric.utils import k_hop_subgraph

from graphspace.data.subgraph_transforms import SubgraphBagData, ToSubgraphBag
from graphspace.nn.conv.subgraph_conv import (
    DSConv,
    DSSConv,
    SPENConv,
    SubgraphBagPool,
    bag_to_nodes,
    subgraph_readout,
)

POLICIES = ["ego", "node_deleted", "edge_deleted"]
F64 = torch.float64
KIND_POLICIES = [("ds", p) for p in POLICIES] + [("dss", p) for p in POLICIES] + [("spen", "ego")]


def _cycle(n: int, offset: int = 0) -> torch.Tensor:
    i = torch.arange(n)
    e = torch.stack([i, (i + 1) % n]) + offset
    return torch.cat([e, e.flip(0)], dim=1)


def _random_graph(n: int, seed: int, p: float = 0.35, feat: int = 3) -> Data:
    g = torch.Generator().manual_seed(seed)
    mask = torch.triu(torch.rand(n, n, generator=g) < p, 1)
    idx = torch.arange(n - 1)
    mask[idx, idx + 1] = True
    mask = mask | mask.T
    x = torch.randn(n, feat, generator=g, dtype=F64)
    return Data(x=x, edge_index=mask.nonzero().T.contiguous())


def _mlp(i: int, o: int) -> nn.Module:
    return nn.Sequential(nn.Linear(i, o), nn.ReLU(), nn.Linear(o, o))


class BagModel(nn.Module):
    """DS-GNN / DSS-GNN / SPEN: three layers, mean readout per subgraph, DeepSets over the bag
    (phi per subgraph, then sum)."""

    def __init__(self, kind: str, in_c: int, hidden: int = 16, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.kind = kind
        dims = [in_c, hidden, hidden, hidden]
        if kind == "spen":
            self.layers = nn.ModuleList(SPENConv(a, b) for a, b in zip(dims, dims[1:]))
        elif kind == "ds":
            self.layers = nn.ModuleList(DSConv(GINConv(_mlp(a, b))) for a, b in zip(dims, dims[1:]))
        else:
            self.layers = nn.ModuleList(
                DSSConv(GINConv(_mlp(a, b)), aggr="mean") for a, b in zip(dims, dims[1:])
            )
        self.phi = _mlp(hidden, hidden)
        self.double()

    def node_features(self, b) -> torch.Tensor:
        h = b.x
        n = int(b.orig_num_nodes.sum())
        for layer in self.layers:
            if self.kind == "ds":
                h = layer(h, b.edge_index)
            elif self.kind == "dss":
                h = layer(h, b.edge_index, b.node_map, b.orig_edge_index, n)
            else:
                h = layer(
                    h,
                    b.edge_index,
                    b.node_map,
                    b.subgraph_id,
                    getattr(b, "batch", None),
                    n,
                    int(b.num_subgraphs.sum()),
                )
            h = h.relu()
        return h

    def subgraph_features(self, b) -> torch.Tensor:
        """phi(mean of the subgraph's node features), one row per subgraph."""
        m = b.subgraph_batch.numel()
        return self.phi(subgraph_readout(self.node_features(b), b.subgraph_id, m))

    def forward(self, b) -> torch.Tensor:
        m = b.subgraph_batch.numel()
        num_graphs = int(b.subgraph_batch.max()) + 1
        # DeepSets over the bag: phi per subgraph readout, then a sum
        pool = SubgraphBagPool("sum", "sum")
        return pool(self.subgraph_features(b), torch.arange(m), b.subgraph_batch, num_graphs)


def _permute_subgraphs(b: SubgraphBagData, pi: torch.Tensor) -> SubgraphBagData:
    """The same bag listing the subgraphs in the order ``pi`` (new k = old pi[k])."""
    inv = torch.empty_like(pi)
    inv[pi] = torch.arange(pi.numel())
    new_sub = inv[b.subgraph_id]
    order = torch.argsort(new_sub * b.num_nodes + torch.arange(b.num_nodes), stable=True)
    where = torch.empty_like(order)
    where[order] = torch.arange(order.numel())
    out = b.clone()
    out.x = b.x[order]
    out.node_map = b.node_map[order]
    out.subgraph_id = new_sub[order]
    out.edge_index = where[b.edge_index]
    return out


# --------------------------------------------------------------------------- transform


@pytest.mark.parametrize(
    "policy,keep,nodes,edges",
    [
        ("ego", True, 36, 24),
        ("ego", False, 18, 24),
        ("node_deleted", True, 36, 48),
        ("node_deleted", False, 30, 48),
        ("edge_deleted", True, 36, 60),
    ],
)
def test_bag_sizes_on_a_cycle(policy, keep, nodes, edges):
    data = Data(x=torch.ones(6, 1), edge_index=_cycle(6))
    b = ToSubgraphBag(policy, keep_all_nodes=keep)(data)
    assert isinstance(b, SubgraphBagData)
    assert b.num_nodes == nodes and b.edge_index.size(1) == edges
    assert b.num_subgraphs.tolist() == [6] and b.orig_num_nodes.tolist() == [6]
    assert b.subgraph_batch.tolist() == [0] * 6
    # edges stay inside their subgraph and map onto original edges
    assert torch.equal(b.subgraph_id[b.edge_index[0]], b.subgraph_id[b.edge_index[1]])
    orig = set(map(tuple, data.edge_index.T.tolist()))
    assert set(map(tuple, b.node_map[b.edge_index].T.tolist())) <= orig
    # sum_j A_j: every cycle edge lies in n-2 node-deleted / m-1 edge-deleted subgraphs
    expected = {"ego": 2.0, "node_deleted": 4.0, "edge_deleted": 5.0}[policy]
    assert b.agg_edge_weight.tolist() == [expected] * 12


@pytest.mark.parametrize("num_hops", [1, 2])
def test_ego_nets_match_k_hop_subgraph(num_hops):
    data = _random_graph(10, 0, p=0.2)
    b = ToSubgraphBag("ego", num_hops=num_hops, keep_all_nodes=False)(data)
    for r in range(10):
        subset, ei, _, _ = k_hop_subgraph(r, num_hops, data.edge_index, num_nodes=10)
        in_r = b.subgraph_id == r
        assert sorted(b.node_map[in_r].tolist()) == sorted(subset.tolist())
        mine = b.node_map[b.edge_index[:, in_r[b.edge_index[0]]]]
        assert sorted(map(tuple, mine.T.tolist())) == sorted(map(tuple, ei.T.tolist()))
        torch.testing.assert_close(b.x[in_r], data.x[b.node_map[in_r]])


def test_root_marking_and_deleted_parts():
    data = _random_graph(7, 1)
    data.edge_attr = torch.arange(data.edge_index.size(1), dtype=F64).view(-1, 1)
    b = ToSubgraphBag("ego", num_hops=1, root_marking=True)(data)
    assert b.x.size(1) == 2 + 3
    roots = b.x[:, 0] == 1
    assert torch.equal(b.x[:, 1] == 0, roots)
    assert torch.equal(b.subgraph_id[roots], torch.arange(7))
    assert torch.equal(b.node_map[roots], torch.arange(7))
    # edge attributes follow their edges
    e = b.edge_attr.view(-1).long()
    assert torch.equal(data.edge_index[:, e], b.node_map[b.edge_index])
    # node-deleted: node i has no edge in subgraph i; edge-deleted: one edge missing each
    nd = ToSubgraphBag("node_deleted")(data)
    touched = nd.node_map[nd.edge_index[0]] == nd.subgraph_id[nd.edge_index[0]]
    assert not touched.any()
    ed = ToSubgraphBag("edge_deleted")(data)
    num_und = data.edge_index.size(1) // 2
    assert int(ed.num_subgraphs) == num_und
    assert ed.edge_index.size(1) == num_und * (data.edge_index.size(1) - 2)
    with pytest.raises(ValueError):
        ToSubgraphBag("node_deleted", root_marking=True)


def test_edge_deleted_without_edges_and_tiny_graphs():
    empty = Data(x=torch.ones(3, 2), edge_index=torch.zeros(2, 0, dtype=torch.long))
    b = ToSubgraphBag("edge_deleted")(empty)
    assert int(b.num_subgraphs) == 1 and b.num_nodes == 3
    single = Data(x=torch.ones(1, 2), edge_index=torch.zeros(2, 0, dtype=torch.long))
    b = ToSubgraphBag("node_deleted", keep_all_nodes=False)(single)
    assert int(b.num_subgraphs) == 1 and b.num_nodes == 1


@pytest.mark.parametrize("kind,policy", [("ds", "edge_deleted"), ("dss", "ego"), ("spen", "ego")])
def test_dataloader_batching_matches_per_graph(kind, policy):
    t = ToSubgraphBag(policy, keep_all_nodes=kind != "spen")
    graphs = [_random_graph(n, s) for n, s in ((5, 0), (8, 1), (6, 2))]
    bags = [t(g) for g in graphs]
    batch = next(iter(DataLoader(bags, batch_size=3)))
    assert batch.num_subgraphs.tolist() == [int(b.num_subgraphs) for b in bags]
    assert int(batch.node_map.max()) == 5 + 8 + 6 - 1
    assert int(batch.orig_edge_index.max()) == 5 + 8 + 6 - 1
    assert int(batch.subgraph_id.max()) + 1 == batch.subgraph_batch.numel()
    assert batch.subgraph_batch.unique().tolist() == [0, 1, 2]
    # bag nodes of graph k map to graph k's original nodes
    offsets = torch.tensor([0, 5, 13])
    assert bool((batch.node_map >= offsets[batch.batch]).all())
    model = BagModel(kind, 3)
    together = model(batch)
    separate = torch.cat([model(Batch.from_data_list([b])) for b in bags])
    torch.testing.assert_close(together, separate, atol=1e-12, rtol=0)


# --------------------------------------------------------------------------- layers vs refs


def test_ds_conv_is_the_conv_on_each_subgraph_separately():
    data = _random_graph(7, 3)
    b = ToSubgraphBag("ego", num_hops=1, keep_all_nodes=False)(data)
    torch.manual_seed(0)
    layer = DSConv(GraphConv(3, 5)).double()
    out = layer(b.x, b.edge_index)
    for s in range(int(b.num_subgraphs)):
        idx = (b.subgraph_id == s).nonzero().view(-1)
        local = torch.full((b.num_nodes,), -1)
        local[idx] = torch.arange(idx.numel())
        keep = b.subgraph_id[b.edge_index[0]] == s
        ref = layer.conv(b.x[idx], local[b.edge_index[:, keep]])
        torch.testing.assert_close(out[idx], ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("aggr", ["sum", "mean"])
@pytest.mark.parametrize("policy", POLICIES)
def test_dss_conv_matches_dense_paper_formula(aggr, policy):
    n = 7
    data = _random_graph(n, 4)
    b = ToSubgraphBag(policy)(data)  # keep_all_nodes: the bag is an m x n tensor
    m = int(b.num_subgraphs)
    torch.manual_seed(0)
    layer = DSSConv(GraphConv(3, 4), aggr=aggr).double()
    out = layer(b.x, b.edge_index, b.node_map, b.orig_edge_index, n).view(m, n, 4)
    xs = b.x.view(m, n, 3)
    adj = torch.zeros(m, n, n, dtype=F64)
    sub = b.subgraph_id[b.edge_index[0]]
    adj[sub, b.node_map[b.edge_index[1]], b.node_map[b.edge_index[0]]] = 1.0
    a = torch.zeros(n, n, dtype=F64)
    a[data.edge_index[1], data.edge_index[0]] = 1.0

    def graph_conv(conv, adjacency, x):  # GraphConv: W_root x_i + W_rel sum_j a_ij x_j
        return conv.lin_root(x) + conv.lin_rel(adjacency @ x)

    pooled = xs.sum(0) if aggr == "sum" else xs.mean(0)
    ref = graph_conv(layer.conv, adj, xs) + graph_conv(layer.agg_conv, a, pooled)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    # L2 on sum_j A_j through the edge weights
    out_w = layer(
        b.x, b.edge_index, b.node_map, b.orig_edge_index, n, orig_edge_attr=b.agg_edge_weight
    ).view(m, n, 4)
    ref_w = graph_conv(layer.conv, adj, xs) + graph_conv(layer.agg_conv, adj.sum(0), pooled)
    torch.testing.assert_close(out_w, ref_w, atol=1e-12, rtol=0)


@pytest.mark.parametrize("aggr", ["sum", "mean"])
def test_spen_conv_matches_loop_reference(aggr):
    data = _random_graph(8, 5)
    b = ToSubgraphBag("ego", num_hops=1, keep_all_nodes=False)(data)
    torch.manual_seed(0)
    layer = SPENConv(3, 4, aggr=aggr).double()
    out = layer(b.x, b.edge_index, b.node_map, b.subgraph_id)
    red = (lambda t: t.sum(0)) if aggr == "sum" else (lambda t: t.mean(0))
    edges = b.edge_index.T.tolist()
    for k in range(b.num_nodes):
        s, v = int(b.subgraph_id[k]), int(b.node_map[k])
        nbrs = [src for src, dst in edges if dst == k]
        msg = b.x[nbrs].sum(0) if nbrs else torch.zeros(3, dtype=F64)
        ref = (
            layer.lin_self(b.x[k])
            + layer.lin_nbr(msg)
            + layer.lin_sub(red(b.x[b.subgraph_id == s]))
            + layer.lin_node(red(b.x[b.node_map == v]))
            + layer.lin_bag(red(b.x))
        )
        torch.testing.assert_close(out[k], ref, atol=1e-12, rtol=0)


# --------------------------------------------------------------------------- symmetries


@pytest.mark.parametrize(
    "kind,policy",
    [("ds", p) for p in POLICIES] + [("dss", p) for p in POLICIES] + [("spen", "ego")],
)
def test_invariant_to_the_order_of_subgraphs(kind, policy):
    data = _random_graph(7, 6)
    b = ToSubgraphBag(policy, keep_all_nodes=kind != "spen")(data)
    m = int(b.num_subgraphs)
    pi = torch.randperm(m, generator=torch.Generator().manual_seed(0))
    b2 = _permute_subgraphs(b, pi)
    assert not torch.equal(b2.edge_index, b.edge_index)  # the bag really changed
    model = BagModel(kind, 3)
    torch.testing.assert_close(model(b2), model(b), atol=1e-12, rtol=0)
    # per-subgraph readouts are permuted with the subgraphs (equivariance) ...
    hs, hs2 = model.subgraph_features(b), model.subgraph_features(b2)
    torch.testing.assert_close(hs2, hs[pi], atol=1e-12, rtol=0)
    # ... so an order-dependent readout (negative control: flatten instead of pool) changes
    assert (hs2.flatten() - hs.flatten()).abs().max() > 1e-6
    # node-level readouts are invariant too
    n = 7
    h1 = bag_to_nodes(model.node_features(b), b.node_map, n)
    h2 = bag_to_nodes(model.node_features(b2), b2.node_map, n)
    torch.testing.assert_close(h2, h1, atol=1e-12, rtol=0)


def _permute_graph(data: Data, perm: torch.Tensor) -> Data:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return Data(x=data.x[perm], edge_index=inv[data.edge_index])


@pytest.mark.parametrize(
    "kind,policy,marking",
    [("ds", "edge_deleted", False), ("dss", "ego", True), ("dss", "node_deleted", False)]
    + [("spen", "ego", True)],
)
def test_node_permutation_equivariance_with_negative_control(kind, policy, marking):
    n = 8
    data = _random_graph(n, 7)
    t = ToSubgraphBag(policy, root_marking=marking, keep_all_nodes=kind != "spen")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    model = BagModel(kind, 5 if marking else 3)
    h = bag_to_nodes(model.node_features(t(data)), t(data).node_map, n)
    bp = t(_permute_graph(data, perm))
    hp = bag_to_nodes(model.node_features(bp), bp.node_map, n)
    torch.testing.assert_close(hp, h[perm], atol=1e-12, rtol=0)
    torch.testing.assert_close(model(bp), model(t(data)), atol=1e-12, rtol=0)
    # negative control: permuting features without the graph is not a symmetry
    wrong = t(Data(x=data.x[perm], edge_index=data.edge_index))
    hw = bag_to_nodes(model.node_features(wrong), wrong.node_map, n)
    assert (hw - h[perm]).abs().max() > 1e-6


def _two_triangles_and_hexagon() -> tuple[Data, Data]:
    tri2 = Data(x=torch.ones(6, 1, dtype=F64), edge_index=torch.cat([_cycle(3), _cycle(3, 3)], 1))
    c6 = Data(x=torch.ones(6, 1, dtype=F64), edge_index=_cycle(6))
    return tri2, c6


def test_gin_cannot_distinguish_two_triangles_from_a_hexagon():
    tri2, c6 = _two_triangles_and_hexagon()
    torch.manual_seed(0)
    convs = nn.ModuleList([GINConv(_mlp(1, 16)), GINConv(_mlp(16, 16)), GINConv(_mlp(16, 16))])
    convs.double()

    def gin(d: Data) -> torch.Tensor:
        h = d.x
        for c in convs:
            h = c(h, d.edge_index).relu()
        return global_add_pool(h, torch.zeros(6, dtype=torch.long))

    torch.testing.assert_close(gin(tri2), gin(c6), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "kind,policy",
    [("ds", p) for p in POLICIES] + [("dss", p) for p in POLICIES] + [("spen", "ego")],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_subgraph_models_distinguish_what_1wl_cannot(kind, policy, seed):
    tri2, c6 = _two_triangles_and_hexagon()
    t = ToSubgraphBag(policy, keep_all_nodes=kind != "spen")
    model = BagModel(kind, 1, seed=seed)
    diff = (model(t(tri2)) - model(t(c6))).abs().max()
    assert diff > 1e-6, float(diff)


@pytest.mark.parametrize("kind", ["ds", "dss", "spen"])
def test_gradients_flow(kind):
    t = ToSubgraphBag("ego", root_marking=True, keep_all_nodes=kind != "spen")
    batch = Batch.from_data_list([t(_random_graph(6, 8)), t(_random_graph(9, 9))])
    batch.x.requires_grad_()
    model = BagModel(kind, 5)
    model(batch).pow(2).sum().backward()
    assert torch.isfinite(batch.x.grad).all() and batch.x.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_repr_and_channels():
    ds = DSConv(GraphConv(3, 4))
    assert repr(ds) == "DSConv(GraphConv(3, 4))"
    assert (ds.in_channels, ds.out_channels) == (3, 4)
    dss = DSSConv(GINConv(_mlp(3, 8)), aggr="mean")
    assert repr(dss).startswith("DSSConv(GINConv(nn=Sequential(")
    assert repr(dss).endswith("aggr='mean')")
    assert (dss.in_channels, dss.out_channels) == (3, 8)
    # the information-sharing conv is a separately initialised copy
    w1 = dss.conv.nn[0].weight
    w2 = dss.agg_conv.nn[0].weight
    assert w1.shape == w2.shape and not torch.equal(w1, w2)
    assert repr(SPENConv(3, 4)) == "SPENConv(3, 4, aggr='mean', bag_term=True)"
    assert repr(SubgraphBagPool()) == "SubgraphBagPool(node_reduce='mean', bag_reduce='mean')"
    assert repr(ToSubgraphBag("ego", 2, True)) == (
        "ToSubgraphBag(policy='ego', num_hops=2, root_marking=True, keep_all_nodes=True)"
    )
    with pytest.raises(ValueError):
        SPENConv(3, 4, aggr="max")
    with pytest.raises(ValueError):
        ToSubgraphBag("random")


@pytest.mark.parametrize("node_reduce", ["sum", "mean", "max"])
@pytest.mark.parametrize("bag_reduce", ["sum", "mean", "max"])
def test_bag_pool_matches_manual_readout(node_reduce, bag_reduce):
    t = ToSubgraphBag("ego", keep_all_nodes=False)
    bags = [t(_random_graph(5, 10)), t(_random_graph(7, 11))]
    batch = Batch.from_data_list(bags)
    out = SubgraphBagPool(node_reduce, bag_reduce)(batch.x, batch.subgraph_id, batch.subgraph_batch)
    red = {"sum": lambda v: v.sum(0), "mean": lambda v: v.mean(0), "max": lambda v: v.amax(0)}
    for g, b in enumerate(bags):
        per_sub = torch.stack(
            [red[node_reduce](b.x[b.subgraph_id == s]) for s in range(int(b.num_subgraphs))]
        )
        torch.testing.assert_close(out[g], red[bag_reduce](per_sub), atol=1e-12, rtol=0)
    sub = subgraph_readout(batch.x, batch.subgraph_id, batch.subgraph_batch.numel(), "sum")
    assert sub.shape == (12, 3)
    torch.testing.assert_close(sub.sum(0), batch.x.sum(0))
