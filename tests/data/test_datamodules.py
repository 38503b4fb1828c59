import lightning.pytorch as pl
import pytest
import torch
from torch_geometric.transforms import BaseTransform

from graphspace.data import (
    CNNWildParkDataModule,
    INRZooDataModule,
    RandomNeuronPermutation,
    SmallCNNZooDataModule,
    compute_statistics,
)
from graphspace.nn.models.graph_metanetwork import GraphMetaNetwork

CNN_GEN = {"num_models": 8, "checkpoints": (0, 1), "chunk_size": 4, "workers": 1,
           "progress": False, "space": {"train_fraction": {"choice": [0.1]}}}


class Mark(BaseTransform):
    def forward(self, data):
        data.marked = torch.ones(1)
        return data


def _trainer(tmp_path):
    return pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path)


def test_small_cnn_zoo_datamodule(tmp_path):
    from graphspace.tasks.features import AttachWeightFeatures
    from graphspace.tasks.generalization import GeneralizationPredictor

    dm = SmallCNNZooDataModule(str(tmp_path / "zoo"), epochs="all", batch_size=4,
                               generate=True, generate_kwargs=CNN_GEN,
                               augmentations=[Mark(), RandomNeuronPermutation(seed=0)],
                               transforms=[AttachWeightFeatures(max_tensors=8)])
    dm.prepare_data()
    dm.setup("fit")
    # statistics come from the training split only
    train_stats = compute_statistics(dm.train_set)
    for k, v in train_stats.mean.items():
        assert torch.equal(dm.stats.mean[k], v)
    held_out = compute_statistics(list(dm.val_set.iter_state_dicts())
                                  + list(dm.test_set.iter_state_dicts()))
    assert any(not torch.allclose(held_out.std[k], dm.stats.std[k]) for k in held_out.std)
    tb = next(iter(dm.train_dataloader()))
    vb = next(iter(dm.val_dataloader()))
    assert "marked" in tb and "marked" not in vb  # augmentations on the training split only
    assert tb.stats.shape == (4, 8 * 7)  # features of the raw weights, before normalisation
    raw = dm.train_set.get(0)
    normed = dm.train_set.transform.transforms[-1](raw)
    assert not torch.allclose(normed.edge_attr, raw.edge_attr)
    model = GeneralizationPredictor(GraphMetaNetwork(1, hidden_channels=8, num_layers=1),
                                    baselines=("statnn",))
    _trainer(tmp_path).fit(model, dm)


def test_inr_zoo_datamodule(tmp_path):
    from graphspace.tasks.inr import INRClassifier

    dm = INRZooDataModule(str(tmp_path / "inr"), batch_size=4, generate=True,
                          generate_kwargs={"num_images": 16, "steps": 20, "workers": 1,
                                           "progress": False, "val_fraction": 0.25},
                          per_element_stats=True)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.stats.mean["seq.1.weight"].shape == (32, 32)
    batch = next(iter(dm.train_dataloader()))
    assert batch.y.dtype == torch.long
    _trainer(tmp_path).fit(INRClassifier(10, GraphMetaNetwork(10, hidden_channels=8,
                                                              num_layers=1)), dm)


def test_wild_park_datamodule_batches_heterogeneous_networks(tmp_path):
    dm = CNNWildParkDataModule(str(tmp_path / "park"), batch_size=8, generate=True,
                               generate_kwargs={"num_models": 4, "checkpoints": (0, 1),
                                                "workers": 1, "progress": False,
                                                "val_fraction": 0.25, "test_fraction": 0.25})
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.num_graphs == len(dm.train_set)
    out = GraphMetaNetwork(1, hidden_channels=8, num_layers=1)(batch)
    assert out.shape == (batch.num_graphs, 1)
    with pytest.raises(RuntimeError):
        CNNWildParkDataModule(str(tmp_path / "nothing")).train_dataloader()
