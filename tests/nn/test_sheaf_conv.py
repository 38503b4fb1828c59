import pytest
import torch
from torch_geometric.utils import get_laplacian, to_undirected

from graphspace.nn.conv.sheaf_conv import (
    ConnectionLaplacian,
    ConnectionSheafConv,
    SheafConv,
    SheafLaplacian,
    orthogonal_from_params,
    sym_matrix_pow,
    undirected_edges,
)

MAP_CASES = [
    ("diag", "householder"),
    ("orthogonal", "householder"),
    ("orthogonal", "cayley"),
    ("orthogonal", "matrix_exp"),
    ("general", "householder"),
]


def _graph(n: int, seed: int, p: float = 0.35) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.triu(torch.rand(n, n, generator=g) < p, 1)
    idx = torch.arange(n - 1)
    mask[idx, idx + 1] = True  # a path keeps it connected
    mask = mask | mask.T
    return mask.nonzero().T.contiguous()


def _x(n: int, c: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g, dtype=torch.float64)


def _conv(map_type, orth, d=3, in_c=6, out_c=None, seed=0, **kw):
    torch.manual_seed(seed)
    return SheafConv(
        in_c, out_c, stalk_dim=d, map_type=map_type, orthogonal_map=orth, **kw
    ).double()


def _dense_laplacian(lap: SheafLaplacian) -> torch.Tensor:
    """Slow reference: dense coboundary -> L = delta^T delta -> D^{-1/2} L D^{-1/2}."""
    n, d = lap.num_nodes, lap.stalk_dim
    edges = lap.edge_index.T.tolist()
    fa, fb = lap.maps_src, lap.maps_dst
    if lap.map_type == "diag":
        fa, fb = torch.diag_embed(fa), torch.diag_embed(fb)
    delta = torch.zeros(len(edges) * d, n * d, dtype=torch.float64)
    for e, (a, b) in enumerate(edges):
        delta[e * d : (e + 1) * d, a * d : (a + 1) * d] = fa[e]
        delta[e * d : (e + 1) * d, b * d : (b + 1) * d] = -fb[e]
    lf = delta.T @ delta
    dinv = torch.zeros_like(lf)
    for v in range(n):
        blk = lf[v * d : (v + 1) * d, v * d : (v + 1) * d]
        if lap.augmented:
            blk = blk + torch.eye(d, dtype=torch.float64)
        lam, vec = torch.linalg.eigh(blk)
        inv = torch.where(lam > 1e-10, lam.clamp_min(1e-300).rsqrt(), torch.zeros_like(lam))
        dinv[v * d : (v + 1) * d, v * d : (v + 1) * d] = vec @ torch.diag(inv) @ vec.T
    return dinv @ lf @ dinv


# --------------------------------------------------------------------------- Laplacian


@pytest.mark.parametrize("map_type,orth", MAP_CASES)
@pytest.mark.parametrize("augmented", [True, False])
def test_normalised_laplacian_matches_dense_and_is_psd_in_0_2(map_type, orth, augmented):
    n, d, f = 9, 3, 4
    ei = _graph(n, 1)
    x = _x(n, d * f, 2)
    conv = _conv(map_type, orth, d=d, in_c=d * f, augmented=augmented)
    with torch.no_grad():
        lap = conv.laplacian(x, ei)
        dense = _dense_laplacian(lap)
        # symmetric, PSD, spectrum in [0, 2]
        torch.testing.assert_close(dense, dense.T, atol=1e-12, rtol=0)
        lam = torch.linalg.eigvalsh(dense)
        assert lam.min() > -1e-10 and lam.max() < 2 + 1e-10
        # the block-sparse operator equals the dense reference
        y = lap.matmul(x.view(n, d, f))
        ref = (dense @ x.view(n * d, f)).view(n, d, f)
        torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)
    # a non-trivial sheaf: the spectrum is not that of the graph Laplacian (negative control)
    if map_type != "diag":
        graph = get_laplacian(ei, normalization="sym", num_nodes=n)
        g = torch.zeros(n, n, dtype=torch.float64)
        g[graph[0][0], graph[0][1]] = graph[1].double()
        glam = torch.linalg.eigvalsh(torch.kron(g, torch.eye(d, dtype=torch.float64)))
        assert (glam - lam).abs().max() > 1e-3


