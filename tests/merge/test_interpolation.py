import sys

import pytest
import torch

from graphspace.merge import (
    InterpolationCurve,
    evaluate,
    interpolate_state,
    interpolation_curve,
    loss_barrier,
    plot_curves,
    reset_bn_stats,
)
from graphspace.testing.models import MLP, ResNet


def test_loss_barrier_formula():
    lams = [0.0, 0.25, 0.5, 0.75, 1.0]
    losses = [1.0, 2.0, 3.5, 2.0, 2.0]
    # linear baseline 1 + lambda; excess: 0, 0.75, 2.0, 0.25, 0 -> 2.0
    assert loss_barrier(lams, losses) == pytest.approx(2.0)
    assert InterpolationCurve(lams, losses).barrier == pytest.approx(2.0)
    assert loss_barrier([0.0, 0.5, 1.0], [1.0, 0.5, 1.0]) == pytest.approx(0.0)  # convex: 0
    with pytest.raises(ValueError, match="lambda = 0"):
        loss_barrier([0.5, 1.0], [1.0, 1.0])


def _data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g))
            for _ in range(3)]


def test_curve_endpoints_and_midpoint():
    torch.manual_seed(0)
    a, b = MLP((8, 16, 4)), MLP((8, 16, 4))
    data = _data()
    c = interpolation_curve(a, b, data, lambdas=[0.5])
    assert c.lambdas == [0.0, 0.5, 1.0]
    assert c.loss[0] == pytest.approx(evaluate(a, data)[0])
    assert c.loss[-1] == pytest.approx(evaluate(b, data)[0])
    mid = MLP((8, 16, 4))
    mid.load_state_dict({k: 0.5 * (a.state_dict()[k] + b.state_dict()[k])
                         for k in a.state_dict()})
    assert c.loss[1] == pytest.approx(evaluate(mid, data)[0])
    assert c.midpoint_accuracy == pytest.approx(evaluate(mid, data)[1])
    same = interpolation_curve(a, a, data, 3)
    assert same.barrier == pytest.approx(0.0, abs=1e-6)


def test_interpolate_state_keeps_integer_buffers():
    a, b = ResNet((4, 8), blocks=1), ResNet((4, 8), blocks=1)
    b.bn.num_batches_tracked.fill_(9)
    s = interpolate_state(a.state_dict(), b.state_dict(), 0.25)
    assert s["bn.num_batches_tracked"] == a.bn.num_batches_tracked
    assert torch.allclose(s["stem.weight"], 0.75 * a.stem.weight + 0.25 * b.stem.weight)


def test_curve_with_bn_reset():
    torch.manual_seed(0)
    a, b = ResNet((4, 8), blocks=1).eval(), ResNet((4, 8), blocks=1).eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 10, (8,), generator=g))]
    c = interpolation_curve(a, b, data, 2, reset_bn=True)
    assert c.loss[0] == pytest.approx(evaluate(reset_bn_stats(a, data), data)[0])
    assert c.loss[0] != pytest.approx(evaluate(a, data)[0])


def test_plot_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    c = InterpolationCurve([0.0, 1.0], [1.0, 1.0], [0.5, 0.5])
    assert plot_curves({"x": c}, tmp_path / "p.png") is None
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "p.png").exists()


def test_plot_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    c = InterpolationCurve([0.0, 0.5, 1.0], [1.0, 2.0, 1.0], [0.9, 0.5, 0.9])
    out = plot_curves({"naive": c}, tmp_path / "p.png")
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
