import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from torch_geometric.data import Batch, Data

from graphspace.data.sbm import SBMDataModule, SBMDataset, block_homophily, make_sbm_graph
from graphspace.tasks.contrastive import (
    DropEdges,
    FunctionZooDataModule,
    GaussianNoise,
    GCNEncoder,
    GraphContrastive,
    MaskFeatures,
    compactness_targets,
    edge_drop_budget,
    gcn_node_compactness,
    linear_probe,
    nt_xent,
    pot_loss,
)

ROOT = Path(__file__).resolve().parents[2]


def _trainer(**kw):
    return pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, **kw)


# -- loss ------------------------------------------------------------------------------------
def _reference_loss(h1, h2, tau, intra=True):
    """GRACE eqs. (1)-(2), one term at a time."""
    def cos(a, b):
        return float(a @ b) / (a.norm().item() * b.norm().item())

    def ell(u, v, i):
        pos = math.exp(cos(u[i], v[i]) / tau)
        den = pos
        for k in range(u.size(0)):
            if k != i:
                den += math.exp(cos(u[i], v[k]) / tau)
                if intra:
                    den += math.exp(cos(u[i], u[k]) / tau)
        return -math.log(pos / den)

    n = h1.size(0)
    return sum(ell(h1, h2, i) + ell(h2, h1, i) for i in range(n)) / (2 * n)


def test_nt_xent_matches_slow_reference():
    torch.manual_seed(0)
    h1, h2 = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    for tau in (0.2, 0.5, 1.0):
        ref = _reference_loss(h1, h2, tau)
        assert abs(float(nt_xent(h1, h2, tau)) - ref) < 1e-12
        # negative control: without the intra-view negatives the value differs
        assert abs(_reference_loss(h1, h2, tau, intra=False) - ref) > 1e-3
    # symmetric: swapping the views does not change it; the one-sided loss does change
    assert torch.allclose(nt_xent(h1, h2), nt_xent(h2, h1))
    assert not torch.allclose(nt_xent(h1, h2, symmetric=False), nt_xent(h2, h1, symmetric=False))
    # invariant to rescaling the projections (cosine similarity)
    assert torch.allclose(nt_xent(3 * h1, 0.5 * h2), nt_xent(h1, h2))
    with pytest.raises(ValueError):
        nt_xent(h1, h2[:3])


# -- data and augmentations -------------------------------------------------------------------
def test_sbm_is_deterministic_and_split():
    a = make_sbm_graph([20, 20, 20], 0.3, 0.02, 5, seed=3)
    b = make_sbm_graph([20, 20, 20], 0.3, 0.02, 5, seed=3)
    c = make_sbm_graph([20, 20, 20], 0.3, 0.02, 5, seed=4)
    assert torch.equal(a.edge_index, b.edge_index) and torch.equal(a.x, b.x)
    assert not torch.equal(a.x, c.x)
    masks = torch.stack([a.train_mask, a.val_mask, a.test_mask]).long()
    assert bool((masks.sum(0) == 1).all())  # a partition of the nodes
    assert int(a.train_mask.sum()) == 6 and int(a.val_mask.sum()) == 6
    assert torch.equal(a.y, torch.arange(3).repeat_interleave(20))
    assert float(block_homophily(a)) > 0.7  # p_in >> p_out: mostly within-block edges
    # undirected, no self-loops
    assert bool((a.edge_index[0] != a.edge_index[1]).all())
    keys = set(map(tuple, a.edge_index.t().tolist()))
    assert all((j, i) in keys for i, j in keys)
    ds = SBMDataset(num_graphs=2, block_sizes=(10, 10), num_features=4, seed=1)
    assert len(ds) == 2 and ds.num_classes == 2
    assert torch.equal(ds[1].x, make_sbm_graph((10, 10), 0.1, 0.01, 4, 1.0, 1.5, seed=2).x)
    dm = SBMDataModule(num_blocks=2, block_size=10, num_features=4)
    assert dm.num_classes == 2 and next(iter(dm.val_dataloader())).num_nodes == 20
    with pytest.raises(ValueError):
        make_sbm_graph([5, 5], 0.3, 0.1, 1)


