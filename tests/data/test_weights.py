import pytest
import torch

from graphspace.data import (
    GraphBuilder,
    NormalizeWeights,
    WeightStatistics,
    compute_statistics,
    set_state_dict,
)
from graphspace.graphs import ParameterGraph, analyze
from graphspace.testing.models import ResNet, Siren, SmallCNN


def _perturbed(model, seed):
    g = torch.Generator().manual_seed(seed)
    sd = {k: (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v + seed)
          for k, v in model.state_dict().items()}
    return sd


@pytest.mark.parametrize("kernel", ["edge", "channel"])
@pytest.mark.parametrize("make", [SmallCNN, ResNet, Siren])
def test_builder_equals_from_state_dict(make, kernel):
    model = make()
    b = GraphBuilder(model, kernel=kernel)
    a = analyze(model)
    for seed in (0, 1):
        sd = _perturbed(model, seed)
        g = b.build(b.flatten(sd))
        ref = ParameterGraph.from_state_dict(sd, a, kernel=kernel)
        for key in ref.keys():
            if key == "spec":
                continue
            if torch.is_tensor(ref[key]):
                assert torch.equal(g[key], ref[key]), key
            else:
                assert g[key] == ref[key], key
        back = g.to_state_dict()
        for k, v in sd.items():
            assert torch.equal(back[k], v), k
        assert b.unflatten(b.flatten(sd)).keys() == sd.keys()


@pytest.mark.parametrize("kernel", ["edge", "channel"])
def test_set_state_dict_inverts_to_state_dict(kernel):
    model = ResNet()
    g = ParameterGraph.from_module(model, kernel=kernel)
    sd = _perturbed(model, 3)
    g2 = set_state_dict(g, sd)
    for k, v in sd.items():
        assert torch.equal(g2.to_state_dict()[k], v), k
    # the original graph is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(g.to_state_dict()[k], v)


def _collection(n=6):
    model = SmallCNN()
    a = analyze(model)
    recs = a.records
    return [(recs, _perturbed(model, s)) for s in range(n)], model


def test_statistics_match_direct_computation():
    items, _ = _collection()
    st = compute_statistics(items)
    w = torch.stack([sd["conv2.weight"] for _, sd in items]).double()
    assert float(st.mean["conv2.weight"]) == pytest.approx(float(w.mean()), rel=1e-6)
    assert float(st.std["conv2.weight"]) == pytest.approx(float(w.std()), rel=1e-6)
    pe = compute_statistics(items, per_element=True)
    assert pe.mean["fc.bias"].shape == (10,)
    assert torch.allclose(pe.std["fc.bias"].double(),
                          torch.stack([sd["fc.bias"] for _, sd in items]).double().std(0),
                          atol=1e-6)


@pytest.mark.parametrize("per_element", [False, True])
def test_normalization_standardises_and_inverts(per_element):
    items, model = _collection(8)
    st = compute_statistics(items, per_element=per_element)
    a = analyze(model)
    norm = NormalizeWeights(st)
    graphs = [ParameterGraph.from_state_dict(sd, a) for _, sd in items]
    out = [norm(g) for g in graphs]
    w = torch.stack([g.to_state_dict()["conv3.weight"] for g in out]).double()
    if per_element:
        assert w.mean(0).abs().max() < 1e-5
        assert torch.allclose(w.std(0), torch.ones(()).double(), atol=1e-3)
    else:
        assert abs(float(w.mean())) < 1e-5
        assert float(w.std()) == pytest.approx(1.0, abs=1e-3)
    back = NormalizeWeights(st, inverse=True)(out[0])
    for k, v in items[0][1].items():
        assert torch.allclose(back.to_state_dict()[k], v, atol=1e-5), k
    # negative control: statistics of other networks do not standardise
    shifted = [(r, {k: v * 3 + 1 for k, v in sd.items()}) for r, sd in items]
    w2 = torch.stack([norm(ParameterGraph.from_state_dict(sd, a)).to_state_dict()["conv3.weight"]
                      for _, sd in shifted]).double()
    assert float(w2.std()) > 2


