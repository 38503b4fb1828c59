"""The one `graphspace` command: help, version, shared one-line errors, --debug, bundled
configs, class_path/init_args models, deprecated entry points, quiet Lightning runs."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from graphspace import __version__
from graphspace.cli import COMMANDS, LIGHTNING_VERBS, main
from graphspace.io import save_state_dict
from graphspace.testing.models import MLP

ROOT = Path(__file__).resolve().parents[2]
ALL = ["convert", "info", "merge", "zoo", "configs", "fit", "validate", "test", "predict"]


def _run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_error_line(err: str, cmd: str) -> str:
    lines = [s for s in err.splitlines() if s.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"graphspace {cmd}: error: "), lines[0]
    return lines[0]


def test_help_lists_every_subcommand_with_a_description(capsys):
    assert sorted(COMMANDS + tuple(LIGHTNING_VERBS)) == sorted(ALL)
    rc, out, _ = _run(capsys, "--help")
    assert rc == 0
    for name in ALL:
        line = next(s for s in out.splitlines() if s.strip().startswith(name + " "))
        assert len(line.split()) > 2, line  # the name and a description
    # no command: the same help, exit 0
    rc, out2, _ = _run(capsys)
    assert rc == 0 and out2 == out


def test_version(capsys):
    rc, out, _ = _run(capsys, "--version")
    assert rc == 0 and out.strip() == f"graphspace {__version__}"


def test_help_imports_no_torch():
    code = ("import sys; from graphspace.cli import main; rc = main(['--help']); "
            "import sys; bad = [m for m in ('torch', 'lightning', 'torch_geometric') "
            "if m in sys.modules]; sys.stderr.write(repr(bad)); sys.exit(rc or len(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "[]"


def test_merge_methods_listed_without_import_match_the_library():
    from graphspace.cli.merge import METHODS as listed
    from graphspace.merge.api import METHODS

    assert listed == METHODS


def test_unknown_command_and_bad_option_are_one_line(capsys):
    rc, _, err = _run(capsys, "frobnicate")
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "invalid choice: 'frobnicate'" in err
    rc, _, err = _run(capsys, "info", "--nope")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("graphspace info: error: ")


def test_debug_shows_the_traceback(capsys, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x02garbage")
    args = ["convert", str(bad), "--model", "graphspace.testing.models.MLP", "-o",
            str(tmp_path / "g.safetensors")]
    rc, _, err = _run(capsys, *args)
    assert rc == 1
    assert "bad.pt" in _one_error_line(err, "convert")
    assert "Traceback" not in err
    rc, _, err = _run(capsys, "--debug", *args)
    assert rc == 1 and "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("graphspace convert: error: ")
    assert not (tmp_path / "g.safetensors").exists()


def test_model_in_the_configs_syntax(capsys, tmp_path):
    a = MLP((2, 8, 2))
    save_state_dict(a.state_dict(), tmp_path / "a.safetensors")
    forms = [
        ["--model", "graphspace.testing.models.MLP", "--init-args", "{sizes: [2, 8, 2]}"],
        ["--model", '{"class_path": "graphspace.testing.models.MLP", '
                    '"init_args": {"sizes": [2, 8, 2]}}'],
        ["--model", "graphspace.testing.models:MLP", "--init-args", '{"sizes": [2, 8, 2]}'],
    ]
    yaml_file = tmp_path / "model.yaml"
    yaml_file.write_text("model:\n  class_path: graphspace.testing.models.MLP\n"
                         "  init_args:\n    sizes: [2, 8, 2]\n")
    forms.append(["--model", str(yaml_file)])
    outs = []
    for f in forms:
        rc, out, err = _run(capsys, "info", *f)
        assert rc == 0, err
        outs.append(out)
    assert all(o == outs[0] for o in outs) and "permutation group" in outs[0]
    # a wrong width is caught by the architecture check, naming the first tensor
    rc, _, err = _run(capsys, "convert", str(tmp_path / "a.safetensors"), "--model",
                      "graphspace.testing.models.MLP", "--init-args", "{sizes: [2, 4, 2]}",
                      "-o", str(tmp_path / "g.safetensors"))
    assert rc == 1 and "'net.0.weight'" in _one_error_line(err, "convert")


def test_model_kwargs_still_works_with_a_deprecation_warning(capsys):
    with pytest.warns(FutureWarning, match="--model-kwargs is deprecated"):
        rc, out, _ = _run(capsys, "info", "--model", "graphspace.testing.models:MLP",
                          "--model-kwargs", '{"sizes": [2, 8, 2]}')
    assert rc == 0 and "8 neurons" in out or "neurons" in out


@pytest.mark.parametrize("argv, needle", [
    (["--model", "no.such.module.Net"], "no module named 'no'"),
    (["--model", "graphspace.testing.models.Nope"], "has no attribute 'Nope'"),
    (["--model", "graphspace.testing.models.MLP", "--init-args", "{width: 3}"], "width"),
    (["--model", "graphspace.testing.models.MLP", "--init-args", "[1, 2]"],
     "expected a JSON/YAML mapping"),
    (["--model", "graphspace.testing.models.MLP", "--init-args", "{bad"], "mapping"),
    (["--model", "{init_args: {}}"], "class_path"),
])
def test_bad_model_is_one_line(capsys, argv, needle):
    rc, _, err = _run(capsys, "info", *argv)
    assert rc == 1
    assert needle in _one_error_line(err, "info")


def test_lightning_checkpoint_without_strip_prefix_gets_a_hint(capsys, tmp_path):
    m = MLP((2, 8, 2))
    torch.save({"state_dict": {f"model.{k}": v for k, v in m.state_dict().items()},
                "epoch": 1}, tmp_path / "l.ckpt")
    out = str(tmp_path / "g.safetensors")
    rc, _, err = _run(capsys, "convert", str(tmp_path / "l.ckpt"), "--model",
                      "graphspace.testing.models.MLP", "--init-args", "{sizes: [2, 8, 2]}",
                      "-o", out)
    assert rc == 1
    assert _one_error_line(err, "convert").endswith("pass --strip-prefix model.")
    rc, _, err = _run(capsys, "convert", str(tmp_path / "l.ckpt"), "--model",
                      "graphspace.testing.models.MLP", "--init-args", "{sizes: [2, 8, 2]}",
                      "--strip-prefix", "model.", "-o", out)
    assert rc == 0, err


def test_bundled_configs(capsys, tmp_path):
    rc, out, _ = _run(capsys, "configs", "list")
    names = [line.split()[0] for line in out.splitlines()]
    assert names == sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml"))
    rc, out, _ = _run(capsys, "configs", "path", "generalization_digits")
    assert rc == 0 and Path(out.strip()).read_text() == \
        (ROOT / "experiments" / "generalization_digits.yaml").read_text()
    rc, _, _ = _run(capsys, "configs", "copy", "merge_wm_digits", str(tmp_path))
    assert rc == 0
    assert (tmp_path / "merge_wm_digits.yaml").read_bytes() == \
        (ROOT / "experiments" / "merge_wm_digits.yaml").read_bytes()
    rc, _, err = _run(capsys, "configs", "copy", "merge_wm_digits", str(tmp_path))
    assert rc == 1 and "--force" in _one_error_line(err, "configs")
    rc, _, err = _run(capsys, "configs", "copy", "nope", str(tmp_path))
    assert rc == 1 and "no bundled config" in _one_error_line(err, "configs")


def test_fit_with_an_unknown_config_is_one_line(capsys):
    rc, _, err = _run(capsys, "fit", "--config", "no_such_config")
    assert rc == 1
    line = _one_error_line(err, "fit")
    assert "'no_such_config'" in line and "generalization_digits" in line


def test_config_names_resolve(tmp_path):
    from graphspace.cli.lightning import resolve_configs

    want = str(ROOT / "experiments" / "inr_digits.yaml")
    for name in ("inr_digits", "inr_digits.yaml", "experiments/inr_digits.yaml"):
        got = resolve_configs(["fit", "--config", name])
        assert Path(got[2]).read_bytes() == Path(want).read_bytes()
    f = tmp_path / "inr_digits.yaml"
    f.write_text("x: 1\n")  # an existing file wins over the bundled name
    assert resolve_configs(["fit", f"--config={f}"]) == ["fit", f"--config={f}"]


def test_old_entry_points_warn_and_work(capsys, tmp_path):
    from graphspace.merge.cli import main as merge_main
    from graphspace.zoo_cli import main as zoo_main

    with pytest.warns(DeprecationWarning, match="graphspace.zoo_cli is deprecated"):
        rc = zoo_main(["status", str(tmp_path / "none")])
    assert rc == 1 and "is not a directory" in capsys.readouterr().err
    with pytest.warns(DeprecationWarning, match="graphspace.merge.cli is deprecated"):
        rc = merge_main(["only_one.pt", "--model", "x.Y", "-o", str(tmp_path / "m.pt")])
    assert rc == 1 and "at least two checkpoints" in capsys.readouterr().err


def _fit_args(tmp_path, *extra):
    return ["fit", "--model", "graphspace.testing.tiny_task.TinyTask",
            "--data", "graphspace.testing.tiny_task.TinyData",
            "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1",
            "--trainer.default_root_dir", str(tmp_path / "run"), "--seed_everything", "0",
            *extra]


def test_fit_is_quiet_prints_results_once_and_where_outputs_went(capsys, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(_fit_args(tmp_path))
    out = capsys.readouterr().out
    assert rc == 0
    ours = [w for w in caught if "graphspace" in str(w.filename)
            or "args parameter" in str(w.message) or "default logger" in str(w.message)
            or "tensorboardX" in str(w.message)]
    assert ours == [], [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
    assert out.count("| model | test mse |") == 1  # our table, once
    assert "Test metric" not in out  # Lightning's table is not repeated
    last = out.strip().splitlines()
    run_dir = Path(next(s for s in last if s.startswith("outputs: ")).split(": ", 1)[1])
    assert run_dir.is_dir() and (run_dir / "results.md").is_file()
    assert (run_dir / "metrics.csv").is_file() or list(run_dir.glob("events.out.*"))
    best = Path(last[-1].split(": ", 1)[1])
    assert last[-1].startswith("best checkpoint: ") and best.is_file()
    # the test MSE in the table is the one the checkpoint gives
    table = (run_dir / "results.md").read_text()
    mse = float(table.strip().splitlines()[-1].split("|")[2])
    from graphspace.testing.tiny_task import TinyData, TinyTask

    model = TinyTask.load_from_checkpoint(best)
    d = TinyData()
    with torch.no_grad():
        want = torch.nn.functional.mse_loss(model(d.x), d.y).item()
    assert mse == pytest.approx(want, abs=5e-7)  # the table has 6 decimals


def test_missing_optional_dependency_is_one_line_naming_the_extra(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if scikit-learn were not installed
    rc, _, err = _run(capsys, "zoo", "cnn", str(tmp_path / "z"), "--num-models", "2")
    assert rc == 1
    assert err == ("graphspace zoo: error: scikit-learn is needed: "
                   "pip install 'graphspace-weights[data]'\n")
    assert not (tmp_path / "z").exists()
    # the same message when the import fails deep inside a run
    from graphspace.cli import report_error

    assert report_error("merge", ModuleNotFoundError("No module named 'ot'", name="ot"),
                        False) == 1
    assert capsys.readouterr().err == \
        "graphspace merge: error: POT is needed: pip install 'graphspace-weights[merge]'\n"


@pytest.mark.parametrize("name", ["m.safetensors", "m.pt", "g.safetensors"])
def test_written_files_honour_the_umask(tmp_path, name):
    import os
    import stat

    from graphspace.graphs import ParameterGraph
    from graphspace.graphs.io import save_graph

    m = MLP((2, 4, 2))
    old = os.umask(0o027)
    try:
        if name.startswith("g"):
            out = save_graph(ParameterGraph.from_module(m), tmp_path / name)
        else:
            out = save_state_dict(m.state_dict(), tmp_path / name)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640


def test_test_verb_prints_the_results_once(capsys, tmp_path):
    rc = main(["test", "--model", "graphspace.testing.tiny_task.TinyTask",
               "--data", "graphspace.testing.tiny_task.TinyData",
               "--trainer.enable_progress_bar", "false",
               "--trainer.default_root_dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("| model | test mse |") == 1 and "Test metric" not in out
    assert out.strip().splitlines()[-1].startswith("outputs: ")
    # Lightning's own table is back on request
    rc = main(["test", "--model", "graphspace.testing.tiny_task.TinyTask",
               "--data", "graphspace.testing.tiny_task.TinyData", "--verbose", "true",
               "--trainer.enable_progress_bar", "false",
               "--trainer.default_root_dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert rc == 0 and "test_mse" in out and out.count("| model | test mse |") == 1


def test_lightning_verb_bad_option_is_one_line(capsys):
    rc, _, err = _run(capsys, "fit", "--model", "graphspace.testing.tiny_task.TinyTask",
                      "--data", "graphspace.testing.tiny_task.TinyData",
                      "--trainer.max_epochz", "3")
    assert rc == 1
    assert "unrecognized arguments: --trainer.max_epochz 3" in _one_error_line(err, "fit")
