import copy
import os

import pytest
import torch
from torch import nn

from graphspace.graphs import ArchitectureMismatchError, permute_model
from graphspace.io import load_state_dict, save_state_dict
from graphspace.merge import METHODS, merge
from graphspace.merge.cli import main
from graphspace.testing.models import MLP

FACTORY = "graphspace.testing.models:MLP"


def _models(n=2, sizes=(8, 16, 16, 4)):
    out = []
    for i in range(n):
        torch.manual_seed(i)
        out.append(MLP(sizes).eval())
    return out


def _data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g))
            for _ in range(2)]


@pytest.mark.parametrize("method", METHODS)
def test_merge_returns_new_model_and_never_mutates(method):
    models = _models(3)
    before = [copy.deepcopy(m.state_dict()) for m in models]
    kw = {"epochs": 1} if method == "ste" else {}
    merged = merge(models, method, loader=_data(), **kw)
    assert all(merged is not m for m in models)
    for m, sd in zip(models, before):
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k])
    assert merged(torch.randn(2, 8)).shape == (2, 4)


def test_average_and_weights():
    a, b = _models(2)
    m = merge([a, b], "average", weights=[0.25, 0.75])
    for k, v in m.state_dict().items():
        assert torch.allclose(v, 0.25 * a.state_dict()[k] + 0.75 * b.state_dict()[k])


def test_merging_permuted_copies_gives_the_original():
    (a,) = _models(1)
    b, _ = permute_model(a, generator=torch.Generator().manual_seed(0))
    c, _ = permute_model(a, generator=torch.Generator().manual_seed(1))
    m = merge([a, b, c], "weight_matching")
    for k, v in a.state_dict().items():
        assert torch.allclose(m.state_dict()[k], v, atol=1e-6)
    naive = merge([a, b, c], "average")
    assert not torch.allclose(naive.net[0].weight, a.net[0].weight)


def test_merge_errors():
    a, b = _models(2)
    with pytest.raises(ArchitectureMismatchError, match="net.2.weight"):
        merge([a, MLP((8, 16, 12, 4))], "weight_matching")
    with pytest.raises(ValueError, match="unknown method"):
        merge([a, b], "nope")
    with pytest.raises(ValueError, match="needs data"):
        merge([a, b], "activation_matching")
    with pytest.raises(ValueError, match="at least two"):
        merge([a])


# -- CLI --------------------------------------------------------------------------------------


def _write(models, tmp_path, fmt="safetensors"):
    paths = []
    for i, m in enumerate(models):
        p = tmp_path / f"m{i}.{fmt}"
        if fmt == "safetensors":
            save_state_dict(m.state_dict(), p)
        else:
            torch.save(m.state_dict(), p)
        paths.append(str(p))
    return paths


def test_cli_round_trip(tmp_path):
    models = _models(2)
    a_path, b_path = _write(models[:1], tmp_path) + _write(models[1:], tmp_path, "pt")
    out = tmp_path / "sub" / "merged.safetensors"
    rc = main([a_path, b_path, "--model", FACTORY, "--model-kwargs",
               '{"sizes": [8, 16, 16, 4]}', "--method", "weight_matching", "-o", str(out)])
    assert rc == 0
    got = load_state_dict(out)
    ref = merge(models, "weight_matching").state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert not [p for p in os.listdir(out.parent) if p.endswith(".tmp")]


def test_cli_ot_fusion_different_widths_and_torch_output(tmp_path):
    small, wide = MLP((8, 16, 4)), MLP((8, 24, 4))
    paths = _write([small], tmp_path) + [str(tmp_path / "wide.pt")]
    torch.save(wide.state_dict(), paths[1])
    out = tmp_path / "fused.pt"
    rc = main(paths + ["--model", FACTORY, "--model-kwargs", '{"sizes": [8, 16, 4]}',
                       "--model-kwargs", '{"sizes": [8, 24, 4]}', "--method", "ot_fusion",
                       "-o", str(out)])
    assert rc == 0
    sd = torch.load(out, weights_only=True)
    assert sd["net.0.weight"].shape == (16, 8)


class _Custom(nn.Module):
    pass


def test_cli_refuses_pickled_code(tmp_path, capsys):
    a, b = _models(2)
    good = _write([a], tmp_path)[0]
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": a.state_dict(), "extra": _Custom()}, bad)
    out = tmp_path / "o.safetensors"
    rc = main([good, str(bad), "--model", FACTORY, "--model-kwargs",
               '{"sizes": [8, 16, 16, 4]}', "-o", str(out)])
    assert rc == 1
    assert "refusing to load" in capsys.readouterr().err
    assert not out.exists()