def test_normalization_keeps_channel_padding_zero():
    model = ResNet()
    items = [(analyze(model).records, _perturbed(model, s)) for s in range(3)]
    st = compute_statistics(items)
    g = ParameterGraph.from_module(model, kernel="channel", kernel_pad=(5, 5))
    out = NormalizeWeights(st)(g)
    pad_free = torch.zeros_like(g.edge_attr, dtype=torch.bool)
    for r in g.spec.records:
        if r.kind == "edge":
            a, b = g.spec.ranges[r.key]
            pad_free[a:b][:, g.spec.pad_index[r.key]] = True
    pad_free[g.num_param_edges:] = True
    diag_col = 12  # centre of a 5x5 kernel (norm weights sit there)
    pad_free[:, diag_col] = True
    assert (out.edge_attr[~pad_free] == 0).all()


def test_statistics_save_load(tmp_path):
    items, _ = _collection(3)
    st = compute_statistics(items)
    st.save(tmp_path / "stats.pt")
    st2 = WeightStatistics.load(tmp_path / "stats.pt")
    assert st2.mean.keys() == st.mean.keys()
    assert all(torch.equal(st.std[k], st2.std[k]) for k in st.std)


def _assert_same_graph(g, ref):
    assert set(g.keys()) == set(ref.keys())
    for key in ref.keys():
        if torch.is_tensor(ref[key]):
            assert g[key].dtype == ref[key].dtype and torch.equal(g[key], ref[key]), key
        elif key != "spec":
            assert g[key] == ref[key], key


@pytest.mark.parametrize("kernel", ["edge", "channel"])
@pytest.mark.parametrize("make", [SmallCNN, ResNet])
def test_build_many_equals_build(make, kernel):
    model = make()
    b = GraphBuilder(model, kernel=kernel)
    a = analyze(model)
    sds = [_perturbed(model, s) for s in range(3)]
    flats = torch.stack([b.flatten(sd) for sd in sds])
    y = torch.tensor([0.1, 0.2, 0.3])
    graphs = b.build_many(flats, {"y": y})
    assert len(graphs) == 3
    for i, (g, sd) in enumerate(zip(graphs, sds)):
        ref = ParameterGraph.from_state_dict(sd, a, kernel=kernel)
        ref.y = y[i:i + 1]
        _assert_same_graph(g, ref)
        _assert_same_graph(b.build(flats[i], {"y": y[i:i + 1]}, share_structure=True), ref)
        back = g.to_state_dict()
        for k, v in sd.items():
            assert torch.equal(back[k], v), k
    with pytest.raises(ValueError):
        b.build_many(flats[:, :-1])
    with pytest.raises(ValueError):
        b.build_many(flats, {"y": y[:2]})


def test_built_graphs_own_their_weights_and_optionally_share_structure():
    b = GraphBuilder(SmallCNN())
    flats = torch.randn(2, b.numel)
    g0, g1 = b.build_many(flats)
    g0.x.add_(1.0)
    g0.edge_attr.mul_(0.0)
    g0.edge_index.add_(1)  # copies: the builder and the other graph are untouched
    _assert_same_graph(g1, b.build(flats[1]))
    assert not torch.equal(g0.edge_index, g1.edge_index)
    assert g1.x.data_ptr() != g0.x.data_ptr()
    s0, s1 = b.build_many(flats, share_structure=True)
    assert s0.edge_index.data_ptr() == s1.edge_index.data_ptr()
    assert s0.x.data_ptr() != s1.x.data_ptr()
    assert s0.edge_attr.data_ptr() != s1.edge_attr.data_ptr()
    assert torch.equal(s1.edge_attr[:, 0], b.build(flats[1]).edge_attr[:, 0])


def test_small_cnn_zoo_batched_fetch_equals_items(tmp_path):
    from torch_geometric.loader import DataLoader
    from zoo_files import make_small_cnn_zoo

    from graphspace.data import SmallCNNZoo

    make_small_cnn_zoo(tmp_path / "zoo" / "raw", n_runs=16, steps=(1, 86))
    ds = SmallCNNZoo(str(tmp_path / "zoo"), "train", epochs="all")
    idx = [5, 0, 3, 3, len(ds) - 1]
    items = ds.__getitems__(idx)
    assert len(items) == len(idx) and len({ds.arch(i)["activation"] for i in idx}) == 2
    for i, g in zip(idx, items):
        _assert_same_graph(g, ds[i])
        assert torch.equal(g.to_state_dict()["fc.weight"], ds.state_dict(i)["fc.weight"])
        assert int(g.step) == int(ds._store["fields"]["step"][i])
    batch = next(iter(DataLoader(ds, batch_size=len(ds))))
    assert torch.equal(batch.y, ds.y)
    sub = ds[torch.tensor([2, 1])]  # an index-selected view maps indices through indices()
    _assert_same_graph(sub.__getitems__([0])[0], ds[2])


