import pytest
import torch

from graphspace.nn.conv.unitary_conv import (
    GUMPConv,
    LieUnitaryConv,
    UnitaryConv,
    arc_to_node,
    complex_to_real,
    gump_arcs,
    line_digraph,
    node_to_arc,
    polar_factor,
    real_to_complex,
)


def _graph(n: int, seed: int, p: float = 0.4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, n, generator=g) < p
    mask = torch.triu(mask, 1)
    mask = mask | mask.T
    # a path keeps the graph connected
    idx = torch.arange(n - 1)
    mask[idx, idx + 1] = True
    mask[idx + 1, idx] = True
    return mask.nonzero().T.contiguous()


def _dense_adj(conv, edge_index, n, dtype=torch.float64, edge_weight=None):
    from graphspace.nn.conv.unitary_conv import _adjacency

    ei, ew = _adjacency(edge_index, edge_weight, n, conv.normalize, conv.add_self_loops, dtype)
    a = torch.zeros(n, n, dtype=dtype)
    a.index_put_((ei[1], ei[0]), ew, accumulate=True)
    return a


def _cx(n, c, seed, dtype=torch.complex128):
    g = torch.Generator().manual_seed(seed)
    return torch.complex(
        torch.randn(n, c, generator=g, dtype=torch.float64),
        torch.randn(n, c, generator=g, dtype=torch.float64),
    ).to(dtype)


# --------------------------------------------------------------------------- helpers


def test_complex_real_round_trip():
    z = _cx(4, 3, 0)
    r = complex_to_real(z)
    assert r.shape == (4, 6) and not r.is_complex()
    torch.testing.assert_close(real_to_complex(r), z)


# --------------------------------------------------------------------------- UnitaryConv


@pytest.mark.parametrize("normalize,self_loops", [(True, True), (True, False), (False, False)])
def test_unitary_conv_matches_dense_matrix_exp(normalize, self_loops):
    n, ei = 9, _graph(9, 0)
    x = _cx(n, 4, 1)
    torch.manual_seed(0)
    t = 0.7 if normalize else 0.25  # unnormalised adjacency has a larger spectrum
    conv = UnitaryConv(
        4, 3, order=30, t=t, normalize=normalize, add_self_loops=self_loops, bias=True
    ).double()
    with torch.no_grad():
        conv.bias.normal_()
    out = conv(x, ei)
    a = _dense_adj(conv, ei, n)
    w = torch.complex(*conv.complex_weight())
    b = real_to_complex(conv.bias.view(1, -1))
    t = conv.t.item()  # the float32 buffer's value after .double()
    ref = torch.linalg.matrix_exp(1j * t * a.to(torch.complex128)) @ x @ w + b
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    # the real channel-paired form gives the same numbers
    out_r = conv(complex_to_real(x), ei)
    torch.testing.assert_close(real_to_complex(out_r), ref, atol=1e-12, rtol=0)


def test_unitary_conv_edge_weights_and_in_gt_out():
    n, ei = 8, _graph(8, 2)
    g = torch.Generator().manual_seed(0)
    # symmetric edge weights
    w_sym = torch.rand(n, n, generator=g, dtype=torch.float64)
    w_sym = w_sym + w_sym.T
    ew = w_sym[ei[0], ei[1]]
    x = _cx(n, 5, 3)
    conv = UnitaryConv(5, 2, order=30).double()  # out < in: weight applied first
    out = conv(x, ei, ew)
    a = _dense_adj(conv, ei, n, edge_weight=ew)
    torch.testing.assert_close(a, a.T)
    ref = (
        torch.linalg.matrix_exp(1j * a.to(torch.complex128))
        @ x
        @ torch.complex(*conv.complex_weight())
    )
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "weight,in_c,out_c", [("identity", 4, 4), ("unitary", 4, 4), ("unitary", 3, 6)]
)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-6)])
def test_unitary_conv_preserves_norm(weight, in_c, out_c, dtype, tol):
    n, ei = 12, _graph(12, 4)
    conv = UnitaryConv(in_c, out_c, weight=weight, order=12, t=1.0).to(dtype)
    x = complex_to_real(_cx(n, in_c, 5)).to(dtype)
    out = conv(x, ei)
    rel = (out.norm() / x.norm() - 1).abs().item()
    assert rel <= tol, rel
    if weight == "unitary":
        w = torch.complex(*conv.complex_weight()).to(torch.complex128)
        eye = torch.eye(in_c, dtype=torch.complex128)
        torch.testing.assert_close(w @ w.conj().T, eye, atol=1e-5, rtol=0)
    # not vacuous: the features changed
    assert (out[:, :in_c] - x[:, :in_c]).abs().max() > 1e-2 or weight != "identity"