def test_cli_names_the_mismatching_tensor(tmp_path, capsys):
    a = _models(1)[0]
    other = MLP((8, 16, 12, 4))
    paths = _write([a, other], tmp_path)
    rc = main(paths + ["--model", FACTORY, "--model-kwargs", '{"sizes": [8, 16, 16, 4]}',
                       "-o", str(tmp_path / "o.safetensors")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "checkpoint 1" in err and "net.2.weight" in err


@pytest.mark.parametrize("method", ["average", "ot_fusion", "weight_matching"])
def test_nan_checkpoints_are_refused_naming_the_file(tmp_path, capsys, method):
    a, b = _models(2)
    with torch.no_grad():
        b.net[2].weight[0, 0] = float("nan")
    from graphspace.graphs import NonFiniteWeightError

    with pytest.raises(NonFiniteWeightError, match=r"model 1: NaN or Inf in \['net.2.weight'\]"):
        merge([a, b], method)
    paths = _write([a, b], tmp_path)
    out = tmp_path / "o.safetensors"
    rc = main(paths + ["--model", FACTORY, "--model-kwargs", '{"sizes": [8, 16, 16, 4]}',
                       "--method", method, "-o", str(out)])
    assert rc == 1 and not out.exists()
    err = capsys.readouterr().err
    assert "checkpoint 1" in err and paths[1] in err and "net.2.weight" in err


def test_cli_write_is_atomic(tmp_path, monkeypatch, capsys):
    models = _models(2)
    paths = _write(models, tmp_path)
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"previous content")
    import safetensors.torch as st

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", failing_save)
    rc = main(paths + ["--model", FACTORY, "--model-kwargs", '{"sizes": [8, 16, 16, 4]}',
                       "-o", str(out)])
    assert rc == 1 and "disk full" in capsys.readouterr().err
    assert out.read_bytes() == b"previous content"
    assert sorted(os.listdir(tmp_path)) == ["m0.safetensors", "m1.safetensors",
                                            "merged.safetensors"]


def test_cli_with_data_and_repair(tmp_path):
    models = _models(2, sizes=(64, 32, 10))
    paths = _write(models, tmp_path)
    out = tmp_path / "m.safetensors"
    rc = main(paths + ["--model", FACTORY, "--model-kwargs", '{"sizes": [64, 32, 10]}',
                       "--method", "activation_matching", "--repair", "repair",
                       "--data", "graphspace.merge.digits:DigitsDataModule",
                       "--num-batches", "2", "-o", str(out)])
    assert rc == 0 and out.exists()
    assert main(["--help"]) == 0
    assert main([paths[0]]) == 2  # --model and -o missing: usage error


def test_cli_eval_prints_accuracies_and_barriers_and_saves_the_plot(tmp_path, capsys):
    from graphspace.merge.digits import DigitsDataModule
    from graphspace.merge.interpolation import evaluate, interpolation_curve

    models = _models(2, sizes=(64, 32, 10))
    paths = _write(models, tmp_path)
    out = tmp_path / "m.safetensors"
    rc = main(paths + ["--model", FACTORY, "--init-args", '{"sizes": [64, 32, 10]}',
                       "--eval", "graphspace.merge.digits:DigitsDataModule",
                       "--eval-points", "3", "-o", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    plot = tmp_path / "m.interpolation.png"
    assert plot.exists() and plot.stat().st_size > 1000
    assert f"interpolation plot -> {plot}" in text
    dm = DigitsDataModule()
    dm.setup("test")
    loss0, acc0 = evaluate(models[0], dm.test_dataloader())
    assert f"model 0 ({paths[0]}): loss {loss0:.4f}, accuracy {acc0:.4f}" in text
    naive = interpolation_curve(models[0], models[1], dm.test_dataloader(), 3)
    assert f"loss barrier, naive: {naive.barrier:.4f}" in text
    assert "loss barrier, weight_matching:" in text
    assert main(paths + ["--model", FACTORY, "--init-args", '{"sizes": [64, 32, 10]}',
                         "--eval", "nowhere:Nothing", "-o", str(out)]) != 0
    assert "--eval" in capsys.readouterr().err
