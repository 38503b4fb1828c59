"""Models as people write them today: exact round trips and proved symmetries (fp64)."""

import copy

import pytest
import torch
from torch import nn

from graphspace.graphs import (
    ParameterGraph,
    analyze,
    apply_permutation,
    permutation_groups,
    random_permutation,
    scaling_symmetries,
)
from graphspace.testing import assert_permutation_invariant
from graphspace.testing.models import modern_models

NAMES = sorted(modern_models())


def _model(name):
    torch.manual_seed(0)
    m, x = modern_models()[name]
    m = m.double()
    return m, (x.double() if x.is_floating_point() else x)


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_is_bit_exact(name):
    m, x = _model(name)
    g = ParameterGraph.from_module(m, x)
    sd, ref = g.to_state_dict(), m.state_dict()
    assert list(sd) == list(ref)
    for k in ref:
        assert sd[k].dtype == ref[k].dtype and torch.equal(sd[k], ref[k]), k


@pytest.mark.parametrize("name", NAMES)
def test_every_reported_group_is_a_symmetry(name):
    m, x = _model(name)
    # negative control (swapping input neurons changes the output) needs float inputs: a token
    # swap is invisible when neither token occurs in the example
    assert_permutation_invariant(m, x, atol=1e-10, generator=torch.Generator().manual_seed(1),
                                 negative_control=x.is_floating_point())


@pytest.mark.parametrize("name", ["nanogpt_tied", "gpt_manual_attention", "vit"])
def test_attention_heads_move_as_blocks_and_cross_head_moves_break(name):
    m, x = _model(name)
    a = analyze(m, x)
    heads = [g for g in permutation_groups(a) if g.num_heads]
    assert heads, "attention heads were not found"
    v = next(g for g in heads if len(g.members) == 1)
    d = v.size // v.num_heads
    ref = m(x)
    sd = {k: t.detach() for k, t in m.state_dict().items()}
    # negative control: moving one coordinate across heads changes the function
    across = {v.name: torch.roll(torch.arange(v.size), 1)}
    bad = copy.deepcopy(m)
    bad.load_state_dict(apply_permutation(a, sd, across))
    assert (bad(x) - ref).abs().max() > 1e-6
    # a pure head permutation is a symmetry
    hp = torch.roll(torch.arange(v.num_heads), 1)
    perms = {g.name: (hp.view(-1, 1) * (g.size // g.num_heads)
                      + torch.arange(g.size // g.num_heads)).reshape(-1)
             for g in heads if g.head_group == v.head_group}
    good = copy.deepcopy(m)
    good.load_state_dict(apply_permutation(a, sd, perms))
    assert (good(x) - ref).abs().max() < 1e-10
    assert d > 0


def test_tied_embedding_and_head_share_one_permutation():
    m, x = _model("nanogpt_tied")
    g = ParameterGraph.from_module(m, x)
    a = g.spec.analysis
    assert any(r.kind == "alias" for r in a.records)  # lm_head.weight is wte.weight
    perms = random_permutation(permutation_groups(a), torch.Generator().manual_seed(0))
    sd = apply_permutation(a, {k: v.detach() for k, v in m.state_dict().items()}, perms)
    assert torch.equal(sd["wte.weight"], sd["lm_head.weight"])


def test_non_persistent_buffer_multiplied_into_features_is_not_permuted():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)
            self.register_buffer("w", torch.linspace(0.5, 2.0, 6), persistent=False)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)) * self.w)

    m = M().double()
    a = analyze(m, torch.randn(3, 4, dtype=torch.float64))
    assert permutation_groups(a) == []
    assert scaling_symmetries(a) == {}


def test_transpose_with_equal_sizes_is_followed_exactly():
    class Mixer(nn.Module):  # token mixing on (B, L, C) with L == C
        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(3, 4)
            self.tok = nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            h = self.emb(x)                                # (B, L, C)
            h = self.tok(h.transpose(1, 2)).transpose(1, 2)  # mixes tokens
            return self.out(torch.relu(h))

    m = Mixer().double()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    with pytest.raises(Exception, match="different neurons|neuron"):
        # the token mixer reads a token axis that carries no neurons: never guessed
        analyze(m, x)


def test_amax_is_not_sign_flippable():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)).amax(1))

    m = M().double()
    a = analyze(m, torch.randn(2, 7, 3, dtype=torch.float64))
    assert scaling_symmetries(a) == {}


def test_analysis_leaves_batchnorm_statistics_and_modes_alone():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    before = copy.deepcopy(m.state_dict())
    analyze(m, torch.randn(2, 3, 8, 8))
    assert m.training and all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_analysis_is_cached_per_architecture():
    m1, x = _model("nanogpt_untied")
    m2, _ = _model("nanogpt_untied")
    assert analyze(m1, x) is analyze(m2, x)
    t, _ = _model("nanogpt_tied")
    assert analyze(t, x) is not analyze(m1, x)  # a tie changes the architecture


def test_state_dict_dtype_and_layout_survive_the_graph():
    from safetensors.torch import save

    m, x = _model("nanogpt_untied")
    a = analyze(m.float(), x)  # analysed in float32
    sd64 = {k: v.double() for k, v in m.state_dict().items()}
    back = ParameterGraph.from_state_dict(sd64, a).to_state_dict()
    assert all(back[k].dtype == torch.float64 and torch.equal(back[k], sd64[k]) for k in sd64)
    assert all(v.is_contiguous() for v in back.values())
    save(back)  # safetensors accepts it: contiguous, no shared storage