def test_unitary_conv_negative_controls():
    """A dense (non-unitary) weight does not preserve the norm; a one-direction edge_index is
    symmetrised (same output as the undirected graph); and the fixed-order Taylor series
    without scaling and squaring (the old implementation) is far from unitary at t = 6,
    where the layer stays exact."""
    n, ei = 10, _graph(10, 6)
    x = _cx(n, 4, 7)
    torch.manual_seed(1)
    dense = UnitaryConv(4, 4, weight="dense").double()
    assert abs(dense(x, ei).norm() / x.norm() - 1) > 1e-2
    ident = UnitaryConv(4, 4, weight="identity", t=6.0).double()
    directed = ei[:, ei[0] < ei[1]]
    assert directed.size(1) < ei.size(1)
    torch.testing.assert_close(ident(x, directed), ident(x, ei), atol=1e-13, rtol=0)
    assert abs(ident(x, ei).norm() / x.norm() - 1) < 1e-12
    a = _dense_adj(ident, ei, n).to(torch.complex128)
    term, series = x, x
    for k in range(1, 11):  # unscaled degree-10 Taylor series of exp(6 i A)
        term = 6.0j * (a @ term) / k
        series = series + term
    assert abs(series.norm() / x.norm() - 1) > 0.5


def test_unitary_conv_permutation_equivariance():
    n, ei = 10, _graph(10, 8)
    x = complex_to_real(_cx(n, 3, 9))
    conv = UnitaryConv(3, 5, learn_t=True, t=0.9).double()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(n)
    out = conv(x, ei)
    torch.testing.assert_close(conv(x[perm], inv[ei]), out[perm], atol=1e-12, rtol=0)
    # negative control: permuted features on the unpermuted graph
    assert (conv(x[perm], ei) - out[perm]).abs().max() > 1e-3


def test_unitary_conv_gradients_and_repr():
    n, ei = 7, _graph(7, 10)
    x = complex_to_real(_cx(n, 3, 11)).float().requires_grad_(True)
    for weight in ("dense", "unitary"):
        conv = UnitaryConv(3, 4, weight=weight, learn_t=True, bias=True)
        conv(x, ei).pow(2).sum().backward()
        for name, p in conv.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0
    conv = UnitaryConv(3, 4)
    assert repr(conv) == "UnitaryConv(3, 4, order=None, weight='dense')"
    assert "t" not in dict(conv.named_parameters())
    with pytest.raises(ValueError):
        conv(torch.randn(n, 3), ei)  # a real input must be paired (2 * 3 columns)
    with pytest.raises(ValueError):
        UnitaryConv(3, 4, weight="identity")
    complex_out = UnitaryConv(3, 4)(_cx(n, 3, 0, torch.complex64), ei)
    assert complex_out.is_complex() and complex_out.shape == (n, 4)


# --------------------------------------------------------------------------- LieUnitaryConv


