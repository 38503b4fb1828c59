import os
import random

import numpy as np
import pytest
import torch
from torch_geometric.loader import DataLoader
from zoo_files import keras_small_cnn_forward, make_small_cnn_zoo

from graphspace.data import SmallCNNZoo, read_layout, read_metrics, read_split_file
from graphspace.data.small_cnn_zoo import rows_to_state_dicts, small_cnn_layout
from graphspace.graphs import ACTIVATIONS, ParameterGraph
from graphspace.testing.models import SmallCNN


def test_layout_matches_the_published_column_ranges():
    # ranges of the published files (Unterthiner et al.'s colab: bias before kernel per layer)
    want = {"conv2d/bias": (0, 16), "conv2d/kernel": (16, 160), "conv2d_1/bias": (160, 176),
            "conv2d_1/kernel": (176, 2480), "conv2d_2/bias": (2480, 2496),
            "conv2d_2/kernel": (2496, 4800), "dense/bias": (4800, 4810),
            "dense/kernel": (4810, 4970)}
    got = {r.varname.split("/", 1)[1].split(":")[0]: (r.start, r.end) for r in small_cnn_layout()}
    assert got == want
    assert sum(p.numel() for p in SmallCNN().parameters()) == 4970


def test_hwio_conversion_matches_tensorflow_forward(small_cnn_zoo):
    root, rows, metrics, layout, _ = small_cnn_zoo
    x = np.random.default_rng(1).normal(size=(3, 28, 28, 1))
    sd = rows_to_state_dicts(rows[:2].astype(np.float64), layout)
    for i, act in enumerate(("relu", "tanh")):
        m = SmallCNN(act=torch.nn.ReLU if act == "relu" else torch.nn.Tanh).double()
        m.load_state_dict({k: v[i] for k, v in sd.items()})
        out = m(torch.from_numpy(x).permute(0, 3, 1, 2)).detach().numpy()
        ref = keras_small_cnn_forward(rows[i], layout, x, act)
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    # negative control: reading HWIO kernels as if they were OIHW changes the function
    k = layout[1]
    wrong = {kk: v[0].clone() for kk, v in sd.items()}
    wrong["conv1.weight"] = torch.from_numpy(rows[0, k.start:k.end].astype(np.float64)).reshape(
        16, 1, 3, 3)
    m = SmallCNN().double()
    m.load_state_dict(wrong)
    out = m(torch.from_numpy(x).permute(0, 3, 1, 2)).detach().numpy()
    assert not np.allclose(out, keras_small_cnn_forward(rows[0], layout, x, "relu"), atol=1e-3)


def test_read_raw_files(small_cnn_zoo):
    root, rows, metrics, layout, perm = small_cnn_zoo
    assert [r.varname for r in read_layout(root / "raw" / "layout.csv")] == \
        [r.varname for r in layout]
    m = read_metrics(root / "raw" / "metrics.csv.gz")
    assert m["modeldir"] == metrics["modeldir"]
    assert [float(v) for v in m["test_accuracy"]] == metrics["test_accuracy"]
    lines = read_split_file(root / "raw" / "split.csv")
    assert lines[0] == 0 and lines[1:] == list(perm)  # NFN keeps the header line as index 0
    assert read_split_file(root / "raw" / "split.csv", keep_leading_zero=False) == list(perm)


def _nfn_reference(metrics, split_lines, final_step=86):
    """NFN's ZooDataset protocol, written out independently."""
    final = [i for i in split_lines if metrics["step"][i] == final_step]
    tp = int(0.5 * len(final))
    trainval = list(range(tp))
    vp = int(0.8 * len(trainval))
    random.Random(0).shuffle(trainval)
    return {"train": [final[i] for i in trainval[:vp]], "val": [final[i] for i in trainval[vp:]],
            "test": final[tp:]}


def test_standard_protocol_reproduces_nfn_splits(tmp_path):
    root = tmp_path / "zoo"
    # steps (86, 1): row 0 is a final checkpoint, so NFN's leading 0 duplicates it
    rows, metrics, layout, perm = make_small_cnn_zoo(root / "raw", n_runs=23, steps=(86, 1))
    lines = [0] + list(perm)
    ref = _nfn_reference(metrics, lines)
    total = 0
    for split in ("train", "val", "test"):
        ds = SmallCNNZoo(str(root), split)
        assert ds.info("row") == ref[split]
        np.testing.assert_allclose(ds.y.numpy(), [metrics["test_accuracy"][r] for r in ref[split]],
                                   rtol=1e-6)
        assert all(int(ds[i].step) == 86 for i in range(len(ds)))
        total += len(ds)
    assert total == 24  # 23 final checkpoints + the duplicated row 0
    n = sum(len(SmallCNNZoo(str(root), s, keep_leading_zero=False)) for s in ("train", "val",
                                                                             "test"))
    assert n == 23