def test_connection_laplacian_matches_dense_and_is_psd_in_0_2():
    n, d = 10, 2
    ei = _graph(n, 3)
    pos = _x(n, 5, 4)
    for augmented in (True, False):
        lap = ConnectionLaplacian(d, augmented=augmented)(pos, ei)
        dense = _dense_laplacian(lap)
        torch.testing.assert_close(dense, dense.T, atol=1e-12, rtol=0)
        lam = torch.linalg.eigvalsh(dense)
        assert lam.min() > -1e-10 and lam.max() < 2 + 1e-10
        x = _x(n, d * 3, 5).view(n, d, 3)
        ref = (dense @ x.reshape(n * d, 3)).view(n, d, 3)
        torch.testing.assert_close(lap.matmul(x), ref, atol=1e-12, rtol=0)


def test_undirected_edges_symmetrises_and_drops_self_loops():
    ei = torch.tensor([[0, 1, 2, 2, 3], [1, 0, 3, 2, 0]])
    assert undirected_edges(ei, 4).tolist() == [[0, 0, 2], [1, 3, 3]]


@pytest.mark.parametrize("bad", [[[0], [6]], [[-1], [2]]])
def test_undirected_edges_refuses_nodes_out_of_range(bad):
    # node 6 of a 6-node graph used to come back as node 1 (6 = 1 * 6 + 0)
    with pytest.raises(ValueError, match=r"edge_index holds node indices outside \[0, 6\)"):
        undirected_edges(torch.tensor(bad), 6)


# --------------------------------------------------------------------------- maps