def _kron_reference(conv, x, ei, n):
    """Dense exp of g = A ⊗ W^T (row-major vec) or i A ⊗ H^T."""
    a = _dense_adj(conv, ei, n).to(torch.complex128)
    w = conv.generator_weight()
    if isinstance(w, tuple):
        gen = 1j * torch.kron(a, torch.complex(*w).T.contiguous().to(torch.complex128))
    else:
        gen = torch.kron(a, w.T.contiguous().to(torch.complex128))
    return (torch.linalg.matrix_exp(gen) @ x.reshape(-1).to(torch.complex128)).reshape(n, -1)


def test_lie_orthogonal_matches_dense_and_preserves_norm():
    n, ei = 8, _graph(8, 12)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    conv = LieUnitaryConv(4, 4, order=30).double()
    w = conv.generator_weight()
    torch.testing.assert_close(w, -w.T)
    out = conv(x, ei)
    ref = _kron_reference(conv, x, ei, n)
    assert ref.imag.abs().max() < 1e-12
    torch.testing.assert_close(out, ref.real, atol=1e-12, rtol=0)
    assert abs(out.norm() / x.norm() - 1) < 1e-12
    assert (out - x).abs().max() > 1e-2


def test_lie_unitary_complex_matches_dense_and_preserves_norm():
    n, ei = 7, _graph(7, 13)
    x = _cx(n, 3, 14)
    torch.manual_seed(0)
    conv = LieUnitaryConv(3, 3, complex=True, order=30).double()
    h_re, h_im = conv.generator_weight()
    h = torch.complex(h_re, h_im)
    torch.testing.assert_close(h, h.conj().T)
    out = conv(x, ei)
    torch.testing.assert_close(out, _kron_reference(conv, x, ei, n), atol=1e-12, rtol=0)
    assert abs(out.norm() / x.norm() - 1) < 1e-12
    out_paired = conv(complex_to_real(x), ei)
    torch.testing.assert_close(real_to_complex(out_paired), out)


@pytest.mark.parametrize("complex_", [False, True])
def test_lie_norm_fp32_default_order_and_padding(complex_):
    n, ei = 30, _graph(30, 15, p=0.2)
    conv = LieUnitaryConv(5, 8, complex=complex_)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 10 if complex_ else 5, generator=g)
    out = conv(x, ei)
    assert out.shape == (n, 16 if complex_ else 8)
    assert abs(out.norm() / x.norm() - 1).item() < 1e-6


def test_lie_negative_controls_and_equivariance():
    n, ei = 9, _graph(9, 16)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    conv = LieUnitaryConv(4, 4, order=20).double()
    # a symmetric (not skew) generator weight breaks orthogonality
    sym = LieUnitaryConv(4, 4, order=20).double()
    sym.generator_weight = lambda: sym.weight_re + sym.weight_re.T  # type: ignore[method-assign]
    assert abs(sym(x, ei).norm() / x.norm() - 1) > 1e-3
    # permutation equivariance + negative control
    perm = torch.randperm(n, generator=g)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(n)
    out = conv(x, ei)
    torch.testing.assert_close(conv(x[perm], inv[ei]), out[perm], atol=1e-12, rtol=0)
    assert (conv(x[perm], ei) - out[perm]).abs().max() > 1e-3


def test_lie_gradients_and_repr():
    n, ei = 6, _graph(6, 17)
    for complex_ in (False, True):
        conv = LieUnitaryConv(3, 3, complex=complex_, bias=True)
        x = torch.randn(n, 6 if complex_ else 3, requires_grad=True)
        conv(x, ei).pow(3).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        for name, p in conv.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert repr(LieUnitaryConv(3, 3)) == "LieUnitaryConv(3, 3, complex=False, order=None)"
    with pytest.raises(ValueError):
        LieUnitaryConv(4, 3)
    with pytest.raises(ValueError):
        LieUnitaryConv(3, 3)(_cx(n, 3, 0), ei)


# --------------------------------------------------------------------------- GUMP


