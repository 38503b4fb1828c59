"""MergeEvaluation: merging experiments as a Lightning test run."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest

from graphspace.merge.digits import DigitsDataModule
from graphspace.merge.task import MergeEvaluation

MLP = "graphspace.testing.models:MLP"
KW = {"sizes": [64, 32, 32, 10]}


def _run(tmp_path, method, **kw):
    ckpts = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    task = MergeEvaluation(MLP, ckpts, model_kwargs=KW, method=method, train_missing=True,
                           endpoint_epochs=8, endpoint_lr=1e-2, lambdas=5,
                           output=str(tmp_path / "merged.safetensors"),
                           plot=str(tmp_path / "curve.png"), **kw)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.test(task, datamodule=DigitsDataModule(batch_size=256), verbose=False)
    return task


def test_weight_matching_task_lowers_barrier_and_writes_outputs(tmp_path):
    task = _run(tmp_path, "weight_matching")
    r = task.results
    assert (tmp_path / "a.safetensors").exists() and (tmp_path / "merged.safetensors").exists()
    assert r["barrier/weight_matching"] < 0.5 * r["barrier/naive"]
    assert r["merged/loss"] < r["naive_average/loss"]
    assert all(math.isfinite(v) for v in r.values())
    table = task.results_table()
    assert "loss barrier, naive path" in table and "| merged |" in table


def test_endpoints_are_reused_not_retrained(tmp_path):
    _run(tmp_path, "average")
    before = (tmp_path / "a.safetensors").stat().st_mtime_ns
    task = _run(tmp_path, "ot_fusion", method_kwargs={"solver": "emd"})
    assert (tmp_path / "a.safetensors").stat().st_mtime_ns == before
    assert "barrier/ot_fusion" not in task.results  # fusion has no interpolation path
    assert task.results["merged/acc"] > 0.5


def test_missing_checkpoint_and_bad_method_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        MergeEvaluation(MLP, ["a", "b"], method="magic")
    with pytest.raises(ValueError, match="at least two"):
        MergeEvaluation(MLP, ["a"])
    task = MergeEvaluation(MLP, [str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                           model_kwargs=KW)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(FileNotFoundError, match="train_missing"):
        trainer.test(task, datamodule=DigitsDataModule())
