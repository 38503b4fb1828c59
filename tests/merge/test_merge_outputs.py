"""Merging outputs: the interpolation plot, MergeEvaluation.predict, the non-convergence warning,
BatchNorm reset through torch's update_bn."""

from __future__ import annotations

import csv
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from graphspace.merge.interpolation import InterpolationCurve, interpolation_figure, plot_curves
from graphspace.merge.repair import reset_bn_stats
from graphspace.merge.weight_matching import MatchingNotConvergedWarning, weight_matching
from graphspace.testing.models import MLP


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_interpolation_figure_data_and_legend_outside(tmp_path, capsys):
    plt = pytest.importorskip("matplotlib.pyplot")
    naive = InterpolationCurve([0.0, 0.5, 1.0], [0.1, 2.0, 0.1], [0.9, 0.3, 0.9])
    wm = InterpolationCurve([0.0, 0.5, 1.0], [0.1, 0.2, 0.1], [0.9, 0.88, 0.9])
    fig = interpolation_figure(plt, {"naive": naive, "weight_matching": wm})
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    loss_ax, acc_ax = fig.axes
    assert [list(ln.get_ydata()) for ln in loss_ax.lines] == [naive.loss, wm.loss]
    assert [list(ln.get_ydata()) for ln in acc_ax.lines] == [naive.accuracy, wm.accuracy]
    assert "barrier 1.900" in loss_ax.lines[0].get_label()
    for ax in (loss_ax, acc_ax):  # the legend never covers the plotting area (or a curve)
        leg = ax.get_legend()
        assert leg is not None
        assert not _overlap(leg.get_window_extent(renderer), ax.get_window_extent(renderer))
    plt.close(fig)
    out = plot_curves({"naive": naive}, tmp_path / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"interpolation plot -> {out}" in capsys.readouterr().out


def test_merge_predict_writes_per_sample_predictions(tmp_path):
    from graphspace.merge.digits import DigitsDataModule
    from graphspace.merge.task import MergeEvaluation

    ckpts = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    task = MergeEvaluation("graphspace.testing.models:MLP", ckpts,
                           model_kwargs={"sizes": [64, 16, 10]}, method="weight_matching",
                           train_missing=True, endpoint_epochs=2, endpoint_lr=1e-2)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    dm = DigitsDataModule(batch_size=256)
    got = trainer.predict(task, datamodule=dm)  # DigitsDataModule: its test loader
    x = torch.cat([b[0] for b in dm.test_dataloader()])
    y = torch.cat([b[1] for b in dm.test_dataloader()])
    with torch.no_grad():
        want = task.merged(x)
    assert torch.equal(torch.cat([g["target"] for g in got]), y)
    assert torch.equal(torch.cat([g["pred_merged"] for g in got]), want.argmax(-1))
    assert torch.allclose(torch.cat([g["loss_merged"] for g in got]),
                          nn.functional.cross_entropy(want, y, reduction="none"), atol=1e-6)
    path = task.predictions_path
    assert path is not None and path.parent == tmp_path
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == len(y)
        assert [int(r["pred_endpoint_1"]) for r in rows] == \
            torch.cat([g["pred_endpoint_1"] for g in got]).tolist()
        assert {"pred_naive_average", "loss_endpoint_0"} <= set(rows[0])


def test_non_converged_matching_warns_once_with_passes_and_gain():
    torch.manual_seed(0)
    a, b = MLP((8, 32, 32, 32, 4)), MLP((8, 32, 32, 32, 4))
    with pytest.warns(MatchingNotConvergedWarning) as rec:
        capped = weight_matching(a, b, max_passes=2)
    assert not capped.converged and len(rec) == 1
    msg = str(rec[0].message)
    gain = capped.objective[1] - capped.objective[0]
    assert gain > 0 and "2 passes" in msg and "max_passes=2" in msg and f"{gain:.6g}" in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error", MatchingNotConvergedWarning)
        full = weight_matching(a, b)  # converges: no warning
    assert full.converged and full.passes > 1


def test_reset_bn_stats_keeps_dropout_off_and_the_input_untouched():
    torch.manual_seed(0)
    with_drop = nn.Sequential(nn.Linear(5, 7), nn.Dropout(0.5), nn.BatchNorm1d(7)).train()
    data = [torch.randn(9, 5) for _ in range(3)]
    before = {k: v.clone() for k, v in with_drop.state_dict().items()}
    out = reset_bn_stats(with_drop, data)
    h = torch.cat([with_drop[0](x) for x in data]).detach()
    # cumulative average over batches of the per-batch statistics, with dropout off
    means = torch.stack([with_drop[0](x).detach().mean(0) for x in data])
    vars_ = torch.stack([with_drop[0](x).detach().var(0, unbiased=True) for x in data])
    assert torch.allclose(out[2].running_mean, means.mean(0), atol=1e-6)
    assert torch.allclose(out[2].running_var, vars_.mean(0), atol=1e-6)
    assert not torch.allclose(out[2].running_mean, torch.zeros(7))  # negative control
    assert h.shape == (27, 7) and out.training and out[1].training
    assert all(torch.equal(before[k], v) for k, v in with_drop.state_dict().items())