def test_gump_arcs_and_line_digraph_structure():
    n, ei = 8, _graph(8, 20)
    arcs = gump_arcs(ei[:, ei[0] < ei[1]], n)  # works from one direction per edge
    assert torch.equal(arcs, gump_arcs(ei, n))
    s = line_digraph(arcs, n)
    deg = torch.bincount(arcs[0], minlength=n)
    assert torch.equal(s.degree, deg)
    assert s.line_index.size(1) == int((deg * deg).sum())
    a, b = s.line_index
    assert torch.equal(arcs[1, a], arcs[0, b])  # a = (u -> v), b = (v -> w)
    assert torch.equal(s.center, arcs[1, a])
    assert torch.equal(s.backtrack, arcs[1, b] == arcs[0, a])
    assert int(s.backtrack.sum()) == arcs.size(1)  # one reverse per arc
    assert torch.equal(torch.sort(s.perm).values, torch.arange(s.perm.numel()))
    with pytest.raises(ValueError):
        line_digraph(torch.tensor([[0, 1], [1, 2]]), 3)  # not Eulerian


def _dense_line_matrix(values, structure):
    a_n = structure.num_arcs
    m = torch.zeros(a_n, a_n, dtype=values.dtype)
    m[structure.line_index[1], structure.line_index[0]] = values
    return m


