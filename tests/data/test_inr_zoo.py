import json

import pytest
import torch

from graphspace.data import DWSNetsINR, INRZoo, NFNSiren, NFNSirenZoo, WeightStatistics
from graphspace.graphs import ACTIVATIONS


def _dwsnets_layout(raw, labels, foreign_prefix="/home/someone/dataset"):
    """DWSNets MNIST layout: mnist-inrs/mnist_png_<split>_<label>_<idx>/checkpoints/
    model_final.pth and a splits JSON with absolute paths of another machine."""
    torch.manual_seed(0)
    spec = {s: {"path": [], "label": []} for s in ("train", "val", "test")}
    models = {}
    for i, lab in enumerate(labels):
        split = ("train", "val", "test")[i % 3]
        tag = "training" if split != "test" else "testing"
        rel = f"mnist-inrs/mnist_png_{tag}_{lab}_{100 + i}/checkpoints/model_final.pth"
        m = DWSNetsINR()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        torch.save(m.state_dict(), raw / rel)
        spec[split]["path"].append(f"{foreign_prefix}/{rel}")
        spec[split]["label"].append(str(lab))  # DWSNets writes labels as strings
        models[rel] = m
    (raw / "mnist_splits.json").write_text(json.dumps(spec))
    return spec, models


def test_dwsnets_layout(tmp_path):
    raw = tmp_path / "raw"
    spec, models = _dwsnets_layout(raw, [3, 1, 4, 1, 5, 9, 2, 6, 5])
    ds = INRZoo(str(tmp_path), "train", splits_file="mnist_splits.json")
    assert len(ds) == 3
    assert ds.y.tolist() == [int(v) for v in spec["train"]["label"]]
    coords = torch.rand(50, 2) * 2 - 1
    for i in range(len(ds)):
        rel = spec["train"]["path"][i].split("/dataset/", 1)[1]
        g = ds[i]
        ref = models[rel]
        for k, v in ref.state_dict().items():
            assert torch.equal(g.to_state_dict()[k], v), k
        assert torch.allclose(ds.model(i)(coords), ref(coords))
        assert ACTIVATIONS.index("sin") in g.node_act.tolist()
        assert g.y.dtype == torch.long and g.y.shape == (1,)
    assert len(INRZoo(str(tmp_path), "test", splits_file="mnist_splits.json")) == 3


def test_labels_from_file_or_path(tmp_path):
    raw = tmp_path / "raw"
    (raw / "fmnist_inrs" / "train").mkdir(parents=True)
    m = DWSNetsINR()
    torch.save({**m.state_dict(), "label": 7}, raw / "fmnist_inrs/train/model_938.pth")
    d = raw / "mnist-inrs/mnist_png_training_4_12/checkpoints"
    d.mkdir(parents=True)
    torch.save(m.state_dict(), d / "model_final.pth")
    spec = {"train": {"path": ["fmnist_inrs/train/model_938.pth",
                                "mnist-inrs/mnist_png_training_4_12/checkpoints/model_final.pth"]},
            "val": {"path": []}, "test": {"path": []}}
    (raw / "splits.json").write_text(json.dumps(spec))
    ds = INRZoo(str(tmp_path), "train")
    assert ds.y.tolist() == [7, 4]


def test_published_statistics_are_transposed_to_pytorch_layout(tmp_path):
    raw = tmp_path / "raw"
    _dwsnets_layout(raw, [0, 1, 2])
    ds = INRZoo(str(tmp_path), "train", splits_file="mnist_splits.json")
    dims = (2, 32, 32, 1)
    stats = {"weights": {"mean": [], "std": []}, "biases": {"mean": [], "std": []}}
    for a, b in zip(dims[:-1], dims[1:]):
        stats["weights"]["mean"].append(torch.arange(a * b).float().view(a, b, 1))
        stats["weights"]["std"].append(torch.ones(a, b, 1))
        stats["biases"]["mean"].append(torch.arange(b).float().view(b, 1))
        stats["biases"]["std"].append(torch.ones(b, 1))
    torch.save(stats, raw / "mnist_statistics.pth")
    ws = ds.published_statistics(raw / "mnist_statistics.pth")
    assert isinstance(ws, WeightStatistics)
    assert ws.mean["seq.0.weight"].shape == (32, 2)
    assert torch.equal(ws.mean["seq.0.weight"], torch.arange(64).float().view(2, 32).t())
    assert ws.mean["seq.2.bias"].shape == (1,)


def _nfn_layout(raw, n=10):
    torch.manual_seed(1)
    nets = {}
    for idx in range(n):
        d = raw / f"randinit_smaller_{idx % 10}s"
        d.mkdir(parents=True, exist_ok=True)
        m = NFNSiren()
        torch.save(m.state_dict(), d / f"net{idx}.pth")
        nets[idx] = m
    aug = raw / "randinit_smaller_aug0_3s"  # NFN's augmented copies are not the dataset
    aug.mkdir()
    torch.save(NFNSiren().state_dict(), aug / "net99.pth")
    return nets


def test_nfn_siren_layout(tmp_path):
    nets = _nfn_layout(tmp_path / "raw")
    sizes = {s: len(NFNSirenZoo(str(tmp_path), s, split_points=(6, 8)))
             for s in ("train", "val", "test")}
    assert sizes == {"train": 6, "val": 2, "test": 2}
    ds = NFNSirenZoo(str(tmp_path), "val", split_points=(6, 8))
    assert ds.y.tolist() == [6, 7]
    g = ds[1]
    assert int(g.index) == 7
    for k, v in nets[7].state_dict().items():
        assert torch.equal(g.to_state_dict()[k], v)
    assert list(g.to_state_dict())[0] == "net.0.linear.weight"


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        INRZoo(str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="drive.google"):
        NFNSirenZoo(str(tmp_path / "none"))
