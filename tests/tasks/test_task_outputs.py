"""Run outputs of the tasks: prediction files, figures, predict_step of every task."""

from __future__ import annotations

import csv
import math
import sys

import lightning.pytorch as pl
import pytest
import torch
from torch_geometric.loader import DataLoader

from graphspace.graphs import ParameterGraph, analyze
from graphspace.nn.models.graph_metanetwork import GraphMetaNetwork
from graphspace.tasks.features import AttachWeightFeatures
from graphspace.tasks.generalization import GeneralizationPredictor
from graphspace.tasks.outputs import PredictionsFile, pyplot, write_table
from graphspace.testing.models import MLP

PNG = b"\x89PNG\r\n\x1a\n"


def _read_csv(path) -> dict[str, list[str]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return {name: [r[i] for r in rows[1:]] for i, name in enumerate(rows[0])}


def _trainer(tmp_path, **kw):
    return pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, **kw)


# -- prediction tables ------------------------------------------------------------------------
def test_write_table_csv_round_trips_exactly(tmp_path):
    torch.manual_seed(0)
    p = torch.randn(5, 3)
    lab = torch.tensor([0, 2, 1, 1, 0])
    path = write_table({"label": lab, "prob": p}, tmp_path / "t", fmt="csv")
    assert path.name == "t.csv"
    cols = _read_csv(path)
    assert list(cols) == ["label", "prob_0", "prob_1", "prob_2"]
    assert [int(v) for v in cols["label"]] == lab.tolist()
    for k in range(3):  # float32 values come back bit for bit
        back = torch.tensor([float(v) for v in cols[f"prob_{k}"]], dtype=torch.float32)
        assert torch.equal(back, p[:, k])
    with pytest.raises(ValueError, match="'b' has 4 rows, expected 5"):
        write_table({"a": lab, "b": torch.zeros(4)}, tmp_path / "bad", fmt="csv")
    with pytest.raises(ValueError, match="must be \\[N\\] or \\[N, K\\]"):
        write_table({"a": torch.zeros(2, 2, 2)}, tmp_path / "bad", fmt="csv")
    with pytest.raises(ValueError, match="fmt must be"):
        write_table({"a": lab}, tmp_path / "bad", fmt="xlsx")
    assert not list(tmp_path.glob("bad*"))