@pytest.mark.parametrize("grover", [False, True])
def test_gump_unitary_adjacency_matches_dense_polar(grover):
    n, ei = 9, _graph(9, 21)
    arcs = gump_arcs(ei, n)
    s = line_digraph(arcs, n)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(arcs.size(1), 6, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    conv = GUMPConv(6, 6, grover_prior=grover).double()
    _, vals = conv.unitary_adjacency(x, arcs, s)
    u = _dense_line_matrix(vals, s)
    eye = torch.eye(arcs.size(1), dtype=torch.float64)
    torch.testing.assert_close(u @ u.T, eye, atol=1e-12, rtol=0)
    # dense reference: polar factor of the whole (A x A) weighted line-graph adjacency
    abar = _dense_line_matrix(conv.scores(x, s), s)
    p, _, qh = torch.linalg.svd(abar)
    torch.testing.assert_close(u, p @ qh, atol=1e-10, rtol=0)
    # supported on the line digraph only
    support = _dense_line_matrix(torch.ones_like(vals), s)
    assert (u[support == 0] == 0).all()


def test_gump_grover_prior_at_zero_scores_is_grover_walk():
    n, ei = 7, _graph(7, 22)
    arcs = gump_arcs(ei, n)
    s = line_digraph(arcs, n)
    conv = GUMPConv(3, 3, grover_prior=True).double()
    with torch.no_grad():
        conv.att.zero_()
    _, vals = conv.unitary_adjacency(torch.randn(arcs.size(1), 3).double(), arcs, s)
    d = s.degree[s.center].double()
    torch.testing.assert_close(vals, 2.0 / d - s.backtrack.double(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("projection", ["svd", "newton_schulz"])
def test_gump_preserves_norm(projection):
    n, ei = 12, _graph(12, 23)
    arcs = gump_arcs(ei, n)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(arcs.size(1), 4, generator=g, dtype=torch.float64)
    conv = GUMPConv(4, 4, projection=projection, ns_steps=60, grover_prior=True).double()
    with torch.no_grad():
        conv.lin.weight.copy_(torch.eye(4))
    out = conv(x, arcs)
    assert abs(out.norm() / x.norm() - 1).item() < 1e-6
    assert (out - x).abs().max() > 1e-2
    # negative control: without the projection (raw scores) the norm is not preserved
    line_index, raw = line_digraph(arcs, n).line_index, conv.scores(x, line_digraph(arcs, n))
    from graphspace.ops import scatter

    naive = scatter(x[line_index[0]] * raw[:, None], line_index[1], dim_size=x.size(0))
    assert abs(naive.norm() / x.norm() - 1).item() > 1e-2


def test_newton_schulz_matches_svd_polar():
    g = torch.Generator().manual_seed(3)
    m = torch.randn(5, 4, 4, generator=g, dtype=torch.float64) + 3 * torch.eye(4)
    torch.testing.assert_close(
        polar_factor(m, "newton_schulz", steps=40), polar_factor(m, "svd"), atol=1e-10, rtol=0
    )
    with pytest.raises(ValueError):
        polar_factor(m, "qr")  # type: ignore[arg-type]


def test_gump_permutation_equivariance_and_negative_control():
    n, ei = 10, _graph(10, 24)
    arcs = gump_arcs(ei, n)
    a_n = arcs.size(1)
    g = torch.Generator().manual_seed(5)
    x_node = torch.randn(n, 3, generator=g, dtype=torch.float64)
    torch.manual_seed(2)
    conv = GUMPConv(6, 5).double()

    def model(x_node, arcs):
        return arc_to_node(conv(node_to_arc(x_node, arcs), arcs), arcs, x_node.size(0))

    out = model(x_node, arcs)
    # relabel nodes and shuffle the arc order
    perm = torch.randperm(n, generator=g)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(n)
    arcs_p = inv[arcs][:, torch.randperm(a_n, generator=g)]
    torch.testing.assert_close(model(x_node[perm], arcs_p), out[perm], atol=1e-10, rtol=0)

    # arc-level equivariance: shuffling arcs permutes the arc outputs
    x_arc = node_to_arc(x_node, arcs)
    sigma = torch.randperm(a_n, generator=g)
    torch.testing.assert_close(
        conv(x_arc[sigma], arcs[:, sigma]), conv(x_arc, arcs)[sigma], atol=1e-10, rtol=0
    )

    # negative control 1: permuted node features on the unpermuted graph
    assert (model(x_node[perm], arcs) - out[perm]).abs().max() > 1e-3

    # negative control 2: an order-dependent orthogonalisation (QR / Gram-Schmidt instead of
    # the polar factor) is unitary but not permutation equivariant
    def qr_unitary(m, method="svd", steps=0):
        q, r = torch.linalg.qr(m)
        return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)

    import graphspace.nn.conv.unitary_conv as uc

    orig = uc.polar_factor
    uc.polar_factor = qr_unitary
    try:
        out_qr = model(x_node, arcs)
        out_qr_p = model(x_node[perm], arcs_p)
    finally:
        uc.polar_factor = orig
    assert (out_qr_p - out_qr[perm]).abs().max() > 1e-3


def test_gump_gradients_shapes_repr():
    n, ei = 8, _graph(8, 25)
    arcs = gump_arcs(ei, n)
    x = torch.randn(arcs.size(1), 4, requires_grad=True)
    for projection in ("svd", "newton_schulz"):
        conv = GUMPConv(4, 7, attention_channels=8, projection=projection, bias=True)
        out = conv(x, arcs)
        assert out.shape == (arcs.size(1), 7)
        out.pow(2).sum().backward()
        for name, p in conv.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert repr(GUMPConv(4, 7)) == "GUMPConv(4, 7, projection='svd', grover_prior=True)"
    with pytest.raises(ValueError):
        GUMPConv(4, 4, projection="qr")  # type: ignore[arg-type]
    # a leaf node (degree 1) gives a 1 x 1 block: U = sign(score), here +-1
    path = gump_arcs(torch.tensor([[0, 1], [1, 2]]), 3)
    _, vals = GUMPConv(2, 2).unitary_adjacency(torch.randn(path.size(1), 2), path)
    s = line_digraph(path, 3)
    leaf = s.degree[s.center] == 1
    torch.testing.assert_close(vals[leaf].abs(), torch.ones(int(leaf.sum())))


def test_polar_factor_gradient_is_exact_and_finite_at_repeated_singular_values():
    g = torch.Generator().manual_seed(7)
    m = torch.randn(3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(polar_factor, (m,))
    one = torch.randn(2, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(polar_factor, (one,))
    # an orthogonal block (all singular values equal, e.g. the Grover coin at zero scores):
    # the generic SVD backward gives NaN, the polar-specific backward is finite and exact
    d = 4
    reverse = torch.eye(d, dtype=torch.float64)[torch.tensor([1, 0, 3, 2])]
    coin = (2.0 / d * torch.ones(d, d, dtype=torch.float64) - reverse).requires_grad_(True)
    w = torch.randn(d, d, generator=g, dtype=torch.float64)
    p, _, qh = torch.linalg.svd(coin)
    (naive,) = torch.autograd.grad((p @ qh * w).sum(), coin)
    assert not torch.isfinite(naive).all()
    (ours,) = torch.autograd.grad((polar_factor(coin) * w).sum(), coin)
    assert torch.isfinite(ours).all()
    assert torch.autograd.gradcheck(polar_factor, (coin,))


# --------------------------------------------------------------------------- exactness at scale


def _norm_err(out, x):
    return abs(out.double().norm() / x.double().norm() - 1).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("t", [6.0, 100.0, -37.5])
@pytest.mark.parametrize("weight,in_c,out_c", [("identity", 3, 3), ("unitary", 2, 4)])
def test_unitary_conv_exact_at_large_t(dtype, tol, t, weight, in_c, out_c):
    """Scaling and squaring keeps exp(i t A) unitary at any t (the fixed order-10 series had
    norm error 0.94 at t = 6)."""
    n, ei = 9, _graph(9, 20)
    torch.manual_seed(0)
    conv = UnitaryConv(in_c, out_c, weight=weight, t=t).to(dtype)
    x = complex_to_real(_cx(n, in_c, 21)).to(dtype)
    out = conv(x, ei)
    assert out.dtype == dtype
    assert _norm_err(out, x) <= tol
    if dtype == torch.float64 and weight == "identity":
        a = _dense_adj(conv, ei, n).to(torch.complex128)
        ref = torch.linalg.matrix_exp(1j * t * a) @ real_to_complex(x)
        torch.testing.assert_close(real_to_complex(out), ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("scale", [8.0, 100.0])
@pytest.mark.parametrize("complex_", [False, True])
def test_lie_conv_exact_at_large_weight(dtype, tol, scale, complex_):
    """||W||_2 = 100 stays orthogonal/unitary (weight x8 had norm error 0.59 before)."""
    n, ei = 7, _graph(7, 22)
    torch.manual_seed(0)
    conv = LieUnitaryConv(3, 3, complex=complex_).double()
    with torch.no_grad():
        w = conv.generator_weight()
        w = torch.complex(*w) if isinstance(w, tuple) else w
        factor = scale / torch.linalg.matrix_norm(w, 2).item()
        conv.weight_re.mul_(factor)
        if complex_:
            conv.weight_im.mul_(factor)
    g = torch.Generator().manual_seed(23)
    x = torch.randn(n, 6 if complex_ else 3, generator=g, dtype=torch.float64)
    if dtype == torch.float64:
        ref = _kron_reference(conv, real_to_complex(x) if complex_ else x, ei, n)
    conv = conv.to(dtype)
    out = conv(x.to(dtype), ei)
    assert _norm_err(out, x) <= tol
    if dtype == torch.float64:
        got = real_to_complex(out) if complex_ else out.to(torch.complex128)
        torch.testing.assert_close(got, ref, atol=1e-9, rtol=0)


def test_taylor_schedule_meets_its_bound_and_expm_multiply_matches_matrix_exp():
    from graphspace.nn.conv.unitary_conv import _remainder, expm_multiply, taylor_schedule

    for theta in (1e-3, 0.7, 5.0, 123.0):
        for tol in (2.0**-53, 2.0**-24):
            m, s = taylor_schedule(theta, tol)
            assert s * _remainder(theta / s, m) <= tol and theta / s <= 5.0
    assert taylor_schedule(0.0, 1e-16) == (0, 1)
    with pytest.raises(ValueError):
        taylor_schedule(float("nan"), 1e-16)
    g = torch.Generator().manual_seed(0)
    b = torch.randn(6, 6, generator=g, dtype=torch.float64) * 5
    v = torch.randn(6, 2, generator=g, dtype=torch.float64)
    theta = torch.linalg.matrix_norm(b, 2).item()
    got = expm_multiply(lambda y: b @ y, v, theta, 2.0**-53)
    ref = torch.linalg.matrix_exp(b) @ v
    torch.testing.assert_close(got, ref, atol=1e-9 * ref.abs().max().item(), rtol=0)


# --------------------------------------------------------------------------- inverse


@pytest.mark.parametrize("weight,in_c,out_c", [("identity", 3, 3), ("unitary", 2, 4),
                                               ("dense", 3, 3)])
@pytest.mark.parametrize("t", [1.0, 50.0])
def test_unitary_conv_inverse(weight, in_c, out_c, t):
    n, ei = 8, _graph(8, 24)
    torch.manual_seed(0)
    conv = UnitaryConv(in_c, out_c, weight=weight, t=t, bias=True).double()
    with torch.no_grad():
        conv.bias.normal_()
    x = _cx(n, in_c, 25)
    y = conv(x, ei)
    torch.testing.assert_close(conv.inverse(y, ei), x, atol=1e-10, rtol=0)
    xr = complex_to_real(x)
    torch.testing.assert_close(conv.inverse(conv(xr, ei), ei), xr, atol=1e-10, rtol=0)
    # negative control: inverting on another graph does not give x back
    assert (conv.inverse(y, _graph(8, 99)) - x).abs().max() > 1e-3


def test_unitary_conv_inverse_refused_where_not_invertible():
    with pytest.raises(ValueError, match="not invertible"):
        UnitaryConv(4, 2, weight="unitary").inverse(torch.randn(5, 4), _graph(5, 0))
    with pytest.raises(ValueError, match="not invertible"):
        UnitaryConv(2, 3).inverse(torch.randn(5, 6), _graph(5, 0))


@pytest.mark.parametrize("complex_", [False, True])
def test_lie_conv_inverse(complex_):
    n, ei = 8, _graph(8, 26)
    torch.manual_seed(0)
    conv = LieUnitaryConv(2, 4, complex=complex_, bias=True).double()
    with torch.no_grad():
        conv.weight_re.mul_(40)
        conv.bias.normal_()
    g = torch.Generator().manual_seed(27)
    x = torch.randn(n, 4 if complex_ else 2, generator=g, dtype=torch.float64)
    y = conv(x, ei)
    torch.testing.assert_close(conv.inverse(y, ei), x, atol=1e-10, rtol=0)
    if complex_:
        xc = real_to_complex(x)
        torch.testing.assert_close(conv.inverse(conv(xc, ei), ei), xc, atol=1e-10, rtol=0)
    assert (conv.inverse(y, _graph(8, 98)) - x).abs().max() > 1e-3


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


@pytest.mark.parametrize("make", [
    lambda: UnitaryConv(3, 3, t=2.0), lambda: LieUnitaryConv(3, 4),
    lambda: LieUnitaryConv(3, 3, complex=True)])
def test_unitary_layers_accept_every_adjacency_format(make):
    from torch_geometric.nn import MessagePassing

    n, ei = 9, _graph(9, 28)
    torch.manual_seed(0)
    conv = make().double()
    assert isinstance(conv, MessagePassing)
    width = 3 if isinstance(conv, LieUnitaryConv) and not conv.complex else 6
    x = torch.randn(n, width, dtype=torch.float64)
    ref = conv(x, ei)
    for name, adj in _formats(ei, n).items():
        torch.testing.assert_close(conv(x, adj), ref, atol=1e-12, rtol=0, msg=name)
    # explain mode takes the readable message/aggregate path: same numbers
    conv.explain = False
    conv.fuse = False
    torch.testing.assert_close(conv(x, ei), ref, atol=1e-12, rtol=0)


def test_gump_accepts_every_adjacency_format():
    from torch_geometric.nn import MessagePassing

    from graphspace.nn.validation import as_edge_index

    n = 7
    arcs = gump_arcs(_graph(n, 29))
    torch.manual_seed(0)
    conv = GUMPConv(4, 3).double()
    assert isinstance(conv, MessagePassing)
    x = torch.randn(arcs.size(1), 4, dtype=torch.float64)
    ref = conv(x, arcs)
    key = arcs[0] * n + arcs[1]
    for name, adj in _formats(arcs, n).items():
        got_arcs, _ = as_edge_index(adj)
        got_arcs = got_arcs.as_tensor() if hasattr(got_arcs, "as_tensor") else got_arcs
        perm = torch.argsort(key)[torch.searchsorted(key.sort().values,
                                                     got_arcs[0] * n + got_arcs[1])]
        torch.testing.assert_close(conv(x[perm], adj), ref[perm], atol=1e-12, rtol=0,
                                   msg=name)


def test_pyg_sequential_composition():
    from torch_geometric.nn import Sequential

    n, ei = 8, _graph(8, 30)
    torch.manual_seed(0)
    model = Sequential("x, edge_index", [
        (UnitaryConv(2, 2, weight="unitary", t=3.0), "x, edge_index -> x"),
        (LieUnitaryConv(4, 4), "x, edge_index -> x"),
    ]).double()
    x = torch.randn(n, 4, dtype=torch.float64)
    out = model(x, ei)
    assert out.shape == (n, 4) and abs(out.norm() / x.norm() - 1) < 1e-12
    arcs = gump_arcs(ei)
    gump = Sequential("x, arc_index", [(GUMPConv(4, 4), "x, arc_index -> x"),
                                       torch.nn.ReLU()]).double()
    assert gump(torch.randn(arcs.size(1), 4, dtype=torch.float64), arcs).shape == (
        arcs.size(1), 4)


def test_learned_t_is_exact_and_differentiable_at_large_t():
    n, ei = 6, _graph(6, 31)
    conv = UnitaryConv(2, 2, weight="identity", t=40.0, learn_t=True).double()
    x = complex_to_real(_cx(n, 2, 32)).requires_grad_(True)
    out = conv(x, ei)
    assert _norm_err(out, x) < 1e-12
    out[:, 0].sum().backward()
    assert torch.isfinite(conv.t.grad) and conv.t.grad.abs() > 0


def test_lie_conv_symmetrises_directed_input():
    """One direction of every edge gives the undirected result (and stays orthogonal);
    asymmetric weights on the two directions are averaged."""
    n, ei = 8, _graph(8, 33)
    torch.manual_seed(0)
    conv = LieUnitaryConv(3, 3).double()
    x = torch.randn(n, 3, dtype=torch.float64)
    one_way = ei[:, ei[0] < ei[1]]
    torch.testing.assert_close(conv(x, one_way), conv(x, ei), atol=1e-13, rtol=0)
    w = torch.rand(ei.size(1), dtype=torch.float64) + 0.5
    rev = torch.argsort(ei[1] * n + ei[0])[torch.argsort(torch.argsort(ei[0] * n + ei[1]))]
    assert torch.equal(ei[:, rev], ei.flip(0))
    mean = 0.5 * (w + w[rev])
    torch.testing.assert_close(conv(x, ei, w), conv(x, ei, mean), atol=1e-13, rtol=0)
    assert abs(conv(x, ei, w).norm() / x.norm() - 1) < 1e-12
