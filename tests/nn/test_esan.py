"""ESAN's DS/DSS backbones and bag subsampling (Bevilacqua et al., ICLR 2022)."""

from __future__ import annotations

import math

import pytest
import torch
from torch_geometric.data import Batch

from graphspace.graphs import ParameterGraph, permute_model
from graphspace.nn import GraphMetaNetwork
from graphspace.nn.models.backbones import EgoNetBag, ESANBag, esan_vote, subsample_bag
from graphspace.testing.models import MLP


def _batch(models):
    b = Batch.from_data_list([ParameterGraph.from_module(m) for m in models])
    b.x, b.edge_attr = b.x.double(), b.edge_attr.double()
    return b


def _full_bag():
    torch.manual_seed(0)
    b = _batch([MLP((3, 5, 2)), MLP((4, 6, 6, 2))])
    ei = torch.cat([b.edge_index, b.edge_index.flip(0)], dim=1)
    bag = EgoNetBag()(b.x, ei, b.edge_attr, b.batch, b)
    return b, ei, bag


@pytest.mark.parametrize("fraction,k", [(0.3, None), (0.5, None), (1.0, None), (None, 2),
                                        (None, 1000)])
def test_subsample_keeps_the_right_number_and_whole_ego_nets(fraction, k):
    b, ei, bag = _full_bag()
    sub = subsample_bag(bag, fraction, k, torch.Generator().manual_seed(3))
    sizes = torch.bincount(b.batch, minlength=2)
    roots = torch.unique(sub.subgraph_id)
    kept = torch.bincount(b.batch[roots], minlength=2)
    want = [math.ceil(fraction * int(m)) if fraction is not None else min(k, int(m))
            for m in sizes]
    assert kept.tolist() == want
    # every kept ego-net is whole: its bag nodes and bag edges, as in the full bag
    for r in roots.tolist():
        full_nodes = bag.node_map[bag.subgraph_id == r]
        assert torch.equal(sub.node_map[sub.subgraph_id == r], full_nodes)
        full_e = (bag.subgraph_id[bag.bag_edge_index[0]] == r).sum()
        assert (sub.subgraph_id[sub.bag_edge_index[0]] == r).sum() == full_e
    # bag edges stay inside one ego-net; edges into dropped ego-nets are marked -1
    assert torch.equal(sub.subgraph_id[sub.bag_edge_index[0]],
                       sub.subgraph_id[sub.bag_edge_index[1]])
    dropped = ~torch.isin(ei[1], roots)
    assert bool((sub.edge_to_bag[dropped] == -1).all())
    ok = sub.edge_to_bag[~dropped]
    assert torch.equal(sub.subgraph_id[ok], ei[1][~dropped])
    assert torch.equal(sub.node_map[ok], torch.where(ei[0] == ei[1], ei[1], ei[0])[~dropped])


def test_subsample_is_random_and_seeded():
    _, _, bag = _full_bag()
    a = subsample_bag(bag, 0.5, generator=torch.Generator().manual_seed(0))
    a2 = subsample_bag(bag, 0.5, generator=torch.Generator().manual_seed(0))
    c = subsample_bag(bag, 0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.subgraph_id, a2.subgraph_id)
    assert not torch.equal(torch.unique(a.subgraph_id), torch.unique(c.subgraph_id))
    with pytest.raises(ValueError, match="exactly one"):
        subsample_bag(bag)
    with pytest.raises(ValueError, match="fraction"):
        ESANBag(fraction=1.5)


@pytest.mark.parametrize("name", ["ds", "dss"])
def test_training_samples_evaluation_uses_all_and_votes_average(name):
    torch.manual_seed(0)
    models = [MLP((3, 5, 2)), MLP((3, 5, 2))]
    g = _batch(models)
    g_perm = _batch([permute_model(m, generator=torch.Generator().manual_seed(i))[0]
                     for i, m in enumerate(models)])
    net = GraphMetaNetwork(2, hidden_channels=8, num_layers=2, backbone=name,
                           backbone_kwargs={"fraction": 0.5}).double()
    full = GraphMetaNetwork(2, hidden_channels=8, num_layers=2, backbone=name).double()
    full.load_state_dict(net.state_dict())
    net.eval()
    full.eval()
    with torch.no_grad():
        ev = net(g)
        torch.testing.assert_close(ev, full(g), rtol=0, atol=0)  # all ego-nets at eval
        torch.testing.assert_close(net(g_perm), ev, rtol=0, atol=1e-9)  # invariant
        net.train()
        net.state_encoder.generator = torch.Generator().manual_seed(0)
        t1 = net(g)
        net.state_encoder.generator = torch.Generator().manual_seed(1)
        t2 = net(g)
        net.state_encoder.generator = None
    assert (t1 - ev).abs().max() > 1e-8 and (t1 - t2).abs().max() > 1e-8  # sampled
    # voting: the mean of the per-sample evaluation outputs, model left in its mode
    net.train()
    vote = esan_vote(net, g, num_votes=3, generator=torch.Generator().manual_seed(5))
    assert net.training and not net.state_encoder.sample_at_eval
    gen = torch.Generator().manual_seed(5)
    net.eval()
    net.state_encoder.sample_at_eval, net.state_encoder.generator = True, gen
    with torch.no_grad():
        each = torch.stack([net(g) for _ in range(3)])
    net.state_encoder.sample_at_eval, net.state_encoder.generator = False, None
    torch.testing.assert_close(vote, each.mean(0), rtol=0, atol=1e-12)
    assert (each[0] - each[1]).abs().max() > 1e-8
    with pytest.raises(ValueError, match="ESANBag"):
        esan_vote(GraphMetaNetwork(2, 8, num_layers=1), g)
