import pytest
import torch
from torch import nn

from graphspace.nn.conv.egnn_conv import EGNN, EGNNConv


def _random_orthogonal(dim: int, det: float, generator: torch.Generator, dtype) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.sign(torch.linalg.det(q)) != det:
        q[:, 0] = -q[:, 0]
    assert torch.allclose(q @ q.T, torch.eye(dim, dtype=torch.float64), atol=1e-12)
    return q.to(dtype)


def _graph(num_nodes: int, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    mask = torch.rand(num_nodes, num_nodes, generator=generator) < p
    mask = (mask | mask.T) & ~torch.eye(num_nodes, dtype=torch.bool)
    return mask.nonzero().T.contiguous()


def _inputs(dtype, seed=0, num_nodes=7, channels=5, edge_dim=2, dim=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_nodes, channels, generator=g, dtype=torch.float64).to(dtype)
    pos = torch.randn(num_nodes, dim, generator=g, dtype=torch.float64).to(dtype)
    vel = torch.randn(num_nodes, dim, generator=g, dtype=torch.float64).to(dtype)
    ei = _graph(num_nodes, g)
    ea = torch.randn(ei.size(1), edge_dim, generator=g, dtype=torch.float64).to(dtype)
    return x, pos, vel, ei, ea, g


def _make(dtype, seed=0, **kw):
    torch.manual_seed(seed)
    conv = EGNNConv(5, 5, hidden_channels=16, edge_dim=2, **kw).to(dtype)
    # a larger coordinate head than the paper's 1e-3 init so the test is not trivial
    with torch.no_grad():
        conv.coord_mlp[-1].weight.normal_(0, 0.5)
    return conv


VARIANTS = [
    {},
    {"attention": True},
    {"normalize": True},
    {"tanh": True, "coords_range": 3.0},
    {"coords_agg": "sum"},
    {"residual": False},
    {"velocity": True},
    {"velocity": True, "attention": True, "normalize": True, "tanh": True},
]


def _run(conv, x, pos, ei, ea, vel):
    out = conv(x, pos, ei, ea, vel) if conv.velocity else conv(x, pos, ei, ea)
    return out


@pytest.mark.parametrize("kw", VARIANTS)
@pytest.mark.parametrize("det", [1.0, -1.0])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_e3_equivariance(kw, det, dtype, tol):
    x, pos, vel, ei, ea, g = _inputs(dtype)
    conv = _make(dtype, **kw)
    q = _random_orthogonal(3, det, g, dtype)
    t = torch.randn(3, generator=g, dtype=torch.float64).to(dtype)
    out = _run(conv, x, pos, ei, ea, vel)
    out_t = _run(conv, x, pos @ q.T + t, ei, ea, vel @ q.T)
    # features invariant
    assert (out_t[0] - out[0]).abs().max().item() <= tol
    # coordinates equivariant: f(Qx + t) = Q f(x) + t
    assert (out_t[1] - (out[1] @ q.T + t)).abs().max().item() <= tol
    if conv.velocity:
        # velocity equivariant, no translation
        assert (out_t[2] - out[2] @ q.T).abs().max().item() <= tol
    # not vacuous: the coordinates actually moved
    assert (out[1] - pos).abs().max().item() > 1e-3


def test_equivariance_in_2d_and_5d():
    for dim in (2, 5):
        x, pos, vel, ei, ea, g = _inputs(torch.float64, dim=dim)
        conv = _make(torch.float64, velocity=True)
        q = _random_orthogonal(dim, -1.0, g, torch.float64)
        t = torch.randn(dim, generator=g, dtype=torch.float64)
        h, p, v = conv(x, pos, ei, ea, vel)
        h2, p2, v2 = conv(x, pos @ q.T + t, ei, ea, vel @ q.T)
        torch.testing.assert_close(h2, h, atol=1e-12, rtol=0)
        torch.testing.assert_close(p2, p @ q.T + t, atol=1e-12, rtol=0)
        torch.testing.assert_close(v2, v @ q.T, atol=1e-12, rtol=0)


def test_negative_control_coordinates_as_features():
    """Feeding coordinates as plain features (a generic GNN) breaks E(3) invariance."""
    x, pos, vel, ei, ea, g = _inputs(torch.float64)
    torch.manual_seed(0)
    conv = EGNNConv(5 + 3, 5, hidden_channels=16, edge_dim=2).double()
    q = _random_orthogonal(3, 1.0, g, torch.float64)
    zeros = torch.zeros_like(pos)
    h, _ = conv(torch.cat([x, pos], -1), zeros, ei, ea)
    h_rot, _ = conv(torch.cat([x, pos @ q.T], -1), zeros, ei, ea)
    assert (h - h_rot).abs().max().item() > 1e-3


def test_negative_control_moving_one_node():
    """Translating only one node is not a symmetry: the output must change."""
    x, pos, vel, ei, ea, g = _inputs(torch.float64)
    conv = _make(torch.float64)
    h, p = conv(x, pos, ei, ea)
    moved = pos.clone()
    moved[0] += torch.tensor([0.7, -0.3, 0.2], dtype=torch.float64)
    h2, p2 = conv(x, moved, ei, ea)
    assert (h2 - h).abs().max().item() > 1e-3
    # and the other nodes' coordinates do not simply follow
    assert (p2[1:] - p[1:]).abs().max().item() > 1e-4


def test_permutation_equivariance_and_negative_control():
    x, pos, vel, ei, ea, g = _inputs(torch.float64, num_nodes=9)
    conv = _make(torch.float64, velocity=True, attention=True)
    perm = torch.randperm(9, generator=g)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(9)
    h, p, v = conv(x, pos, ei, ea, vel)
    # relabel node i -> inv[i]; node k of the new graph is old node perm[k]
    h2, p2, v2 = conv(x[perm], pos[perm], inv[ei], ea, vel[perm])
    torch.testing.assert_close(h2, h[perm], atol=1e-12, rtol=0)
    torch.testing.assert_close(p2, p[perm], atol=1e-12, rtol=0)
    torch.testing.assert_close(v2, v[perm], atol=1e-12, rtol=0)
    # negative control: permuting the nodes without relabelling the edges
    h3, _, _ = conv(x[perm], pos[perm], ei, ea, vel[perm])
    assert (h3 - h[perm]).abs().max().item() > 1e-3


def test_matches_explicit_loop():
    """Slow per-node reference of eq. 3-6 (mean coordinate aggregation, attention)."""
    x, pos, vel, ei, ea, g = _inputs(torch.float64)
    conv = _make(torch.float64, attention=True)
    h, p = conv(x, pos, ei, ea)
    n = x.size(0)
    for i in range(n):
        m_sum = torch.zeros(16, dtype=torch.float64)
        d_sum = torch.zeros(3, dtype=torch.float64)
        cnt = 0
        for e in range(ei.size(1)):
            j, tgt = ei[0, e].item(), ei[1, e].item()
            if tgt != i:
                continue
            d = pos[i] - pos[j]
            inp = torch.cat([x[i], x[j], (d * d).sum().view(1), ea[e]])
            m = conv.edge_mlp(inp)
            m = m * torch.sigmoid(conv.att_mlp(m))
            m_sum += m
            d_sum += d * conv.coord_mlp(m)
            cnt += 1
        ref_p = pos[i] + (d_sum / cnt if cnt else 0)
        ref_h = x[i] + conv.node_mlp(torch.cat([x[i], m_sum]))
        torch.testing.assert_close(p[i], ref_p, atol=1e-12, rtol=0)
        torch.testing.assert_close(h[i], ref_h, atol=1e-12, rtol=0)


def test_velocity_update_matches_eq7():
    x, pos, vel, ei, ea, g = _inputs(torch.float64)
    conv = _make(torch.float64, velocity=True)
    ref = _make(torch.float64)  # same seed -> same shared weights
    ref.load_state_dict({k: v for k, v in conv.state_dict().items() if "vel_mlp" not in k})
    h, p, v = conv(x, pos, ei, ea, vel)
    h_ref, p_ref = ref(x, pos, ei, ea)
    delta = p_ref - pos
    torch.testing.assert_close(v, conv.vel_mlp(x) * vel + delta)
    torch.testing.assert_close(p, pos + v)
    torch.testing.assert_close(h, h_ref)


def test_gradients_flow():
    x, pos, vel, ei, ea, g = _inputs(torch.float32)
    x.requires_grad_(True)
    pos.requires_grad_(True)
    conv = _make(torch.float32, velocity=True, attention=True)
    h, p, v = conv(x, pos, ei, ea, vel)
    (h.square().sum() + p.square().sum() + v.square().sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert pos.grad is not None and pos.grad.abs().sum() > 0
    for name, prm in conv.named_parameters():
        assert prm.grad is not None and torch.isfinite(prm.grad).all(), name
        assert prm.grad.abs().sum() > 0, name


def test_shapes_options_and_repr():
    x, pos, vel, ei, ea, g = _inputs(torch.float32)
    conv = EGNNConv(5, 11, hidden_channels=8)
    h, p = conv(x, pos, ei)
    assert h.shape == (7, 11) and p.shape == (7, 3)
    assert not conv.residual  # in != out
    assert "EGNNConv(5, 11, hidden_channels=8" in repr(conv)
    with pytest.raises(ValueError):
        EGNNConv(5, 5, coords_agg="max")
    with pytest.raises(ValueError):
        EGNNConv(5, 5, edge_dim=2)(x, pos, ei)
    with pytest.raises(ValueError):
        EGNNConv(5, 5, velocity=True)(x, pos, ei)
    # paper init: the coordinate head starts tiny
    assert conv.coord_mlp[-1].weight.abs().max() < 1e-2
    # isolated nodes keep their coordinates
    ei_empty = torch.empty(2, 0, dtype=torch.long)
    h0, p0 = conv(x, pos, ei_empty)
    torch.testing.assert_close(p0, pos)


def test_egnn_model_equivariance_and_grad():
    g = torch.Generator().manual_seed(3)
    n = 5
    ei = (~torch.eye(n, dtype=torch.bool)).nonzero().T
    x = torch.randn(n, 1, generator=g, dtype=torch.float64)
    pos = torch.randn(n, 3, generator=g, dtype=torch.float64)
    vel = torch.randn(n, 3, generator=g, dtype=torch.float64)
    ea = torch.randn(ei.size(1), 2, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = EGNN(1, 16, out_channels=4, num_layers=3, edge_dim=2, velocity=True).double()
    for layer in model.layers:
        nn.init.normal_(layer.coord_mlp[-1].weight, 0, 0.3)
    q = _random_orthogonal(3, -1.0, g, torch.float64)
    t = torch.randn(3, generator=g, dtype=torch.float64)
    h, p = model(x, pos, ei, ea, vel)
    h2, p2 = model(x, pos @ q.T + t, ei, ea, vel @ q.T)
    assert h.shape == (n, 4) and p.shape == (n, 3)
    torch.testing.assert_close(h2, h, atol=1e-11, rtol=0)
    torch.testing.assert_close(p2, p @ q.T + t, atol=1e-11, rtol=0)
    (p - pos).square().mean().backward()
    assert all(prm.grad is not None for prm in model.layers[0].parameters())
    assert "EGNN(1, 16, out_channels=4, num_layers=3, velocity=True)" == repr(model)
    with pytest.raises(ValueError):
        model(x, pos, ei, ea)