@pytest.mark.parametrize("orth", ["householder", "cayley", "matrix_exp"])
@pytest.mark.parametrize("d", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orthogonal_maps_are_orthogonal(orth, d, dtype):
    g = torch.Generator().manual_seed(d)
    params = torch.randn(64, d * (d - 1) // 2, generator=g).to(dtype)
    q = orthogonal_from_params(params, d, orth)
    eye = torch.eye(d, dtype=dtype)
    assert (q.transpose(-1, -2) @ q - eye).abs().amax() <= 1e-6
    if d > 1:  # the parametrisation really depends on its parameters
        assert (q - q[:1]).abs().amax() > 1e-2
    det = torch.linalg.det(q.double())
    expected = (-1.0) ** d if orth == "householder" else 1.0
    torch.testing.assert_close(det, torch.full_like(det, expected), atol=1e-5, rtol=0)


@pytest.mark.parametrize("orth", ["householder", "cayley", "matrix_exp"])
def test_learned_orthogonal_restriction_maps_are_orthogonal(orth):
    n, d = 9, 4
    ei = _graph(n, 0)
    x = _x(n, 8, 1).float()
    conv = _conv("orthogonal", orth, d=d, in_c=8).float()
    _, fa, fb = conv.restriction_maps(x, ei)
    eye = torch.eye(d)
    for f in (fa, fb):
        assert (f.transpose(-1, -2) @ f - eye).abs().amax() <= 1e-6
    # edge weights scale the orthogonal maps by w_e in (0, 1), the same on both sides
    conv_w = _conv("orthogonal", orth, d=d, in_c=8, edge_weights=True).float()
    _, fa, fb = conv_w.restriction_maps(x, ei)
    wa = (fa.transpose(-1, -2) @ fa)[:, 0, 0]
    wb = (fb.transpose(-1, -2) @ fb)[:, 0, 0]
    torch.testing.assert_close(wa, wb)
    assert bool(((wa > 0) & (wa < 1)).all())


def test_connection_maps_are_orthogonal_procrustes_alignments():
    n, d = 12, 3
    ei = _graph(n, 2)
    pos = _x(n, 6, 3)
    conn = ConnectionLaplacian(d)
    bases = conn.local_bases(pos, ei)
    eye = torch.eye(d, dtype=torch.float64)
    torch.testing.assert_close(bases.transpose(-1, -2) @ bases, eye.expand(n, d, d))
    und, o = conn.transports(pos, ei)
    assert (o.transpose(-1, -2) @ o - eye).abs().amax() <= 1e-10
    # Procrustes optimality: O_ab is at least as close to O_a^T O_b as random orthogonals
    s = bases[und[0]].transpose(-1, -2) @ bases[und[1]]
    best = (o - s).norm(dim=(-1, -2))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        r = orthogonal_from_params(torch.randn(und.size(1), 3, generator=g).double(), d)
        r = torch.cat([r, -r])
        dist = (r - s.repeat(2, 1, 1)).norm(dim=(-1, -2)).view(2, -1).amin(0)
        assert bool((best <= dist + 1e-12).all())
    # local PCA on a plane: the basis spans the plane the neighbourhoods live in
    plane = torch.randn(2, 6, generator=g).double()
    flat = torch.randn(n, 2, generator=g).double() @ plane
    b = conn.local_bases(flat, ei)[:, :, :2]
    proj = plane.T @ torch.linalg.solve(plane @ plane.T, plane)
    torch.testing.assert_close(proj @ b, b, atol=1e-10, rtol=0)


def test_connection_maps_do_not_depend_on_neighbour_order():
    n, d = 10, 2
    ei = _graph(n, 4)
    pos = _x(n, 4, 5)
    conn = ConnectionLaplacian(d)
    perm = torch.randperm(ei.size(1), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(conn.local_bases(pos, ei), conn.local_bases(pos, ei[:, perm]))


# --------------------------------------------------------------------------- diffusion


def _dense_sym_laplacian(ei, n):
    ones = torch.ones(ei.size(1), dtype=torch.float64)
    idx, w = get_laplacian(ei, ones, normalization="sym", num_nodes=n)
    lap = torch.zeros(n, n, dtype=torch.float64)
    lap.index_put_((idx[0], idx[1]), w.double(), accumulate=True)
    return lap


@pytest.mark.parametrize("orth", ["householder", "cayley", "matrix_exp"])
def test_d1_identity_maps_reduce_to_normalised_graph_laplacian_diffusion(orth):
    n, f = 11, 5
    ei = _graph(n, 6)
    x = _x(n, f, 7)
    conv = _conv("orthogonal", orth, d=1, in_c=f, augmented=False)
    with torch.no_grad():
        conv.epsilon.fill_(0.3)
        conv.left.weight.fill_(-1.7)
    out = conv(x, ei)
    lap = _dense_sym_laplacian(ei, n)
    w1 = conv.left.weight.item()
    coeff = 1 + torch.tanh(torch.tensor(0.3, dtype=torch.float64))
    ref = coeff * x - torch.nn.functional.elu(lap @ (w1 * x) @ conv.right.weight.T)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    # the augmented normalisation (D + I)^{-1/2} L (D + I)^{-1/2} differs (negative control)
    conv.augmented = True
    ones = torch.ones(ei.size(1), dtype=torch.float64)
    idx, w = get_laplacian(ei, ones, normalization=None, num_nodes=n)
    lun = torch.zeros(n, n, dtype=torch.float64)
    lun.index_put_((idx[0], idx[1]), w.double(), accumulate=True)
    s = (lun.diagonal() + 1).rsqrt()
    ref_aug = coeff * x - torch.nn.functional.elu(
        (s[:, None] * lun * s[None, :]) @ (w1 * x) @ conv.right.weight.T
    )
    out_aug = conv(x, ei)
    torch.testing.assert_close(out_aug, ref_aug, atol=1e-12, rtol=0)
    assert (out_aug - out).abs().max() > 1e-3


@pytest.mark.parametrize("map_type,orth", MAP_CASES)
@pytest.mark.parametrize("residual", [True, False])
def test_sheaf_conv_matches_dense_update(map_type, orth, residual):
    n, d, f_in, f_out = 8, 2, 3, 4
    ei = _graph(n, 8)
    x = _x(n, d * f_in, 9)
    conv = _conv(map_type, orth, d=d, in_c=d * f_in, out_c=d * f_out, residual=residual)
    with torch.no_grad():
        conv.left.weight.normal_()
        if conv.epsilon is not None:
            conv.epsilon.normal_()
    out = conv(x, ei)
    with torch.no_grad():
        dense = _dense_laplacian(conv.laplacian(x, ei))
        xs = x.view(n, d, f_in)
        h = torch.einsum("ij,njf->nif", conv.left.weight, xs) @ conv.right.weight.T
        hf = h.reshape(n * d, f_out)
        elu = torch.nn.functional.elu
        if residual:
            x0 = (1 + torch.tanh(conv.epsilon)).view(1, d, 1) * (xs @ conv.skip.weight.T)
            ref = x0 - elu(dense @ hf).view(n, d, f_out)
        else:
            ref = elu(hf - dense @ hf).view(n, d, f_out)
    torch.testing.assert_close(out, ref.reshape(n, d * f_out), atol=1e-12, rtol=0)


def _relabel(ei, perm):
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return inv[ei]


@pytest.mark.parametrize("map_type,orth", MAP_CASES + [("connection", None)])
def test_node_permutation_equivariance_with_negative_control(map_type, orth):
    n, d = 10, 2
    ei = _graph(n, 10)
    x = _x(n, 6, 11)
    if map_type == "connection":
        torch.manual_seed(0)
        conv = ConnectionSheafConv(6, stalk_dim=d).double()
    else:
        conv = _conv(map_type, orth, d=d)
    with torch.no_grad():
        conv.left.weight.normal_()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    out = conv(x, ei)
    out_p = conv(x[perm], _relabel(ei, perm))
    torch.testing.assert_close(out_p, out[perm], atol=1e-12, rtol=0)
    # negative control: permuting the features but not the graph is not a symmetry
    wrong = conv(x[perm], ei)
    assert (wrong - out[perm]).abs().max() > 1e-3


@pytest.mark.parametrize("map_type,orth", MAP_CASES + [("connection", None)])
def test_gradients_flow(map_type, orth):
    n, d = 9, 3
    ei = _graph(n, 12)
    x = _x(n, 6, 13).requires_grad_()
    if map_type == "connection":
        torch.manual_seed(0)
        conv = ConnectionSheafConv(6, 9, stalk_dim=d).double()
    else:
        conv = _conv(map_type, orth, d=d, out_c=9, sheaf_hidden_channels=8)
    with torch.no_grad():  # move away from the epsilon=0 / W1=I init so all grads are generic
        conv.left.weight.add_(0.1 * torch.randn(d, d, dtype=torch.float64))
    conv(x, ei).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in conv.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_general_maps_gradients_with_isolated_node_are_finite():
    # an isolated node has D_v + I = I (repeated eigenvalues): plain eigh backward is NaN
    n = 6
    ei = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]])
    x = _x(n, 4, 0)
    conv = _conv("general", "householder", d=2, in_c=4)
    conv(x, ei).sum().backward()
    for p in conv.parameters():
        assert torch.isfinite(p.grad).all()


