import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.data import Batch

from graphspace.graphs import (
    ArchitectureMismatchError,
    CoverageError,
    NonFiniteWeightError,
    ParameterGraph,
    TraceError,
    UnsupportedModuleError,
    analyze,
    apply_permutation,
    apply_scaling,
    permutation_groups,
    permute_model,
    random_permutation,
    random_scaling,
    scaling_symmetries,
)
from graphspace.graphs.analysis import EDGE_TYPE, NODE_TYPE
from graphspace.testing import (
    assert_permutation_invariant,
    assert_round_trip,
    swap_io_neurons,
    wl_hash,
)
from graphspace.testing.models import MLP, SmallCNN, TinyTransformer, reference_models

MODELS = reference_models()


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("kernel", ["edge", "channel"])
def test_round_trip_exact(name, kernel):
    model, _ = MODELS[name]
    model = copy.deepcopy(model)
    # make buffers non-trivial so the round trip of running statistics is checked
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(7)
    g = assert_round_trip(model, kernel=kernel)
    assert g.validate(raise_on_error=True)


@pytest.mark.parametrize("name", list(MODELS))
def test_weight_edges_equal_weight_entries(name):
    model, _ = MODELS[name]
    g = ParameterGraph.from_module(model)
    a = g.spec.analysis
    n_weight_entries = sum(r.numel for r in a.records if r.kind in ("edge", "diag"))
    assert g.num_param_edges == n_weight_entries
    n_bias_like = sum(r.numel for r in a.records if r.kind == "node")
    n_extra = sum(r.numel for r in a.records if r.kind == "extra")
    assert n_weight_entries + n_bias_like + n_extra == sum(
        v.numel() for v in model.state_dict().values())
    assert {r.key for r in a.records} == set(model.state_dict())
    # structural edges are never parameter edges
    struct = g.edge_type[g.num_param_edges:]
    assert set(struct.tolist()) <= {EDGE_TYPE["residual"], EDGE_TYPE["product"],
                                    EDGE_TYPE["attn_qk"], EDGE_TYPE["norm"]}


@pytest.mark.parametrize("name", list(MODELS))
def test_hidden_permutation_keeps_function(name):
    torch.manual_seed(0)
    model, x = MODELS[name]
    model = copy.deepcopy(model).double().eval()
    assert_permutation_invariant(model, x.double(), atol=1e-10,
                                 generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", ["mlp", "small_cnn", "depthwise", "transformer", "siren"])
def test_permuted_graph_is_isomorphic(name):
    model, x = MODELS[name]
    model = copy.deepcopy(model).double()
    g = ParameterGraph.from_module(model)
    permuted, _ = permute_model(model, generator=torch.Generator().manual_seed(5))
    gp = ParameterGraph.from_module(permuted)
    assert not torch.equal(g.edge_attr, gp.edge_attr)
    assert wl_hash(g) == wl_hash(gp)
    # negative control: swapping two *input* neurons' weights is not a symmetry
    wrong = swap_io_neurons(model)
    assert wl_hash(ParameterGraph.from_module(wrong)) != wl_hash(g)


def test_node_roles_and_positions():
    m = MLP((5, 7, 3))
    g = ParameterGraph.from_module(m)
    assert int((g.node_role == 1).sum()) == 5 and int((g.node_role == 2).sum()) == 3
    assert sorted(g.node_pos[g.node_role == 1].tolist()) == list(range(5))
    assert sorted(g.node_pos[g.node_role == 2].tolist()) == list(range(3))
    assert (g.node_pos[g.node_role == 0] == -1).all()
    # biases are node features of the neurons they belong to
    out_nodes = (g.node_role == 2).nonzero().view(-1)
    assert torch.equal(g.x[out_nodes, 0], m.net[2].bias.detach())
    assert (g.node_act[g.node_type == NODE_TYPE["linear"]][:7] == 1).all()  # relu


def test_conv_edges_carry_spatial_offsets():
    m = SmallCNN()
    g = ParameterGraph.from_module(m)
    a, b = g.spec.ranges["conv2.weight"]
    w = m.conv2.weight.detach()
    ei, pos = g.edge_index[:, a:b], g.edge_pos[a:b]
    # pick an arbitrary entry and check endpoints and offsets
    o, i, kh, kw = 3, 5, 2, 1
    e = ((o * 16 + i) * 3 + kh) * 3 + kw
    assert g.edge_attr[a + e, 0] == w[o, i, kh, kw]
    assert pos[e, :2].tolist() == [kh, kw]
    c1 = g.spec.analysis.record("conv1.weight").dst
    c2 = g.spec.analysis.record("conv2.weight").dst
    assert ei[0, e] == c1[i] and ei[1, e] == c2[o]


def test_flatten_linear_uses_channel_nodes():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3)
            self.fc = nn.Linear(4 * 3 * 3, 5)

        def forward(self, x):
            return self.fc(torch.flatten(F.relu(self.conv(x)), 1))

    m = Net().double()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    g = assert_round_trip(m)
    a, b = g.spec.ranges["fc.weight"]
    conv_nodes = g.spec.analysis.record("conv.weight").dst
    assert set(g.edge_index[0, a:b].tolist()) == set(conv_nodes.tolist())
    assert g.edge_pos[a:b, 0].max() == 8
    assert_permutation_invariant(m, x, generator=torch.Generator().manual_seed(0))
    # with an example input the shapes are checked too
    ParameterGraph.from_module(m, example_input=x)