def test_augmentations():
    torch.manual_seed(0)
    g = Data(x=torch.randn(6, 8), edge_index=torch.randint(0, 6, (2, 40)),
             edge_attr=torch.arange(40.0).unsqueeze(-1), edge_type=torch.arange(40))
    x0, e0 = g.x.clone(), g.edge_index.clone()
    d = DropEdges(0.5)(g)
    assert 0 < d.num_edges < 40
    # edge attributes stay aligned with their edges
    assert torch.equal(d.edge_index, e0[:, d.edge_type]) and torch.equal(
        d.edge_attr.view(-1).long(), d.edge_type)
    assert torch.equal(g.x, x0) and torch.equal(g.edge_index, e0)  # input untouched
    und = DropEdges(0.5, force_undirected=True)(
        Data(edge_index=torch.tensor([[0, 1, 1, 2, 2, 3], [1, 0, 2, 1, 3, 2]]), num_nodes=4))
    kept = set(map(tuple, und.edge_index.t().tolist()))
    assert all((j, i) in kept for i, j in kept)
    m = MaskFeatures(0.5)(g)
    zero_cols = (m.x == 0).all(0)
    assert 0 < int(zero_cols.sum()) < 8  # whole feature columns are masked
    assert torch.equal(m.x[:, ~zero_cols], x0[:, ~zero_cols]) and torch.equal(g.x, x0)
    n = GaussianNoise(0.1)(g)
    assert not torch.equal(n.edge_attr, g.edge_attr)
    assert (n.edge_attr - g.edge_attr).std() < 0.3 * g.edge_attr.std()
    assert "p=0.5" in repr(DropEdges(0.5)) and "GCNEncoder(3, 4" in repr(GCNEncoder(3, 4))


def test_linear_probe():
    torch.manual_seed(0)
    y = torch.arange(3).repeat(40)
    z = torch.randn(120, 4) + 10 * torch.nn.functional.one_hot(y, 4).float()
    assert linear_probe(z[:60], y[:60], z[60:], y[60:]) == 1.0
    # agrees with scikit-learn's L2 logistic regression (C = 1 / (2 * weight_decay * n))
    sklearn = pytest.importorskip("sklearn.linear_model")
    z = (torch.randn(200, 5) + 1.2 * torch.nn.functional.one_hot(
        torch.arange(4).repeat(50), 5).float()).double()
    yy = torch.arange(4).repeat(50)
    zt, ze, yt, ye = z[:100], z[100:], yy[:100], yy[100:]
    mean, std = zt.mean(0), zt.std(0)
    clf = sklearn.LogisticRegression(C=1 / (2 * 1e-2 * 100), tol=1e-10, max_iter=5000)
    clf.fit(((zt - mean) / std).numpy(), yt.numpy())
    ref = float((torch.from_numpy(clf.predict(((ze - mean) / std).numpy())) == ye).double().mean())
    acc = linear_probe(zt, yt, ze, ye, weight_decay=1e-2)
    assert 0.4 < acc < 1.0 and abs(acc - ref) <= 0.011
    # negative control: labels unrelated to the embeddings give chance-level accuracy
    noise = torch.randn(600, 4)
    yr = torch.randint(0, 3, (600,))
    assert linear_probe(noise[:300], yr[:300], noise[300:], yr[300:]) < 0.45


# -- GRACE on SBM -----------------------------------------------------------------------------
def _easy_sbm():
    return SBMDataModule(num_blocks=3, block_size=40, p_in=0.25, p_out=0.01, num_features=8,
                         feature_signal=1.0, feature_noise=1.5, train_ratio=0.2, val_ratio=0.2,
                         seed=0)


def test_loss_decreases_on_sbm():
    pl.seed_everything(0)
    dm = _easy_sbm()
    batch = Batch.from_data_list([dm.setup() or dm.dataset[0]])
    model = GraphContrastive(in_channels=8, hidden_channels=32, proj_channels=32, lr=5e-3)

    def fixed_view_loss():
        torch.manual_seed(123)  # the same two views every time
        v1, v2 = model.views(batch)
        with torch.no_grad():
            return float(nt_xent(model.projector(model(v1)), model.projector(model(v2))))

    before = fixed_view_loss()
    opt = model.configure_optimizers()
    model.log = lambda *a, **k: None
    for _ in range(25):
        opt.zero_grad()
        model.training_step(batch, 0).backward()
        opt.step()
    assert fixed_view_loss() < before - 0.1