def _assert_same_batch(bt, ref):
    assert type(bt) is type(ref) and bt.num_graphs == ref.num_graphs
    assert set(bt.keys()) == set(ref.keys())
    for k in ref.keys():
        if torch.is_tensor(ref[k]):
            assert bt[k].dtype == ref[k].dtype and torch.equal(bt[k], ref[k]), k
        elif k == "spec":
            assert [s.kernel for s in bt[k]] == [s.kernel for s in ref[k]]
        else:
            assert bt[k] == ref[k], k
    assert bt._slice_dict.keys() == ref._slice_dict.keys()
    for k, v in ref._slice_dict.items():
        assert torch.equal(bt._slice_dict[k], v), k
        w = ref._inc_dict[k]
        assert (w is None and bt._inc_dict[k] is None) or torch.equal(bt._inc_dict[k], w), k
    for g, r in zip(bt.to_data_list(), ref.to_data_list()):
        _assert_same_graph(g, r)
        for k, v in r.to_state_dict().items():
            assert torch.equal(g.to_state_dict()[k], v), k


@pytest.mark.parametrize("kernel", ["edge", "channel"])
@pytest.mark.parametrize("make", [SmallCNN, Siren, ResNet])
def test_build_batch_equals_pyg_collation(make, kernel):
    from torch_geometric.data import Batch

    b = GraphBuilder(make(), kernel=kernel)
    for n in (4, 1, 4):  # the second batch of 4 reuses the cached plan
        flats = torch.randn(n, b.numel)
        fields = {"y": torch.rand(n), "step": torch.arange(n)}
        _assert_same_batch(b.build_batch(flats, fields),
                           Batch.from_data_list(b.build_many(flats, fields)))


def test_build_batch_mixes_architectures_that_differ_in_structure_values():
    from torch import nn
    from torch_geometric.data import Batch

    relu, tanh = GraphBuilder(SmallCNN(act=nn.ReLU)), GraphBuilder(SmallCNN(act=nn.Tanh))
    assert set(relu._mixed_keys((tanh,))) == {"node_act"}
    flats = torch.randn(5, relu.numel)
    which = torch.tensor([1, 0, 0, 1, 1])
    y = torch.rand(5)
    ref = Batch.from_data_list([(relu, tanh)[w].build(f, {"y": y[i:i + 1]})
                                for i, (w, f) in enumerate(zip(which.tolist(), flats))])
    bt = relu.build_batch(flats, {"y": y}, others=[tanh], which=which)
    _assert_same_batch(bt, ref)
    assert not torch.equal(bt.node_act[:59], bt.node_act[59:118])
    # a different layout cannot mix: PyG's collation, same result
    siren = GraphBuilder(Siren())
    assert relu._mixed_keys((siren,)) is None
    with pytest.raises(ValueError):
        relu.build_batch(flats, others=[tanh])


def test_small_cnn_zoo_batch_equals_collated_items(tmp_path):
    from torch_geometric.data import Batch
    from zoo_files import make_small_cnn_zoo

    from graphspace.data import SmallCNNZoo

    make_small_cnn_zoo(tmp_path / "zoo" / "raw", n_runs=16, steps=(1, 86))
    ds = SmallCNNZoo(str(tmp_path / "zoo"), "train", epochs="all")
    idx = [5, 0, 3, 3, len(ds) - 1, 2]
    _assert_same_batch(ds.batch(idx), Batch.from_data_list([ds[i] for i in idx]))
    loader = torch.utils.data.DataLoader(range(len(ds)), batch_size=7, collate_fn=ds.batch)
    assert torch.equal(torch.cat([b.y for b in loader]), ds.y)
