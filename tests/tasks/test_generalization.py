import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from scipy.stats import kendalltau
from torch_geometric.loader import DataLoader
from torchmetrics import KendallRankCorrCoef

from graphspace.graphs import ParameterGraph, analyze
from graphspace.nn.models.graph_metanetwork import GraphMetaNetwork
from graphspace.tasks.features import (
    AttachWeightFeatures,
    flat_features,
    norm_features,
    statnn_features,
)
from graphspace.tasks.generalization import GeneralizationPredictor
from graphspace.testing.models import MLP


def _zoo(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = MLP((6, 8, 3))
    a = analyze(model)
    graphs = []
    feat = AttachWeightFeatures(max_tensors=4, flat=True)
    for _ in range(n):
        scale = 0.2 + 1.5 * torch.rand((), generator=g)
        sd = {k: torch.randn(v.shape, generator=g) * scale for k, v in model.state_dict().items()}
        gr = ParameterGraph.from_state_dict(sd, a)
        gr.y = torch.tensor([float(scale)])
        graphs.append(feat(gr))
    return graphs


class ListData(pl.LightningDataModule):
    def __init__(self, graphs):
        super().__init__()
        self.graphs = graphs

    def train_dataloader(self):
        return DataLoader(self.graphs[:16], batch_size=8, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.graphs[16:20], batch_size=8)

    def test_dataloader(self):
        return DataLoader(self.graphs[20:], batch_size=8)


def test_kendall_metric_matches_scipy():
    rng = np.random.default_rng(0)
    p, t = rng.normal(size=50), rng.normal(size=50)
    m = KendallRankCorrCoef()
    m.update(torch.tensor(p), torch.tensor(t))
    assert abs(float(m.compute()) - kendalltau(p, t).statistic) < 1e-6


def test_features_shapes_and_values():
    model = MLP((6, 8, 3))
    sd = model.state_dict()
    s = statnn_features(sd, max_tensors=5).view(5, 7)
    w = sd["net.0.weight"].double().reshape(-1)
    assert torch.allclose(s[0, 0].double(), w.mean(), atol=1e-6)
    assert torch.allclose(s[0, 6].double(), w.max(), atol=1e-6)
    assert (s[4] == 0).all()  # padding beyond the 4 tensors
    n = norm_features(sd, max_tensors=4)
    assert torch.allclose(n[0].double(), torch.log(w.norm()), atol=1e-5)
    assert flat_features(sd).numel() == sum(v.numel() for v in sd.values())


def test_predictor_trains_and_reports_table(tmp_path):
    torch.manual_seed(0)
    graphs = _zoo()
    module = GeneralizationPredictor(GraphMetaNetwork(1, hidden_channels=16, num_layers=2),
                                     baselines=("statnn", "norms", "flat"), lr=3e-3)
    trainer = pl.Trainer(max_epochs=15, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=tmp_path,
                         enable_model_summary=False)
    dm = ListData(graphs)
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        module.train()
        y = batch.y
        before = {n: torch.nn.functional.mse_loss(p, y).item() for n, p in module(batch).items()}
    trainer.fit(module, dm)
    module.eval()
    with torch.no_grad():
        after = {n: torch.nn.functional.mse_loss(p, y).item() for n, p in module(batch).items()}
    assert after["gmn"] < before["gmn"] and after["statnn"] < before["statnn"]
    trainer.test(module, dm, verbose=False)
    table = module.results_table()
    assert "| gmn |" in table and "| statnn |" in table and "nan" not in table
    assert module.results["test"]["tau_norms"] > 0.3  # weight norms reveal the scale


def test_unknown_baseline_is_an_error():
    with pytest.raises(ValueError, match="baseline"):
        GeneralizationPredictor(baselines=("magic",))


def test_inr_classifier_learns_separable_classes(tmp_path):
    from graphspace.tasks.inr import INRClassifier
    from graphspace.testing.models import Siren

    torch.manual_seed(0)
    model = Siren(hidden=8, layers=2)
    a = analyze(model)
    graphs = []
    for i in range(24):
        label = i % 2
        sd = {k: torch.randn(v.shape) * 0.1 + (0.5 if label and k.endswith("bias") else 0.0)
              for k, v in model.state_dict().items()}
        g = ParameterGraph.from_state_dict(sd, a)
        g.y = torch.tensor([label])
        graphs.append(g)
    clf = INRClassifier(2, GraphMetaNetwork(2, hidden_channels=16, num_layers=1), lr=1e-2)
    trainer = pl.Trainer(max_epochs=30, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(clf, ListData(graphs))
    trainer.test(clf, ListData(graphs), verbose=False)
    assert float(trainer.callback_metrics["test/acc"]) == 1.0
    assert "| gmn | 1.0000 |" in clf.results_table()