def test_sym_matrix_pow_values_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 3, 3, generator=g, dtype=torch.float64)
    spd = a @ a.transpose(-1, -2) + 0.5 * torch.eye(3, dtype=torch.float64)
    r = sym_matrix_pow(spd, -0.5)
    torch.testing.assert_close(r @ spd @ r, torch.eye(3, dtype=torch.float64).expand(4, 3, 3))
    # repeated eigenvalues included (2 I and diag(1, 1, 3))
    rep = torch.stack([2 * torch.eye(3), torch.diag(torch.tensor([1.0, 1.0, 3.0]))]).double()
    for m in (spd, rep):
        m = m.clone().requires_grad_()
        assert torch.autograd.gradcheck(
            lambda t: sym_matrix_pow(0.5 * (t + t.transpose(-1, -2)), -0.5), (m,)
        )
    # pseudo-inverse on singular matrices
    sing = torch.diag(torch.tensor([0.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(
        sym_matrix_pow(sing, -0.5), torch.diag(torch.tensor([0.0, 0.5], dtype=torch.float64))
    )


# --------------------------------------------------------------------------- inductive


@pytest.mark.parametrize("map_type,orth", MAP_CASES + [("connection", None)])
def test_same_module_on_two_graphs_and_their_disjoint_union(map_type, orth):
    d = 2
    if map_type == "connection":
        torch.manual_seed(0)
        conv = ConnectionSheafConv(6, 4, stalk_dim=d).double()
    else:
        conv = _conv(map_type, orth, d=d, out_c=4)
    g1, g2 = _graph(7, 20), _graph(12, 21, p=0.2)
    x1, x2 = _x(7, 6, 22), _x(12, 6, 23)
    o1, o2 = conv(x1, g1), conv(x2, g2)
    assert o1.shape == (7, 4) and o2.shape == (12, 4)
    both = conv(torch.cat([x1, x2]), torch.cat([g1, g2 + 7], dim=1))
    torch.testing.assert_close(both, torch.cat([o1, o2]), atol=1e-12, rtol=0)


def test_directed_input_is_symmetrised_and_self_loops_ignored():
    n = 8
    ei = _graph(n, 30)
    x = _x(n, 4, 31)
    conv = _conv("general", "householder", d=2, in_c=4)
    one_way = ei[:, ei[0] < ei[1]]
    loops = torch.arange(n).repeat(2, 1)
    ref = conv(x, ei)
    torch.testing.assert_close(conv(x, one_way), ref)
    torch.testing.assert_close(conv(x, torch.cat([one_way, loops], 1)), ref)
    torch.testing.assert_close(conv(x, to_undirected(one_way)), ref)


def test_connection_conv_precomputed_laplacian_and_pos():
    n, d = 9, 2
    ei = _graph(n, 40)
    x, pos = _x(n, 4, 41), _x(n, 5, 42)
    torch.manual_seed(0)
    conv = ConnectionSheafConv(4, stalk_dim=d).double()
    lap = conv.laplacian(pos, ei)
    torch.testing.assert_close(conv(x, ei, pos=pos), conv(x, ei, laplacian=lap))
    assert (conv(x, ei) - conv(x, ei, pos=pos)).abs().max() > 1e-6
    with pytest.raises(ValueError):
        ConnectionLaplacian(3)(_x(n, 2, 0), ei)


def test_repr_and_argument_checks():
    conv = SheafConv(6, 8, stalk_dim=2, map_type="orthogonal", orthogonal_map="cayley")
    assert repr(conv) == (
        "SheafConv(6, 8, map_type='orthogonal', orthogonal_map='cayley', stalk_dim=2, "
        "left_weights=True, right_weights=True, epsilon=True, residual=True, augmented=True)"
    )
    assert repr(SheafConv(4, stalk_dim=2)).startswith("SheafConv(4, 4, map_type='diag', stalk")
    assert repr(ConnectionSheafConv(4, stalk_dim=2)).startswith("ConnectionSheafConv(4, 4, stalk")
    assert repr(ConnectionLaplacian(2)) == (
        "ConnectionLaplacian(stalk_dim=2, augmented=True, min_neighbors=2)"
    )
    with pytest.raises(ValueError):
        SheafConv(5, stalk_dim=2)
    with pytest.raises(ValueError):
        SheafConv(4, stalk_dim=2, map_type="bogus")
    with pytest.raises(ValueError):
        SheafConv(4, 6, stalk_dim=2, right_weights=False)
    with pytest.raises(ValueError):
        SheafConv(4, stalk_dim=2, map_type="diag", edge_weights=True)


def test_reset_parameters_restores_nsd_init():
    conv = SheafConv(6, stalk_dim=3, map_type="general")
    with torch.no_grad():
        conv.left.weight.normal_()
        conv.epsilon.normal_()
    conv.reset_parameters()
    torch.testing.assert_close(conv.left.weight, torch.eye(3))
    torch.testing.assert_close(conv.epsilon, torch.zeros(3))
    w = conv.right.weight
    torch.testing.assert_close(w @ w.T, torch.eye(2), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- PyG integration


def _formats(ei, n):
    from torch_geometric import EdgeIndex
    from torch_geometric.utils import to_torch_coo_tensor

    adj_t = to_torch_coo_tensor(ei, size=(n, n)).t()
    out = {"edge_index": ei, "EdgeIndex": EdgeIndex(ei, sparse_size=(n, n)),
           "coo": adj_t, "csr": adj_t.to_sparse_csr()}
    try:
        from torch_sparse import SparseTensor
    except ImportError:
        pass
    else:
        out["SparseTensor"] = SparseTensor.from_edge_index(ei, sparse_sizes=(n, n)).t()
    return out


@pytest.mark.parametrize("map_type,orth", MAP_CASES)
def test_sheaf_conv_accepts_every_adjacency_format(map_type, orth):
    from torch_geometric.nn import MessagePassing

    n = 9
    ei = _graph(n, 50)
    x = _x(n, 6, 51)
    conv = _conv(map_type, orth)
    assert isinstance(conv, MessagePassing)
    ref = conv(x, ei)
    for name, adj in _formats(ei, n).items():
        torch.testing.assert_close(conv(x, adj), ref, atol=1e-12, rtol=0, msg=name)


def test_connection_conv_accepts_every_adjacency_format():
    n = 9
    ei = _graph(n, 52)
    x, pos = _x(n, 4, 53), _x(n, 5, 54)
    torch.manual_seed(0)
    conv = ConnectionSheafConv(4, stalk_dim=2).double()
    ref = conv(x, ei, pos=pos)
    for name, adj in _formats(ei, n).items():
        torch.testing.assert_close(conv(x, adj, pos=pos), ref, atol=1e-12, rtol=0, msg=name)


@pytest.mark.parametrize("map_type,orth", MAP_CASES)
@pytest.mark.parametrize("fuse", [True, False])
def test_message_passing_diffusion_equals_block_laplacian(map_type, orth, fuse):
    """The layer's message/aggregate (fuse=False) and fused sheaf_aggregate paths both equal
    the block-form Laplacian product."""
    n = 10
    ei = _graph(n, 55)
    x = _x(n, 6, 56)
    conv = _conv(map_type, orth)
    conv.fuse = fuse
    lap = conv.laplacian(x, ei)
    h = _x(n, 6, 57).view(n, 3, 2)
    torch.testing.assert_close(conv.diffuse(lap, h), lap.matmul(h), atol=1e-12, rtol=0)


def test_sheaf_layers_compose_in_pyg_sequential():
    from torch_geometric.nn import Sequential

    n = 8
    ei = _graph(n, 58)
    torch.manual_seed(0)
    model = Sequential("x, edge_index", [
        (SheafConv(6, stalk_dim=3, map_type="orthogonal"), "x, edge_index -> x"),
        torch.nn.ReLU(),
        (ConnectionSheafConv(6, 4, stalk_dim=2), "x, edge_index -> x"),
    ]).double()
    assert model(_x(n, 6, 59), ei).shape == (n, 4)


def _orthogonal(p, seed, reflect):
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    if reflect != (torch.linalg.det(q) < 0):
        q = q.clone()
        q[:, 0] = -q[:, 0]
    return q


@pytest.mark.parametrize("reflect", [False, True])
def test_connection_sheaf_is_gauge_invariant_with_negative_control(reflect):
    """Rotating/reflecting (and translating) pos leaves the output unchanged; the local bases
    themselves do rotate (not vacuous); a non-orthogonal map of pos changes the output."""
    n, p, d = 11, 5, 2
    ei = _graph(n, 60)
    x, pos = _x(n, 4, 61), _x(n, p, 62)
    r = _orthogonal(p, 63, reflect)
    assert (torch.linalg.det(r) < 0) == reflect
    moved = pos @ r + 3.0
    torch.manual_seed(0)
    conv = ConnectionSheafConv(4, stalk_dim=d).double()
    ref = conv(x, ei, pos=pos)
    torch.testing.assert_close(conv(x, ei, pos=moved), ref, atol=1e-10, rtol=0)
    # the bases are equivariant, O_i -> R^T O_i, and so differ from the unrotated ones
    b0, b1 = conv.connection.local_bases(pos, ei), conv.connection.local_bases(moved, ei)
    torch.testing.assert_close(b1, r.T @ b0, atol=1e-10, rtol=0)
    assert (b1 - b0).abs().max() > 1e-2
    # negative control: a generic linear map of pos is not a gauge transformation
    stretch = torch.diag(torch.linspace(0.2, 3.0, p, dtype=torch.float64)) @ r
    assert (conv(x, ei, pos=pos @ stretch) - ref).abs().max() > 1e-4
