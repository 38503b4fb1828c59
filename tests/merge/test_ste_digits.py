"""Digits experiments (short versions of benchmarks/merge_digits.py) and the STE module."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from graphspace.io import save_state_dict
from graphspace.merge import (
    interpolation_curve,
    permuted_copy,
    ste_matching,
    weight_matching,
)
from graphspace.merge.digits import DigitsDataModule, load_digits_tensors
from graphspace.merge.ste import STEMatching

YAML = Path(__file__).resolve().parents[2] / "experiments" / "merge_ste_digits.yaml"


def test_digits_data_module_splits():
    x, y = load_digits_tensors()
    assert x.shape == (1797, 64) and 0 <= float(x.min()) and float(x.max()) <= 1
    dm = DigitsDataModule(batch_size=64, flat=False)
    dm.setup()
    n = len(dm.train_set) + len(dm.val_set) + len(dm.test_set)
    assert n == 1797
    xb, yb = next(iter(dm.test_dataloader()))
    assert xb.shape == (64, 1, 8, 8) and yb.dtype == torch.long
    # disjoint splits
    tr = {tuple(v.tolist()) for v in dm.train_set.tensors[0].view(-1, 64)}
    te = [tuple(v.tolist()) for v in dm.test_set.tensors[0].view(-1, 64)]
    assert sum(t in tr for t in te) < 0.05 * len(te)  # digits has a few duplicate images


def test_weight_matching_midpoint_has_far_lower_barrier(mlp_pair, digits):
    a, b = mlp_pair
    test = digits.test_dataloader()
    res = weight_matching(a, b)
    naive = interpolation_curve(a, b, test, 5)
    matched = interpolation_curve(a, permuted_copy(b, res.perms), test, 5)
    assert naive.barrier > 0.3
    assert matched.barrier < 0.3 * naive.barrier, (naive.barrier, matched.barrier)
    assert matched.midpoint_accuracy > naive.midpoint_accuracy + 0.1


def test_ste_matching_learns_a_good_permutation(mlp_pair, digits):
    a, b = mlp_pair
    test = digits.test_dataloader()
    res = ste_matching(a, b, digits.train_dataloader(), epochs=2,
                      val_loader=digits.val_dataloader())
    assert res.passes == 2 * len(digits.train_dataloader())
    naive = interpolation_curve(a, b, test, [0.5]).midpoint_loss
    ste = interpolation_curve(a, permuted_copy(b, res.perms), test, [0.5]).midpoint_loss
    assert ste < 0.5 * naive


def test_ste_gradient_flows_straight_through():
    torch.manual_seed(0)
    from graphspace.testing.models import MLP

    a, b = MLP((8, 16, 4)), MLP((8, 16, 4))
    mod = STEMatching(model_a=a, model_b=b)
    batch = (torch.randn(5, 8), torch.randint(0, 4, (5,)))
    loss = mod.training_step(batch, 0)
    loss.backward()
    grads = {k: p.grad for k, p in mod.tilde.items()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    # the forward value is the projected midpoint (A + pi(B)) / 2, not (A + tilde) / 2
    perms = mod.permutations()
    mid = mod.midpoint_state(perms)
    ref = permuted_copy(b, perms).state_dict()
    assert torch.allclose(mid["net.0.weight"], 0.5 * (a.net[0].weight + ref["net.0.weight"]))
    assert not any(p.requires_grad for p in mod.model_a.parameters())


@pytest.fixture
def endpoint_files(mlp_pair, tmp_path):
    paths = []
    for i, m in enumerate(mlp_pair):
        p = tmp_path / f"mlp_seed{i}.safetensors"
        save_state_dict(m.state_dict(), p)
        paths.append(str(p))
    return paths


def test_yaml_config_instantiates_and_fits(endpoint_files, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["graphspace"])
    out = tmp_path / "merged.safetensors"
    cli = LightningCLI(
        pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True,
        subclass_mode_data=True, run=False, save_config_callback=None,
        args=["--config", str(YAML),
              "--model.init_args.checkpoint_a", endpoint_files[0],
              "--model.init_args.checkpoint_b", endpoint_files[1],
              "--model.init_args.output", str(out),
              "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
              "--trainer.limit_val_batches", "1", "--trainer.accelerator", "cpu",
              "--trainer.default_root_dir", str(tmp_path)],
    )
    assert isinstance(cli.model, STEMatching)
    assert isinstance(cli.datamodule, DigitsDataModule)
    assert cli.model.hparams.model_kwargs == {"sizes": [64, 128, 128, 10]}
    cli.trainer.fit(cli.model, cli.datamodule)
    assert out.exists()
    cli.trainer.test(cli.model, cli.datamodule, verbose=False)
    table = cli.model.results_table()
    assert "STE midpoint" in table and "naive midpoint" in table
    assert cli.model.best["val"][1] is not None


def test_ste_predict_writes_per_sample_predictions(tmp_path):
    import lightning.pytorch as pl
    from torch.func import functional_call

    from graphspace.testing.models import MLP

    torch.manual_seed(0)
    a, b = MLP((8, 16, 4)), MLP((8, 16, 4))
    mod = STEMatching(model_a=a, model_b=b)
    batches = [(torch.randn(5, 8), torch.randint(0, 4, (5,))) for _ in range(2)]
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*(torch.cat(t) for t in zip(*batches))), batch_size=5)
    got = trainer.predict(mod, loader)
    x = torch.cat([bt[0] for bt in batches])
    y = torch.cat([bt[1] for bt in batches])
    mid = functional_call(mod.model_a, mod.midpoint_state(mod.permutations()), (x,))
    assert torch.equal(torch.cat([g["target"] for g in got]), y)
    assert torch.equal(torch.cat([g["pred_ste_midpoint"] for g in got]), mid.argmax(-1))
    assert torch.equal(torch.cat([g["pred_a"] for g in got]), a(x).argmax(-1))
    path = mod.predictions_path
    assert path is not None and path.exists() and path.parent == tmp_path