def test_graphs_hold_the_converted_weights(small_cnn_zoo):
    root, rows, metrics, layout, _ = small_cnn_zoo
    ds = SmallCNNZoo(str(root), "train")
    x = np.random.default_rng(2).normal(size=(2, 16, 16, 1)).astype(np.float32)
    for i in range(3):
        g = ds[i]
        r = ds.info("row")[i]
        act = metrics["config.activation"][r]
        sd = g.to_state_dict()
        want = rows_to_state_dicts(rows[r:r + 1], layout)
        for k, v in sd.items():
            assert torch.equal(v, want[k][0]), k
        assert ds.arch(i)["activation"] == act
        hidden = g.node_act[g.node_role == 0]
        assert set(hidden.tolist()) == {ACTIVATIONS.index(act)}
        out = ds.model(i)(torch.from_numpy(x).permute(0, 3, 1, 2)).detach().numpy()
        np.testing.assert_allclose(out, keras_small_cnn_forward(rows[r], layout, x, act),
                                   rtol=1e-4, atol=1e-5)
        # the fast graph builder agrees with ParameterGraph.from_state_dict
        ref = ParameterGraph.from_module(ds.model(i))
        for key in ("x", "edge_index", "edge_attr", "edge_pos", "node_act", "edge_type"):
            assert torch.equal(g[key], ref[key]), key
        assert g.y.shape == (1,) and float(g.y) == pytest.approx(metrics["test_accuracy"][r])


def test_other_epochs_keep_runs_in_one_split(small_cnn_zoo):
    root, rows, metrics, layout, _ = small_cnn_zoo
    seen = {}
    for split in ("train", "val", "test"):
        ds = SmallCNNZoo(str(root), split, epochs="all")
        for md in ds.info("modeldir"):
            assert seen.setdefault(md, split) == split
        assert {int(ds[i].step) for i in range(len(ds))} <= {0, 1, 86}
    assert len(seen) == 20
    ds1 = SmallCNNZoo(str(root), "train", epochs=1)
    assert {int(ds1[i].step) for i in range(len(ds1))} == {1}
    ds01 = SmallCNNZoo(str(root), "test", epochs=[0, 1])
    assert {int(ds01[i].step) for i in range(len(ds01))} == {0, 1}


def test_nonfinite_rows_are_dropped(tmp_path):
    root = tmp_path / "zoo"
    make_small_cnn_zoo(root / "raw", n_runs=10, steps=(0, 86), nan_rows=(1, 3))
    n = sum(len(SmallCNNZoo(str(root), s)) for s in ("train", "val", "test"))
    assert n == 10 - 2  # 10 final rows (row 0 is a step-0 row: no duplicate) minus 2 NaN
    for s in ("train", "val", "test"):
        ds = SmallCNNZoo(str(root), s)
        assert all(torch.isfinite(ds.flat(i)).all() for i in range(len(ds)))


def test_processed_cache_is_reused(small_cnn_zoo):
    root, *_ = small_cnn_zoo
    ds = SmallCNNZoo(str(root), "val")
    path = ds.processed_paths[0]
    mtime = os.path.getmtime(path)
    ds2 = SmallCNNZoo(str(root), "val")
    assert os.path.getmtime(ds2.processed_paths[0]) == mtime
    assert SmallCNNZoo(str(root), "val", epochs=1).processed_paths[0] != path
    # processed files hold tensors and plain values only
    torch.load(path, weights_only=True)


def test_batches_and_seeded_permutation_without_split_file(tmp_path):
    root = tmp_path / "zoo"
    make_small_cnn_zoo(root / "raw", n_runs=12, split=False)
    ds = SmallCNNZoo(str(root), "train", split_file=None, split_seed=3)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch.num_graphs == 4 and batch.y.shape == (4,)
    g = batch.to_data_list()[1]
    assert torch.equal(g.to_state_dict()["fc.weight"], ds[1].to_state_dict()["fc.weight"])
    other = SmallCNNZoo(str(root), "train", split_file=None, split_seed=4)
    assert ds.info("row") != other.info("row")


def test_missing_files_without_public_name_fail(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights.npy"):
        SmallCNNZoo(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="dataset"):
        SmallCNNZoo(str(tmp_path / "nothing"), dataset="imagenet")


@pytest.mark.dataset
def test_download_public_mnist_zoo(tmp_path):  # needs network and ~2 GB; deselected by default
    ds = SmallCNNZoo(str(tmp_path / "mnist"), "test", dataset="mnist")
    assert len(ds) > 10000
    assert 0 <= float(ds[0].y) <= 1