@pytest.mark.parametrize("pot", [False, True])
def test_probe_beats_chance_on_easy_sbm(pot, tmp_path):
    pl.seed_everything(0)
    dm = _easy_sbm()
    model = GraphContrastive(in_channels=8, hidden_channels=32, proj_channels=32, lr=5e-3,
                             pot=pot, kappa=0.05)
    trainer = _trainer(max_epochs=40, check_val_every_n_epoch=40, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert ("train/compactness" in trainer.callback_metrics) == pot
    trainer.test(model, dm, verbose=False)
    acc = float(trainer.callback_metrics["test/probe_acc"])
    assert acc > 0.8  # chance is 1/3
    table = model.results_table()
    assert ("grace+pot" if pot else "| grace |") in table and "nan" not in table


# -- POT --------------------------------------------------------------------------------------
def _pot_setup(activation="prelu"):
    torch.manual_seed(0)
    g = make_sbm_graph([12, 12, 12], 0.3, 0.05, 6, seed=1)
    enc = GCNEncoder(6, 8, activation=activation).double()
    with torch.no_grad():
        for conv in enc.convs:
            conv.bias.normal_(0, 0.3)  # bias so that some neurons are unstable
    target = compactness_targets(torch.randn(g.num_nodes, 8, dtype=torch.float64))
    return g, g.x.double(), enc, target


def _sample_in_set(ei, budget, x, masking, gen):
    keep = torch.ones(ei.size(1), dtype=torch.bool)
    for i in range(budget.numel()):
        inc = (ei[1] == i).nonzero().view(-1)
        k = int(torch.randint(0, int(budget[i]) + 1, (), generator=gen))
        keep[inc[torch.randperm(inc.numel(), generator=gen)[:k]]] = False
    xv = torch.where(torch.rand(x.shape, generator=gen, dtype=x.dtype) < 0.4, 0.0, x) \
        if masking else x
    return xv, ei[:, keep]


@pytest.mark.parametrize("masking", [False, True])
@pytest.mark.parametrize("activation", ["relu", "prelu"])
def test_pot_bound_is_a_valid_lower_bound(masking, activation):
    g, x, enc, target = _pot_setup(activation)
    ei = g.edge_index
    budget = edge_drop_budget(ei, g.num_nodes, 0.4)
    assert int(budget.sum()) > 0
    certified = gcn_node_compactness(enc, x, ei, target, budget, feature_masking=masking)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        xv, eiv = _sample_in_set(ei, budget, x, masking, gen)
        with torch.no_grad():
            score = (enc(xv, eiv) * target).sum(-1)
        at_view = gcn_node_compactness(enc, x, ei, target, budget, masking, view=(xv, eiv))
        assert bool((certified <= score + 1e-10).all())
        assert bool((at_view <= score + 1e-10).all())
        assert bool((certified <= at_view + 1e-10).all())


def test_pot_bound_is_exact_without_perturbation_and_set_specific():
    g, x, enc, target = _pot_setup()
    ei, n = g.edge_index, g.num_nodes
    zero = torch.zeros(n, dtype=torch.long)
    with torch.no_grad():
        clean = (enc(x, ei) * target).sum(-1)
    # a one-graph set: the relaxations are exact, the bound is the score itself
    assert torch.allclose(gcn_node_compactness(enc, x, ei, target, zero), clean, atol=1e-12)
    assert torch.allclose(gcn_node_compactness(enc, x, ei, target, zero, view=(x, ei)), clean,
                          atol=1e-12)
    # negative control: graphs outside that set score below the zero-budget bound somewhere
    budget = edge_drop_budget(ei, n, 0.4)
    gen = torch.Generator().manual_seed(1)
    below = False
    for _ in range(10):
        xv, eiv = _sample_in_set(ei, budget, x, False, gen)
        with torch.no_grad():
            below |= bool(((enc(xv, eiv) * target).sum(-1) < clean - 1e-6).any())
    assert below
    # and views outside the declared set are rejected
    with pytest.raises(ValueError, match="budget"):
        gcn_node_compactness(enc, x, ei, target, zero, view=(x, ei[:, 1:]))
    with pytest.raises(ValueError, match="feature_masking"):
        gcn_node_compactness(enc, x, ei, target, zero, view=(x * 0, ei))
    with pytest.raises(ValueError, match="not in the clean graph"):
        gcn_node_compactness(enc, x, ei[:, 1:], target, zero, view=(x, ei))


def test_two_hop_paths_padded_equals_enumerated():
    from graphspace.tasks.contrastive import _two_hop_inner

    torch.manual_seed(0)
    n, d = 9, 5
    star = torch.tensor([[0] * 8 + list(range(1, 9)), list(range(1, 9)) + [0] * 8])
    for ei in (star, torch.randint(0, n, (2, 30))):
        loop = torch.arange(n)
        src, dst = torch.cat([ei[0], loop]), torch.cat([ei[1], loop])
        args = (torch.randn(n, d, dtype=torch.float64), torch.rand(n, d, dtype=torch.float64),
                torch.randn(n, d, dtype=torch.float64), torch.rand(n, d, dtype=torch.float64),
                src, dst, torch.rand(src.numel(), dtype=torch.float64),
                1 + torch.rand(src.numel(), dtype=torch.float64), n)
        a = _two_hop_inner(*args, padded=True)
        b = _two_hop_inner(*args, padded=False)
        assert torch.allclose(a, b, atol=1e-12) and float(a.abs().sum()) > 0


@pytest.mark.parametrize("bound", ["view", "set"])
def test_pot_gradients_flow(bound):
    dm = _easy_sbm()
    dm.setup()
    batch = Batch.from_data_list([dm.dataset[0]])
    torch.manual_seed(0)
    model = GraphContrastive(in_channels=8, hidden_channels=16, pot=True, pot_bound=bound)
    v1, v2 = model.views(batch)
    z1, z2 = model(v1), model(v2)
    f = model.compactness(batch, v1, z2, 0.2) + model.compactness(batch, v2, z1, 0.4)
    assert f.shape == (batch.num_nodes,) and bool(torch.isfinite(f).all())
    pot_loss(f).backward()
    for name, p in model.encoder.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
        assert float(p.grad.abs().sum()) > 0, name


def test_pot_requires_gcn_encoder():
    with pytest.raises(ValueError, match="GCNEncoder"):
        GraphContrastive(encoder=GCNEncoder(4, 8, num_layers=3), pot=True)
    with pytest.raises(ValueError, match="node-level"):
        GraphContrastive(level="graph", pot=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pot_bound_on_cuda_matches_cpu():
    g, x, enc, target = _pot_setup()
    budget = edge_drop_budget(g.edge_index, g.num_nodes, 0.4)
    ref = gcn_node_compactness(enc, x, g.edge_index, target, budget, feature_masking=True)
    dev = torch.device("cuda")
    out = gcn_node_compactness(enc.to(dev), x.to(dev), g.edge_index.to(dev), target.to(dev),
                               budget.to(dev), feature_masking=True)
    assert torch.allclose(out.cpu(), ref, atol=1e-9)


# -- graph level ------------------------------------------------------------------------------
def test_graph_level_on_parameter_graphs():
    from graphspace.nn.models.graph_metanetwork import GraphMetaNetwork

    pl.seed_everything(0)
    dm = FunctionZooDataModule(functions=("sin", "step"), num_per_class=6, hidden=(8,),
                               fit_steps=30, batch_size=6)
    model = GraphContrastive(
        level="graph", encoder=GraphMetaNetwork(16, hidden_channels=16, num_layers=2),
        proj_channels=16, augment1=[DropEdges(0.1), GaussianNoise(0.1)],
        augment2=[DropEdges(0.2), GaussianNoise(0.2)], lr=3e-3)
    batch = next(iter(dm.train_dataloader()))
    assert batch.num_graphs == 6 and model(batch).shape == (6, 16)
    v1, _ = model.views(batch)
    assert v1.num_graphs == 6 and v1.num_edges < batch.num_edges

    def fixed_view_loss():
        torch.manual_seed(7)
        a, b = model.views(batch)
        with torch.no_grad():
            return float(nt_xent(model.projector(model(a)), model.projector(model(b))))

    before = fixed_view_loss()
    trainer = _trainer(max_epochs=8, check_val_every_n_epoch=8)
    trainer.fit(model, dm)
    model.eval()
    assert fixed_view_loss() < before
    trainer.test(model, dm, verbose=False)
    assert 0.0 <= float(trainer.callback_metrics["test/probe_acc"]) <= 1.0


def test_graph_level_with_node_encoder_pools():
    graphs = [make_sbm_graph([5, 5], 0.5, 0.1, 4, seed=s) for s in range(3)]
    batch = Batch.from_data_list(graphs)
    model = GraphContrastive(level="graph", encoder=GCNEncoder(4, 6), encoder_takes_data=False)
    z = model(batch)
    assert z.shape == (3, 6)
    with torch.no_grad():
        assert torch.allclose(z[1], model.encoder(graphs[1].x, graphs[1].edge_index).mean(0),
                              atol=1e-6)


# -- configs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["contrastive_sbm.yaml", "contrastive_zoo.yaml"])
def test_yaml_configs_parse(name):
    cli = LightningCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True,
                       subclass_mode_data=True, run=False,
                       args=["--config", str(ROOT / "experiments" / name)])
    assert isinstance(cli.model, GraphContrastive)
    if name == "contrastive_sbm.yaml":
        assert isinstance(cli.datamodule, SBMDataModule)
        assert isinstance(cli.model.encoder, GCNEncoder)
        assert cli.model.encoder.convs[0].in_channels == cli.datamodule.num_features
    else:
        from graphspace.nn.models.graph_metanetwork import GraphMetaNetwork

        assert isinstance(cli.datamodule, FunctionZooDataModule)
        assert isinstance(cli.model.encoder, GraphMetaNetwork) and cli.model.level == "graph"
        from graphspace.data.augment import GaussianWeightNoise, RandomPositiveRescaling

        assert [type(t) for t in cli.model.augment[0]] == [RandomPositiveRescaling,
                                                           GaussianWeightNoise]
        assert cli.model.augment[1][1].scale == 0.2
    assert cli.trainer.max_epochs > 0


def test_augmentations_and_encoder_are_pygs():
    from torch_geometric.nn.models import GCN
    from torch_geometric.utils import dropout_edge, mask_feature

    g = Data(x=torch.randn(5, 6), edge_index=torch.randint(0, 5, (2, 30)))
    torch.manual_seed(3)
    ei, _ = dropout_edge(g.edge_index, p=0.4)
    torch.manual_seed(3)
    assert torch.equal(DropEdges(0.4)(g).edge_index, ei)
    torch.manual_seed(3)
    x, _ = mask_feature(g.x, p=0.5, mode="col")
    torch.manual_seed(3)
    assert torch.equal(MaskFeatures(0.5)(g).x, x)
    # undirected pairs are dropped together; a self-loop is kept once or dropped, never doubled
    und = Data(edge_index=torch.tensor([[0, 1, 1, 2, 2], [1, 0, 2, 1, 2]]), num_nodes=3)
    seen = set()
    for s in range(20):
        torch.manual_seed(s)
        e = DropEdges(0.5, force_undirected=True)(und).edge_index.t().tolist()
        assert len(e) == len(set(map(tuple, e))) and all([j, i] in e for i, j in e)
        seen.add(len(e))
    assert seen <= {0, 1, 2, 3, 4, 5} and len(seen) >= 4  # odd sizes: the self-loop kept
    enc = GCNEncoder(6, 4, activation="prelu")
    assert isinstance(enc, GCN) and len(enc.acts) == 2 and enc.acts[0].weight.numel() == 8
    h = enc.acts[1](enc.convs[1](enc.acts[0](enc.convs[0](g.x, g.edge_index)), g.edge_index))
    assert torch.equal(enc(g.x, g.edge_index), h)