def test_mixed_batch_unbatches_to_each_state_dict():
    models = [copy.deepcopy(MODELS[n][0]) for n in MODELS]
    graphs = [ParameterGraph.from_module(m) for m in models]
    batch = Batch.from_data_list(graphs)
    assert batch.num_graphs == len(models)
    assert batch.num_nodes == sum(g.num_nodes for g in graphs)
    for m, g in zip(models, batch.to_data_list()):
        sd = g.to_state_dict()
        for k, v in m.state_dict().items():
            assert torch.equal(sd[k], v)


def test_channel_mode_batches_with_common_pad():
    graphs = [ParameterGraph.from_module(m, kernel="channel", kernel_pad=(3, 3))
              for m in (MLP(), SmallCNN())]
    batch = Batch.from_data_list(graphs)
    assert batch.edge_attr.shape[1] == 9
    sd = batch.to_data_list()[1].to_state_dict()
    assert torch.equal(sd["conv3.weight"], graphs[1].to_state_dict()["conv3.weight"])
    with pytest.raises(ValueError, match="does not fit"):
        ParameterGraph.from_module(SmallCNN(), kernel="channel", kernel_pad=(1, 1))


def test_half_precision_round_trip_keeps_dtype():
    m = MLP().half()
    g = assert_round_trip(m)
    assert g.edge_attr.dtype == torch.float32


def test_edit_graph_and_load_back():
    m = MLP()
    g = ParameterGraph.from_module(m)
    g.edge_attr = g.edge_attr * 2
    g.x = g.x + 1
    m2 = g.to_module(m)
    assert torch.equal(m2.net[0].weight, m.net[0].weight * 2)
    assert torch.equal(m2.net[0].bias, m.net[0].bias + 1)
    assert not torch.equal(m2.net[0].weight, m.net[0].weight)  # input model untouched


def test_conversion_does_not_mutate_model():
    m, _ = MODELS["resnet"]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ParameterGraph.from_module(m)
    permute_model(m, generator=torch.Generator().manual_seed(0))
    for k, v in m.state_dict().items():
        assert torch.equal(before[k], v)


def test_symmetry_groups_of_resnet_tie_residual_stream():
    groups = permutation_groups(MODELS["resnet"][0])
    names = {g.name for g in groups}
    stream = next(g for g in groups if g.name == "stem")
    # stem conv, its BN, the two blocks' bn2 and the residual sums share one permutation
    assert len(stream.sets) >= 6
    assert "layers.0.conv1" in names
    # input and output neurons are never permuted
    a = analyze(MODELS["resnet"][0])
    ids = {s for g in groups for s in g.sets}
    assert not ids & set(a.input_sets) and not ids & set(a.output_sets)