def test_graphs_pickle_without_the_exported_program():
    import pickle

    m, x = _model("vit")
    g = ParameterGraph.from_module(m, x)
    g2 = pickle.loads(pickle.dumps(g))
    assert g2.spec.analysis.program is None and g.spec.analysis.program is not None
    sd = g2.to_state_dict()
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())


def test_tied_head_edges_carry_the_embedding_and_follow_writes():
    m, x = _model("nanogpt_tied")
    g = ParameterGraph.from_module(m, x)
    second = g.spec.analysis.tied_records[0]  # the second use of the one tied tensor
    (a, b), = g.spec.tied_ranges[second.tied_to]
    w = m.state_dict()["lm_head.weight"]  # (vocab, C), also wte.weight
    c = second.to_canonical(w)
    assert torch.equal(g.edge_attr[a:b, 0].view_as(c), c)
    assert torch.equal(g.edge_index[1, a:b].view_as(c)[:, 0], second.dst)
    rec = g.spec.analysis.record(second.tied_to)
    rec.write(g, rec.read(g) * 2)
    assert torch.equal(g.edge_attr[a:b, 0].view_as(c), 2 * c)
    sd = g.to_state_dict()
    assert torch.equal(sd["lm_head.weight"], 2 * w) and torch.equal(sd["wte.weight"], 2 * w)


def test_embedding_max_norm_table_is_not_renormalised_by_the_analysis():
    m = nn.Sequential(nn.Embedding(10, 4, max_norm=0.5), nn.Linear(4, 2))
    with torch.no_grad():
        m[0].weight.mul_(3)  # rows well above max_norm
    w0 = m[0].weight.detach().clone()
    g = ParameterGraph.from_module(m, torch.randint(0, 10, (2, 5)))
    assert torch.equal(m[0].weight, w0)
    assert [gr.size for gr in permutation_groups(g)] == [4]


@pytest.mark.parametrize("kernel", ["edge", "channel"])
def test_transposed_weights_list_the_canonical_edges_in_stored_order(kernel):
    """Embedding tables (and HF Conv1D weights) are kept in their stored order: the same
    (src, dst, weight) edges as the canonical layout, read and written canonically."""
    torch.manual_seed(0)
    m, x = modern_models()["nanogpt_tied"]
    m = m.double()
    g = ParameterGraph.from_module(m, x, kernel=kernel)
    sd = m.state_dict()
    recs = [r for r in g.spec.records if r.stored_transposed]
    assert recs  # the token and position embeddings
    for r in recs:
        a, b = g.spec.ranges[r.key]
        c = r.to_canonical(sd[r.key])  # (out, in)
        o, il = c.shape
        want = torch.stack([r.src.view(1, il).expand(o, il).reshape(-1),
                            r.dst.view(o, 1).expand(o, il).reshape(-1)])
        col = 0 if kernel == "edge" else int(g.spec.pad_index[r.key][0])
        got_vals = g.edge_attr[a:b, col]
        key = lambda ei: ei[0] * g.num_nodes + ei[1]  # noqa: E731
        order_w, order_g = key(want).argsort(), key(g.edge_index[:, a:b]).argsort()
        assert torch.equal(want[:, order_w], g.edge_index[:, a:b][:, order_g])
        assert torch.equal(c.reshape(-1)[order_w], got_vals[order_g])
        assert torch.equal(r.read(g), c)
        r.write(g, 2 * c)
        assert torch.equal(r.read(g), 2 * c)
    back = g.to_state_dict()
    for r in recs:
        assert torch.equal(back[r.key], 2 * sd[r.key])
    assert torch.equal(back["lm_head.weight"], back["wte.weight"])
    # every edge, the tied head's repeated ones included, is what the new weights give
    rebuilt = ParameterGraph.from_state_dict(back, g.spec.analysis, kernel=kernel)
    assert torch.equal(rebuilt.edge_attr, g.edge_attr)
    assert torch.equal(rebuilt.edge_index, g.edge_index)


def test_a_module_called_twice_carries_its_bias_on_both_uses():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = torch.nn.Linear(3, 5)
            self.mid = torch.nn.Linear(5, 5)
            self.out = torch.nn.Linear(5, 2)

        def forward(self, x):
            h = self.mid(torch.relu(self.inp(x)))
            return self.out(self.mid(torch.relu(h)))  # self.mid used twice

    torch.manual_seed(0)
    m = Twice().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    g = ParameterGraph.from_module(m, x)
    rec = next(r for r in g.spec.records if r.key == "mid.bias")
    assert len(rec.repeat_nodes) == 1
    bias = m.mid.bias.detach()
    assert torch.equal(g.x[rec.nodes, rec.column], bias)
    assert torch.equal(g.x[rec.repeat_nodes[0], rec.column], bias)  # not zero
    rec.write(g, 2 * bias)
    assert torch.equal(g.x[rec.repeat_nodes[0], rec.column], 2 * bias)
    assert torch.equal(g.to_state_dict()["mid.bias"], 2 * bias)
    assert_permutation_invariant(m, x, atol=1e-12, generator=torch.Generator().manual_seed(0))
