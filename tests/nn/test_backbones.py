"""Every message-passing family as the backbone of GraphMetaNetwork, on parameter graphs."""

import itertools

import networkx as nx
import pytest
import torch
from torch_geometric.data import Batch

from graphspace.graphs import ParameterGraph, permute_model
from graphspace.nn import BACKBONES, GraphMetaNetwork, UnitaryConv, register_backbone
from graphspace.nn.models.backbones import (
    EGNNBlock,
    EgoNetBag,
    MetaNetBlock,
    SheafBlock,
    SymmetricOperator,
    UnitaryBlock,
    _triangles,
    make_state,
)
from graphspace.testing import swap_io_neurons
from graphspace.testing.models import MLP, ResNet, SmallCNN

NEW = ["egnn", "sheaf", "unitary", "subgraph", "gump", "connection_sheaf", "ds", "dss"]
# (backbone, backbone_kwargs): every registered family, plus the main options
CONFIGS = [(name, {}) for name in sorted(BACKBONES)] + [
    ("egnn", {"coords": "positional"}),
    ("sheaf", {"map_type": "orthogonal", "stalk_dim": 4}),
    ("sheaf", {"map_type": "general", "stalk_dim": 2}),
    ("unitary", {"conv": "lie", "heads": 2}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" if kw else n for n, kw in CONFIGS]


def _models():
    torch.manual_seed(0)
    return [MLP((5, 8, 8, 3)), SmallCNN(channels=6, num_classes=3),
            ResNet(widths=(4, 6), blocks=1, num_classes=3)]


def _batch(models):
    b = Batch.from_data_list([ParameterGraph.from_module(m) for m in models])
    b.x, b.edge_attr = b.x.double(), b.edge_attr.double()
    return b


@pytest.fixture(scope="module")
def graphs():
    models = _models()
    permuted = [permute_model(m, generator=torch.Generator().manual_seed(i))[0]
                for i, m in enumerate(models)]
    return (_batch(models), _batch(permuted), _batch([swap_io_neurons(m) for m in models]))


def _net(name, kw, **extra):
    torch.manual_seed(1)
    return GraphMetaNetwork(2, hidden_channels=16, num_layers=2, backbone=name,
                            backbone_kwargs=kw, **extra).double()


def test_all_families_registered():
    assert set(NEW) <= set(BACKBONES) and "metanet" in BACKBONES


@pytest.mark.parametrize(("name", "kw"), CONFIGS, ids=IDS)
def test_invariant_to_hidden_permutations_not_to_input_swaps(graphs, name, kw):
    g, g_perm, g_swap = graphs
    net = _net(name, kw).eval()
    with torch.no_grad():
        a, b, c = net(g), net(g_perm), net(g_swap)
    assert a.shape == (3, 2) and torch.isfinite(a).all()
    assert (a - b).abs().max() <= 1e-6
    # negative control: swapping two input neurons is not a symmetry (fp64: the invariance
    # error above is ~1e-15, so 1e-8 separates the two cases by seven orders of magnitude)
    assert (a - c).abs().max() > 1e-8


def test_invariance_with_output_readout(graphs):
    g, g_perm, _ = graphs
    for name in NEW:
        net = _net(name, {}, readout="output", num_outputs=3).eval()
        with torch.no_grad():
            assert torch.allclose(net(g), net(g_perm), atol=1e-6), name


@pytest.mark.parametrize(("name", "kw"), CONFIGS, ids=IDS)
def test_gradients_reach_every_parameter(graphs, name, kw):
    net = _net(name, kw)
    net(graphs[0]).pow(2).sum().backward()
    missing = [n for n, p in net.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert not missing, missing


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_reset_parameters_is_seeded_and_changes_outputs(graphs, name):
    g = graphs[0]
    net = _net(name, {}).eval()
    with torch.no_grad():
        before = net(g)
        torch.manual_seed(123)
        net.reset_parameters()
        first = net(g)
        torch.manual_seed(123)
        net.reset_parameters()
        second = net(g)
    assert torch.equal(first, second)
    assert (first - before).abs().max() > 1e-6


def test_repr_and_bad_configuration():
    for name in sorted(BACKBONES):
        net = GraphMetaNetwork(1, hidden_channels=16, num_layers=1, backbone=name)
        assert f"backbone={name!r}" in repr(net)
    egnn = GraphMetaNetwork(1, 16, backbone="egnn", backbone_kwargs={"coords": "positional"})
    assert "EGNNBlock(coords='positional'" in repr(egnn.blocks[0])
    assert "SheafConv" in repr(SheafBlock(16, 16))
    assert "UnitaryConv" in repr(UnitaryBlock(16, 16))
    with pytest.raises(ValueError, match="unknown backbone 'gcn'.*egnn"):
        GraphMetaNetwork(1, backbone="gcn")
    with pytest.raises(ValueError, match="coords"):
        GraphMetaNetwork(1, 16, backbone="egnn", backbone_kwargs={"coords": "random"})
    with pytest.raises(ValueError, match="divisible"):
        GraphMetaNetwork(1, 18, backbone="unitary", backbone_kwargs={"heads": 4})
    with pytest.raises(ValueError, match="divisible"):
        GraphMetaNetwork(1, 18, backbone="sheaf", backbone_kwargs={"stalk_dim": 4})
    with pytest.raises(TypeError):
        GraphMetaNetwork(1, 16, backbone="sheaf", backbone_kwargs={"stalk": 4})


def test_metanet_path_unchanged():
    net = GraphMetaNetwork(1, 16, num_layers=2)
    assert net.state_encoder is None and isinstance(net.blocks[0], MetaNetBlock)
    assert not any(k.startswith("state_encoder") for k in net.state_dict())
    assert make_state("metanet", 16, 16) is None


def test_register_backbone_extends_the_model():
    @register_backbone("_test_identity")
    class Identity(torch.nn.Module):
        def __init__(self, hidden, edge_channels, dropout=0.0):
            super().__init__()
            self.lin = torch.nn.Linear(hidden, hidden)

        def forward(self, x, edge_index, edge_attr, batch):
            return self.lin(x), edge_attr

    try:
        net = GraphMetaNetwork(1, 8, num_layers=1, backbone="_test_identity")
        assert isinstance(net.blocks[0], Identity)
    finally:
        del BACKBONES["_test_identity"]


# ----------------------------------------------------------------- block internals


def test_egnn_coordinate_stream_is_e3_equivariant():
    torch.manual_seed(0)
    block = EGNNBlock(8, 6).double()
    x = torch.randn(12, 8, dtype=torch.float64)
    ei = torch.randint(0, 12, (2, 40))
    e = torch.randn(40, 6, dtype=torch.float64)
    pos = torch.randn(12, 3, dtype=torch.float64)
    h, e1, p = block(x, ei, e, None, pos)
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    q[:, 0] = -q[:, 0]  # make sure reflections are covered too
    t = torch.randn(3, dtype=torch.float64)
    h2, e2, p2 = block(x, ei, e, None, pos @ q.T + t)
    assert torch.allclose(h2, h, atol=1e-10) and torch.allclose(e2, e1, atol=1e-10)
    assert torch.allclose(p2, p @ q.T + t, atol=1e-10)
    assert (p - pos).abs().max() > 0  # coordinates do move


def test_positional_coordinates_are_invariant_node_attributes(graphs):
    g, g_perm, _ = graphs
    enc = make_state("egnn", 16, 16, coords="positional")
    c = enc(g.x, g.edge_index, g.edge_attr, g.batch, g)
    cp = enc(g_perm.x, g_perm.edge_index, g_perm.edge_attr, g_perm.batch, g_perm)
    assert c.shape == (g.num_nodes, 3) and c.min() >= 0 and c.max() <= 1
    # the multiset of coordinates per network is unchanged by the permutation
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert key(c) == key(cp)
    inputs = c[(g.node_role == 1) & (g.batch == 0)]  # the MLP's 5 inputs: distinct positions
    assert inputs.size(0) == 5 and inputs.unique(dim=0).size(0) == 5
    hidden = g.node_role == 0
    assert torch.all(c[hidden, 1:] == 0)


def _dense_operator(block, e, pairs, n, h):
    a = torch.zeros(n, n, dtype=torch.float64)
    vals = block.operator(e, pairs)[:, h]
    a.index_put_((pairs.pair_index[1], pairs.pair_index[0]), vals, accumulate=True)
    return a


def test_unitary_operator_symmetric_bounded_and_norm_preserving():
    torch.manual_seed(0)
    n = 9
    ei = torch.randint(0, n, (2, 30))
    ei = torch.cat([ei, ei[:, :5]], dim=1)  # parallel edges
    block = UnitaryBlock(16, 6, heads=2).double()
    e = torch.randn(ei.size(1), 6, dtype=torch.float64)
    pairs = SymmetricOperator()(torch.zeros(n, 1), ei, e, None, None)
    for h in range(2):
        a = _dense_operator(block, e, pairs, n, h)
        assert torch.allclose(a, a.T, atol=1e-12)
        assert torch.linalg.eigvalsh(a).abs().max() <= 1 + 1e-12
        assert (a[~torch.eye(n, dtype=torch.bool)] < 0).any()  # signed weights
    # exp(i A) with A the block's operator preserves norms (linear part, identity weight)
    conv = UnitaryConv(3, 3, order=30, weight="identity", normalize=False,
                       add_self_loops=False).double()
    x = torch.randn(n, 6, dtype=torch.float64)
    y = conv(x, pairs.pair_index, block.operator(e, pairs)[:, 0])
    assert abs(y.norm() - x.norm()) <= 1e-6
    ref = torch.linalg.matrix_exp(1j * _dense_operator(block, e, pairs, n, 0).to(torch.cdouble))
    z = ref @ torch.complex(x[:, :3], x[:, 3:])
    assert torch.allclose(torch.complex(y[:, :3], y[:, 3:]), z, atol=1e-10)


def test_sheaf_laplacian_with_edge_features_is_symmetric_psd_bounded():
    torch.manual_seed(0)
    n, d = 7, 2
    ei = torch.randint(0, n, (2, 20))
    ei = torch.cat([ei, ei.flip(0)], dim=1)
    for map_type in ("diag", "orthogonal", "general"):
        block = SheafBlock(8, 5, stalk_dim=d, map_type=map_type).double()
        x = torch.randn(n, 8, dtype=torch.float64)
        e = torch.randn(ei.size(1), 5, dtype=torch.float64)
        lap = block.laplacian(x, ei, e)
        eye = torch.eye(n * d, dtype=torch.float64).view(n * d, n, d).permute(1, 2, 0)
        dense = lap.matmul(eye).reshape(n * d, n * d)
        assert torch.allclose(dense, dense.T, atol=1e-10)
        ev = torch.linalg.eigvalsh(dense)
        assert ev.min() >= -1e-10 and ev.max() <= 2 + 1e-10
        # the maps depend on the edge features
        assert not torch.allclose(block.laplacian(x, ei, 2 * e).matmul(eye), lap.matmul(eye))


def test_triangles_match_brute_force():
    g = nx.gnm_random_graph(30, 120, seed=3)
    u, v = torch.tensor(list(g.edges)).T.sort(dim=0).values
    for chunk in (7, 1 << 20):
        tri = _triangles(u, v, 30, chunk)
        got = sorted(tuple(sorted(t)) for t in tri.tolist())
        want = sorted(tuple(sorted(c)) for c in nx.enumerate_all_cliques(g) if len(c) == 3)
        assert got == want


def test_ego_net_bag_matches_induced_ego_networks():
    g = nx.gnm_random_graph(12, 30, seed=1)
    ei = torch.tensor(list(g.edges)).T
    ei = torch.cat([ei, ei[:, :4], ei.flip(0)], dim=1)  # parallel and reversed edges
    n = 12
    bag = EgoNetBag()(torch.zeros(n, 1), ei, None, torch.zeros(n, dtype=torch.long), None)
    assert bag.num_triangles == sum(nx.triangles(g).values()) // 3
    for i in range(n):
        ego = nx.ego_graph(g, i, radius=1)
        in_bag = (bag.subgraph_id == i).nonzero().view(-1)
        assert sorted(bag.node_map[in_bag].tolist()) == sorted(ego.nodes)
        assert bag.node_map[i] == i and bag.subgraph_id[i] == i  # marked root
        mask = (bag.subgraph_id[bag.bag_edge_index[0]] == i)
        s, t = bag.node_map[bag.bag_edge_index[:, mask]]
        assert sorted(zip(s.tolist(), t.tolist())) == sorted(
            itertools.chain.from_iterable(((a, b), (b, a)) for a, b in ego.edges))
    # every edge j -> i lands on the copy of j in the ego-net of i
    assert torch.equal(bag.node_map[bag.edge_to_bag], ei[0])
    assert torch.equal(bag.subgraph_id[bag.edge_to_bag], ei[1])


@pytest.mark.parametrize("name", NEW)
def test_trains_on_a_tiny_zoo(name):
    torch.manual_seed(0)
    models = [MLP((4, 8, 3)) for _ in range(6)]
    batch = Batch.from_data_list([ParameterGraph.from_module(m) for m in models])
    target = torch.stack([m.net[0].weight.norm() for m in models]).detach().unsqueeze(-1)
    net = GraphMetaNetwork(1, hidden_channels=16, num_layers=2, backbone=name)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(batch), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.full
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_compiles(name):
    torch._dynamo.reset()
    models = [MLP((4, 8, 3)), MLP((4, 6, 3))]
    batch = Batch.from_data_list([ParameterGraph.from_module(m) for m in models])
    net = GraphMetaNetwork(1, hidden_channels=16, num_layers=2, backbone=name).eval()
    # "unitary" and "subgraph" build their state (torch.unique, triangle listing) with
    # data-dependent shapes, which breaks the graph there; the others compile whole
    fullgraph = name in ("metanet", "sheaf", "egnn")
    with torch.no_grad():
        ref = net(batch)
        out = torch.compile(net, fullgraph=fullgraph)(batch)
    assert torch.allclose(out, ref, atol=1e-5)
