"""The experiment configs under ``experiments/`` and the main job.

Every YAML parses with ``--print_config`` (default suite: no data is generated). The main job
end to end and a 2-process DDP run (gloo, CPU) are ``slow``-marked.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "experiments").glob("*.yaml"))


def _cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "graphspace.cli", *args], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_experiments_exist():
    names = {c.stem for c in CONFIGS}
    for want in ("generalization_digits", "generalization_hetero", "generalization_smallcnnzoo",
                 "inr_digits", "contrastive_sbm", "contrastive_zoo", "merge_ste_digits"):
        assert want in names


def _print_config(capsys, *args: str) -> tuple[int, str, str]:
    """``graphspace <args> --print_config`` in this process (LightningCLI exits after
    printing)."""
    from graphspace.tasks.cli import main

    code = 0
    argv, sys.argv = sys.argv, ["graphspace"]
    try:
        main([*args, "--print_config"])
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_parses(config, capsys):
    sub = "test" if config.stem.startswith(("merge_wm", "merge_am", "merge_ot")) else "fit"
    code, out, err = _print_config(capsys, sub, "--config", str(config))
    assert code == 0, err[-3000:]
    printed = yaml.safe_load(out)
    original = yaml.safe_load(config.read_text())
    # the printed config is the fully resolved one: same model and data classes
    assert printed["model"]["class_path"] == original["model"]["class_path"]
    assert printed["data"]["class_path"] == original["data"]["class_path"]


def test_bad_config_key_is_refused(tmp_path, capsys):
    cfg = yaml.safe_load((ROOT / "experiments" / "generalization_digits.yaml").read_text())
    cfg["model"]["init_args"]["no_such_option"] = 1
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(cfg))
    code, _, err = _print_config(capsys, "fit", "--config", str(p))
    assert code != 0
    assert "no_such_option" in err


def _table(text: str) -> dict[str, tuple[float, float]]:
    rows = re.findall(r"^\| (\w+) \| (-?[\d.]+|nan) \| (-?[\d.]+|nan) \|", text, flags=re.M)
    return {n: (float(t), float(r)) for n, t, r in rows}


@pytest.mark.slow
def test_main_job_end_to_end(tmp_path):
    """The README's main job on a fresh directory: generates the zoo, trains, reports."""
    res = _cli("fit", "--config", "experiments/generalization_digits.yaml",
               "--data.init_args.root", str(tmp_path / "zoo"),
               "--trainer.default_root_dir", str(tmp_path / "out"),
               "--trainer.enable_progress_bar", "false", timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    results = list((tmp_path / "out").rglob("results.md"))
    assert len(results) == 1
    table = _table(results[0].read_text())
    assert {"gmn", "statnn"} <= set(table)
    assert table["gmn"][0] > 0.5  # Kendall tau on the test split


TINY = {
    "seed_everything": 0,
    "model": {"class_path": "graphspace.tasks.generalization.GeneralizationPredictor",
              "init_args": {"model": {
                  "class_path": "graphspace.nn.models.graph_metanetwork.GraphMetaNetwork",
                  "init_args": {"out_channels": 1, "hidden_channels": 16, "num_layers": 2,
                                "edge_in": 9}},
                  "baselines": ["statnn"], "lr": 0.003, "select_best": False}},
    "data": {"class_path": "graphspace.data.SmallCNNZooDataModule",
             "init_args": {"kernel": "channel", "epochs": "all", "batch_size": 16,
                           "transforms": [{"class_path":
                                           "graphspace.tasks.features.AttachWeightFeatures",
                                           "init_args": {"max_tensors": 8}}]}},
    "trainer": {"max_epochs": 8, "accelerator": "cpu", "enable_progress_bar": False,
                "enable_checkpointing": False, "logger": False,
                "enable_model_summary": False},
}


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    """``--trainer.strategy ddp --trainer.devices 2`` (gloo on CPU) gives the metrics of one
    process within tolerance (global batch 16 in both: 8 per process under DDP)."""
    from graphspace.data.generators import generate_cnn_zoo

    zoo = tmp_path / "zoo"
    generate_cnn_zoo(zoo, num_models=24, seed=0, checkpoints=(0, 1, 3), progress=False)
    cfg = tmp_path / "tiny.yaml"
    TINY["data"]["init_args"]["root"] = str(zoo)
    cfg.write_text(yaml.safe_dump(TINY))
    tables = {}
    for name, extra in {"one": ["--trainer.devices", "1"],
                        "ddp": ["--trainer.devices", "2", "--trainer.strategy", "ddp",
                                "--data.init_args.batch_size", "8"]}.items():
        res = _cli("fit", "--config", str(cfg), "--trainer.default_root_dir",
                   str(tmp_path / name), *extra, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        tables[name] = _table(res.stdout)
    assert set(tables["one"]) == set(tables["ddp"]) == {"gmn", "statnn"}
    for n in ("gmn", "statnn"):
        assert abs(tables["one"][n][0] - tables["ddp"][n][0]) < 0.15, tables
