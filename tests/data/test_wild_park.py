import json

import pytest
import torch
from torch_geometric.loader import DataLoader

from graphspace.data import CNNWildPark, WildParkCNN
from graphspace.data.wild_park import reference_wild_park_forward
from graphspace.graphs import analyze, permutation_groups, permute_model
from graphspace.io import UntrustedCheckpointError

CFGS = [
    {"n_layers": 3, "n_classes": 10, "channels": [3, 16, 8, 32], "kernel_size": [3, 5, 7],
     "stride": [1, 1, 1], "padding": [1, 2, 3], "residual": [-1, -1, 0],
     "activation": ["relu", "gelu", "none"]},
    {"n_layers": 4, "n_classes": 10, "channels": [3, 8, 8, 4, 8], "kernel_size": [3, 3, 5, 3],
     "stride": [1, 1, 1, 1], "padding": [1, 1, 2, 1], "residual": [-1, -1, 0, 1],
     "activation": ["tanh", "sigmoid", "leaky_relu", "relu"]},
    {"n_layers": 2, "n_classes": 10, "channels": [3, 4, 16], "kernel_size": [7, 3],
     "stride": [1, 1], "padding": [3, 1], "residual": [-1, -1], "activation": ["relu", "relu"]},
]


@pytest.mark.parametrize("cfg", CFGS)
def test_module_matches_the_wild_park_forward(cfg):
    torch.manual_seed(0)
    m = WildParkCNN(cfg).double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    ref = reference_wild_park_forward(m.state_dict(), cfg, x)
    assert torch.allclose(m(x), ref, atol=1e-12)
    assert list(m.state_dict()) == [f"layers.{i}.{p}" for i in range(cfg["n_layers"])
                                    for p in ("weight", "bias")] + ["fc.weight", "fc.bias"]
    m2, _ = permute_model(m)
    assert torch.allclose(m2(x), m(x), atol=1e-12)


def test_partial_residual_sets_are_not_permuted():
    m = WildParkCNN(CFGS[0])  # layer 2 (32 ch) adds layer 0 (16 ch) on its first 16 channels
    a = analyze(m)
    groups = permutation_groups(a)
    assert "layers.1" in {g.name for g in groups}
    # the 16 added channels permute among themselves (with layer 0), the others apart
    l2 = next(s for s in a.sets if s.name == "layers.2").nodes
    for g in groups:
        for mm in g.members:
            inside = torch.isin(mm, l2)
            if inside.any():
                pos = torch.searchsorted(l2, mm[inside])
                assert bool((pos < 16).all()) or bool((pos >= 16).all())
    m2 = WildParkCNN(CFGS[2])  # no residual: every hidden layer permutable
    assert {g.name for g in permutation_groups(m2)} == {"layers.0", "layers.1"}


def _park(raw, trusted_obj=None):
    torch.manual_seed(0)
    spec = {s: {"path": [], "score": [], "step": []} for s in ("train", "val", "test")}
    models = {}
    for i, cfg in enumerate(CFGS):
        split = ("train", "train", "test")[i]
        for step in (10, 20):
            m = WildParkCNN(cfg)
            rel = f"cifar10_zooV2/run_{i}/checkpoint_{step:06d}/checkpoint.pt"
            (raw / rel).parent.mkdir(parents=True, exist_ok=True)
            obj = {"model": m.state_dict(), "config": dict(cfg), "iteration": step,
                   "last_result": {"test/acc": 0.1 * i + step / 100}}
            if trusted_obj is not None:
                obj["config"]["extra"] = trusted_obj
            torch.save(obj, raw / rel)
            spec[split]["path"].append(rel)
            spec[split]["score"].append(0.1 * i + step / 100)
            spec[split]["step"].append(step)
            models[rel] = m
    (raw / "splits.json").write_text(json.dumps(spec))
    return spec, models


def test_loads_heterogeneous_checkpoints_lazily(tmp_path):
    spec, models = _park(tmp_path / "raw")
    ds = CNNWildPark(str(tmp_path), "train")
    assert len(ds) == 4 and len(ds.architectures) == 2
    assert ds.y.tolist() == pytest.approx(spec["train"]["score"])
    for i, p in enumerate(spec["train"]["path"]):
        g = ds[i]
        for k, v in models[p].state_dict().items():
            assert torch.equal(g.to_state_dict()[k], v)
        assert int(g.step) == spec["train"]["step"][i]
    batch = next(iter(DataLoader(ds, batch_size=4)))
    back = batch.to_data_list()
    assert torch.equal(back[3].to_state_dict()["fc.weight"],
                       models[spec["train"]["path"][3]].state_dict()["fc.weight"])
    final = CNNWildPark(str(tmp_path), "train", epochs="final")
    assert [int(final[i].step) for i in range(len(final))] == [20, 20]
    mem = CNNWildPark(str(tmp_path), "train", in_memory=True)
    assert torch.equal(mem.flat(2), ds.flat(2))


class _Opaque:  # not allow-listed for weights_only loading
    pass


def test_untrusted_checkpoints_are_refused(tmp_path):
    _park(tmp_path / "raw", trusted_obj=_Opaque())
    with pytest.raises(UntrustedCheckpointError, match="trusted=True"):
        CNNWildPark(str(tmp_path), "train", in_memory=True)
    ds = CNNWildPark(str(tmp_path), "train", trusted=True, in_memory=True, force_reload=True)
    assert len(ds) == 4