def test_attention_permutations_are_head_blocks():
    m = TinyTransformer().double()
    groups = permutation_groups(m, torch.randn(2, 5, 6, dtype=torch.float64))
    qk = next(g for g in groups if g.num_heads and len(g.members) == 2)
    v = next(g for g in groups if g.num_heads and len(g.members) == 1)
    assert qk.num_heads == v.num_heads == 4 and len(qk.members) == 2
    perms = random_permutation(groups, torch.Generator().manual_seed(0))
    d = 4
    for p in (perms[qk.name], perms[v.name]):
        heads = p.view(4, d) // d
        assert (heads == heads[:, :1]).all()  # each head block maps into one head
    assert torch.equal(perms[qk.name].view(4, d)[:, 0] // d, perms[v.name].view(4, d)[:, 0] // d)
    # an invalid (cross-head) permutation of V changes the function: negative control
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    within = {v.name: torch.roll(torch.arange(16).view(4, 4), 1, dims=1).reshape(-1)}
    m2 = copy.deepcopy(m)
    m2.load_state_dict(apply_permutation(m, m.state_dict(), within))
    assert (m2(x) - m(x)).abs().max() < 1e-10  # a within-head V permutation is a symmetry
    across = {v.name: torch.roll(torch.arange(16), 1)}  # moves V coordinates across heads
    m4 = copy.deepcopy(m)
    m4.load_state_dict(apply_permutation(m, m.state_dict(), across))
    assert (m4(x) - m(x)).abs().max() > 1e-6
    bad_qk = {qk.name: torch.roll(torch.arange(16), 1)}  # moves coordinates across heads
    m3 = copy.deepcopy(m)
    m3.load_state_dict(apply_permutation(m, m.state_dict(), bad_qk))
    assert (m3(x) - m(x)).abs().max() > 1e-6


@pytest.mark.parametrize("name,kind", [("mlp", "positive"), ("small_cnn", "positive"),
                                       ("siren", "sign")])
def test_rescaling_and_sign_flip_symmetries(name, kind):
    model, x = MODELS[name]
    model = copy.deepcopy(model).double()
    sym = scaling_symmetries(model)
    assert sym and set(sym.values()) == {kind}
    scales = random_scaling(model, torch.Generator().manual_seed(0))
    sd = apply_scaling(model, model.state_dict(), scales)
    m2 = copy.deepcopy(model)
    m2.load_state_dict(sd)
    assert any(not torch.equal(sd[k], v) for k, v in model.state_dict().items())
    assert (m2(x.double()) - model(x.double())).abs().max() < 1e-9
    sid = next(iter(sym))
    bad = {sid: torch.full((model.state_dict()[next(iter(sd))].shape[0],), 2.0)}
    if kind == "sign":
        with pytest.raises(ValueError):
            apply_scaling(model, model.state_dict(), bad)


def test_no_scaling_symmetry_through_gelu_or_norm():
    sym = scaling_symmetries(TinyTransformer())
    assert sym == {}
    assert scaling_symmetries(MODELS["resnet"][0]) == {}


def test_functional_activations_and_methods():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 6)
            self.b = nn.Linear(6, 6)
            self.c = nn.Linear(12, 2)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            u = self.b(h).sin()
            return self.c(torch.cat([F.relu(h), u * 2.0], dim=-1))

    m = Net().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    assert_round_trip(m)
    assert_permutation_invariant(m, x, generator=torch.Generator().manual_seed(1))
    g = ParameterGraph.from_module(m)
    assert sorted(set(g.node_act.tolist())) == [0, 5, 7]  # identity, tanh, sin


# ---------------------------------------------------------------------------------- errors


def test_unsupported_module_names_path_and_type():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 4), nn.LSTM(4, 4))

        def forward(self, x):
            return self.body(x)

    assert_round_trip(Net())  # an LSTM inside a Sequential converts (tuple output)

    class Sorts(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x):
            return self.fc(x).sort(-1).values

    with pytest.raises(UnsupportedModuleError, match=r"op sort at '<model> \(sort\)'"):
        ParameterGraph.from_module(Sorts())


def test_untraceable_model_reports_fx_failure():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return x

    with pytest.raises(TraceError, match="torch.export could not trace Net"):
        ParameterGraph.from_module(Net())


def test_nonfinite_weights_are_reported():
    m = MLP()
    with torch.no_grad():
        m.net[2].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightError, match=r"net\.2\.weight"):
        ParameterGraph.from_module(m)
    g = ParameterGraph.from_module(m, check_finite=False)
    assert torch.isnan(g.to_state_dict()["net.2.weight"][0, 0])


def test_unused_parameter_is_never_dropped():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.unused = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(CoverageError, match="unused"):
        ParameterGraph.from_module(Net())


def test_free_parameter_and_shared_module_convert_exactly():
    class Free(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.fc(x) * self.scale

    x = torch.randn(4, 3, dtype=torch.float64)
    m = Free().double()
    g = assert_round_trip(m)
    assert g.spec.analysis.record("scale").kind == "diag"  # a layer scale: diagonal edges
    assert_permutation_invariant(m, x, generator=torch.Generator().manual_seed(0))

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(self.fc(x))

    m = Shared().double()
    g = assert_round_trip(m)
    a = g.spec.analysis
    assert a.ties == {"fc.weight": ["fc"]}  # the second use is recorded as a tie
    p, _ = permute_model(m, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(p(x), m(x), atol=1e-12)


def test_mismatched_architecture_names_tensor():
    g = ParameterGraph.from_module(MLP((8, 16, 4)))
    with pytest.raises(ArchitectureMismatchError, match=r"net\.0\.weight"):
        g.load_into(MLP((8, 12, 4)))
    with pytest.raises(ValueError, match="not a permutation"):
        m = MLP()
        apply_permutation(m, m.state_dict(), {"net.0": torch.zeros(16, dtype=torch.long)})