def test_write_table_parquet_when_pyarrow(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    p = torch.randn(4, 2)
    path = write_table({"z": p}, tmp_path / "t")
    assert path.suffix == ".parquet"
    t = pq.read_table(path).to_pydict()
    assert torch.equal(torch.tensor(t["z_1"], dtype=torch.float32), p[:, 1])


def test_pyplot_missing_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert pyplot("the figure") is None
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0 and "matplotlib is not installed" in out and "pip install" in out


def test_mixin_writes_rows_in_order(tmp_path):
    class Tiny(PredictionsFile, pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def predict_step(self, batch, batch_idx, dataloader_idx=0):
            return {"out": self.lin(batch), "first": batch[:, 0]}

    torch.manual_seed(0)
    x = torch.randn(7, 3)
    m = Tiny()
    got = _trainer(tmp_path).predict(m, torch.utils.data.DataLoader(x, batch_size=3))
    assert m.predictions_path is not None and m.predictions_path.parent == tmp_path
    cols = _read_csv(m.predictions_path) if m.predictions_path.suffix == ".csv" else None
    if cols is None:
        pytest.skip("pyarrow installed: covered by the parquet test")
    assert [int(v) for v in cols["index"]] == list(range(7))
    out = torch.cat([g["out"] for g in got])
    for k in range(2):
        assert torch.equal(torch.tensor([float(v) for v in cols[f"out_{k}"]]), out[:, k])
    assert torch.equal(torch.tensor([float(v) for v in cols["first"]]), x[:, 0])


# -- figures ----------------------------------------------------------------------------------
def test_prediction_scatter_and_curves_hold_the_data():
    plt = pyplot()
    if plt is None:
        pytest.skip("needs matplotlib")
    from graphspace.tasks.plots import learning_curves, prediction_scatter

    y = torch.tensor([0.1, 0.5, 0.9])
    preds = {"gmn": torch.tensor([0.2, 0.4, 0.8]), "statnn": torch.tensor([0.9, 0.1, 0.5])}
    fig = prediction_scatter(plt, preds, y, {"gmn": 1.0, "statnn": -0.333})
    for ax, (name, p) in zip(fig.axes, preds.items()):
        off = torch.tensor(ax.collections[0].get_offsets().data)
        assert torch.allclose(off, torch.stack([y, p], 1).double(), atol=1e-7)
        assert name in ax.get_title() and "τ" in ax.get_title()
    assert "1.000" in fig.axes[0].get_title() and "-0.333" in fig.axes[1].get_title()
    with pytest.raises(ValueError, match="expected 3 values"):
        prediction_scatter(plt, {"gmn": torch.zeros(2)}, y, {})
    plt.close(fig)
    hist = {"train/loss_gmn": [1.0, 0.5], "val/loss_gmn": [1.2, 0.7], "val/tau_gmn": [0.1, 0.4]}
    fig = learning_curves(plt, hist, [0, 1])
    lines = {ln.get_label(): list(ln.get_ydata()) for ax in fig.axes for ln in ax.lines}
    assert lines == hist
    plt.close(fig)


# -- generalization prediction ----------------------------------------------------------------
def _zoo(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = MLP((6, 8, 3))
    a = analyze(model)
    feat = AttachWeightFeatures(max_tensors=4)
    graphs = []
    for _ in range(n):
        scale = 0.2 + 1.5 * torch.rand((), generator=g)
        sd = {k: torch.randn(v.shape, generator=g) * scale for k, v in model.state_dict().items()}
        gr = ParameterGraph.from_state_dict(sd, a)
        gr.y = torch.tensor([float(scale)])
        graphs.append(feat(gr))
    return graphs


class _Data(pl.LightningDataModule):
    def __init__(self, graphs, n_train=16, n_val=20):
        super().__init__()
        self.graphs, self.n_train, self.n_val = graphs, n_train, n_val

    def train_dataloader(self):
        return DataLoader(self.graphs[:self.n_train], batch_size=8, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.graphs[self.n_train:self.n_val], batch_size=8)

    def test_dataloader(self):
        return DataLoader(self.graphs[self.n_val:], batch_size=3)


def test_generalization_plots_and_predictions(tmp_path):
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    module = GeneralizationPredictor(GraphMetaNetwork(1, hidden_channels=8, num_layers=1),
                                     baselines=("statnn", "norms"), lr=3e-3)
    dm = _Data(_zoo(14), 8, 10)
    trainer = _trainer(tmp_path, max_epochs=2, num_sanity_val_steps=0)
    trainer.fit(module, dm)
    # learning curves: one value per epoch; the last val loss is what Lightning logged
    h = module.history
    assert h["epoch"] == [0.0, 1.0]
    assert math.isclose(h["val/loss_gmn"][-1], float(trainer.callback_metrics["val/loss_gmn"]),
                        rel_tol=1e-5)
    assert h["val/tau_statnn"][-1] == pytest.approx(
        float(trainer.callback_metrics["val/tau_statnn"]), abs=1e-6)
    assert (tmp_path / "learning_curves.png").read_bytes()[:8] == PNG
    fig = module.plot_learning_curves()
    lines = {ln.get_label(): list(ln.get_ydata()) for ax in fig.axes for ln in ax.lines}
    assert lines["train/loss_norms"] == h["train/loss_norms"]
    assert lines["val/tau_gmn"] == h["val/tau_gmn"]

    trainer.test(module, dm, verbose=False)
    assert (tmp_path / "predictions_test.png").read_bytes()[:8] == PNG
    module.eval()
    with torch.no_grad():
        ref = [module(b) for b in dm.test_dataloader()]
    y = torch.cat([b.y for b in dm.test_dataloader()])
    fig = module.plot_predictions()
    for ax, name in zip(fig.axes, module.names):
        want = torch.cat([r[name] for r in ref])
        assert torch.equal(module.test_predictions[name], want)
        off = torch.tensor(ax.collections[0].get_offsets().data)
        assert torch.allclose(off, torch.stack([y, want], 1).double(), atol=1e-6)
        assert f"{module.results['test'][f'tau_{name}']:.3f}" in ax.get_title()

    # predict: one row per network, equal to the returned outputs
    got = trainer.predict(module, dm.test_dataloader())
    path = module.predictions_path
    assert path is not None and path.parent == tmp_path
    if path.suffix == ".csv":
        cols = _read_csv(path)
        assert set(cols) == {"index", "gmn", "statnn", "norms", "target"}
        for name in ("gmn", "statnn", "norms", "target"):
            want = torch.cat([g[name] for g in got])
            assert torch.equal(torch.tensor([float(v) for v in cols[name]]), want)
        assert torch.equal(torch.tensor([float(v) for v in cols["gmn"]]),
                           module.test_predictions["gmn"])  # best weights, as in test


def test_inr_confusion_matrix_and_predictions(tmp_path):
    pytest.importorskip("matplotlib")
    from graphspace.tasks.inr import INRClassifier
    from graphspace.testing.models import Siren

    torch.manual_seed(0)
    model = Siren(hidden=8, layers=2)
    a = analyze(model)
    graphs = []
    for i in range(15):
        sd = {k: torch.randn(v.shape) * 0.1 + 0.3 * (i % 3) for k, v in model.state_dict().items()}
        g = ParameterGraph.from_state_dict(sd, a)
        g.y = torch.tensor([i % 3])
        graphs.append(g)
    clf = INRClassifier(3, GraphMetaNetwork(3, hidden_channels=8, num_layers=1), lr=1e-2)
    dm = _Data(graphs, 12, 12)
    trainer = _trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(clf, dm)
    trainer.test(clf, dm, verbose=False)
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:8] == PNG
    clf.eval()
    with torch.no_grad():
        pred = torch.cat([clf(b).argmax(-1) for b in dm.test_dataloader()])
    y = torch.cat([b.y for b in dm.test_dataloader()])
    want = torch.zeros(3, 3, dtype=torch.long)
    for t, p in zip(y.tolist(), pred.tolist()):
        want[t, p] += 1
    assert torch.equal(clf.test_confusion, want)
    fig = clf.plot_confusion()
    assert torch.equal(torch.as_tensor(fig.axes[0].images[0].get_array()), want)
    (tmp_path / "confusion_matrix.png").unlink()
    clf.hparams.plots = False  # negative control: no figure, same counts
    trainer.test(clf, dm, verbose=False)
    assert not (tmp_path / "confusion_matrix.png").exists()
    assert torch.equal(clf.test_confusion, want)

    got = trainer.predict(clf, dm.test_dataloader())
    assert torch.equal(torch.cat([g["label"] for g in got]), pred)
    probs = torch.cat([g["prob"] for g in got])
    assert torch.allclose(probs.sum(-1), torch.ones(len(y)))
    if clf.predictions_path.suffix == ".csv":
        cols = _read_csv(clf.predictions_path)
        assert [int(v) for v in cols["label"]] == pred.tolist()
        assert [int(v) for v in cols["target"]] == y.tolist()
        assert torch.equal(torch.tensor([float(v) for v in cols["prob_2"]]), probs[:, 2])


def test_contrastive_predict_writes_embeddings(tmp_path):
    from graphspace.data.sbm import SBMDataModule
    from graphspace.tasks.contrastive import GraphContrastive

    torch.manual_seed(0)
    dm = SBMDataModule(num_blocks=2, block_size=6, num_features=4)
    model = GraphContrastive(in_channels=4, hidden_channels=5, proj_channels=5)
    got = _trainer(tmp_path).predict(model, datamodule=dm)  # falls back to the test loader
    batch = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        z = model(batch)
    assert torch.equal(got[0]["z"], z) and torch.equal(got[0]["y"], batch.y)
    if model.predictions_path.suffix == ".csv":
        cols = _read_csv(model.predictions_path)
        assert len(cols["index"]) == batch.num_nodes
        assert torch.equal(torch.tensor([float(v) for v in cols["z_4"]]), z[:, 4])
