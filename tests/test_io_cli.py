import os
import stat
from pathlib import Path

import pytest
import torch

from graphspace.cli import main
from graphspace.graphs import ParameterGraph
from graphspace.graphs.io import load_graph, save_graph
from graphspace.io import (
    UntrustedCheckpointError,
    atomic_write,
    load_state_dict,
    save_state_dict,
)
from graphspace.testing.models import SmallCNN


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_untrusted_checkpoint_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "payload": Evil()}, p)
    with pytest.raises(UntrustedCheckpointError, match="refusing"):
        load_state_dict(p)


def test_state_dict_files_round_trip(tmp_path):
    m = SmallCNN()
    for name in ("a.safetensors", "b.pt"):
        save_state_dict(m.state_dict(), tmp_path / name)
        sd = load_state_dict(tmp_path / name)
        assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    torch.save({"state_dict": m.state_dict(), "epoch": 3}, tmp_path / "wrapped.pt")
    assert set(load_state_dict(tmp_path / "wrapped.pt")) == set(m.state_dict())


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def boom(p):
        with open(p, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_write_respects_umask(tmp_path):
    old = os.umask(0o027)
    try:
        out = atomic_write(tmp_path / "f.txt", lambda p: Path(p).write_text("x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640


def test_graph_file_round_trip(tmp_path):
    m = SmallCNN()
    g = ParameterGraph.from_module(m)
    save_graph(g, tmp_path / "g.safetensors")
    g2 = load_graph(tmp_path / "g.safetensors", SmallCNN())
    sd = g2.to_state_dict()
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())


def test_graph_file_of_another_architecture_with_as_many_edges_is_refused(tmp_path):
    from graphspace.testing.models import MLP

    g = ParameterGraph.from_module(MLP((2, 8, 2)))  # 32 edges, 12 nodes
    save_graph(g, tmp_path / "g.safetensors")
    other = MLP((4, 4, 4))  # also 32 edges and 12 nodes, wired differently
    assert ParameterGraph.from_module(other).edge_index.shape == g.edge_index.shape
    from graphspace.graphs.io import architecture_fingerprint

    theirs, ours = architecture_fingerprint(g), architecture_fingerprint(
        ParameterGraph.from_module(other))
    assert theirs != ours
    # the file names both fingerprints and both layouts
    with pytest.raises(ValueError, match=f"does not hold a graph of MLP: its architecture "
                                         f"fingerprint is {theirs} .*MLP's is {ours}") as e:
        load_graph(tmp_path / "g.safetensors", other)
    assert "(8, 2)" in str(e.value) and "(4, 4)" in str(e.value)
    # an older file without a fingerprint is still checked tensor by tensor
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tmp_path / "g.safetensors"), framework="pt") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k != "graphspace.arch"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="does not hold a graph of MLP: its 'edge_index'"):
        load_graph(tmp_path / "old.safetensors", other)
    # the same architecture loads (the fingerprint does not depend on the weights)
    load_graph(tmp_path / "g.safetensors", MLP((2, 8, 2)))


def test_cli_convert_and_info(tmp_path, capsys):
    m = SmallCNN()
    save_state_dict(m.state_dict(), tmp_path / "m.safetensors")
    out = tmp_path / "g.safetensors"
    rc = main(["convert", str(tmp_path / "m.safetensors"), "--model",
               "graphspace.testing.models:SmallCNN", "-o", str(out)])
    assert rc == 0 and out.exists()
    g = load_graph(out, SmallCNN())
    assert torch.equal(g.to_state_dict()["fc.weight"], m.fc.weight)
    assert main(["info", "--model", "graphspace.testing.models:ResNet"]) == 0
    text = capsys.readouterr().out
    assert "permutation group stem" in text
    assert main(["nonsense"]) == 2


def test_tune_cpu_allocator(monkeypatch):
    """The allocator tuning is accepted on glibc (or reports False elsewhere), refuses
    out-of-range thresholds, and the console script honours the opt-out variable."""
    import platform
    import sys

    from graphspace import cli, runtime

    result = runtime.tune_cpu_allocator()
    assert isinstance(result, bool)
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert result
    with pytest.raises(ValueError, match="mmap_threshold"):
        runtime.tune_cpu_allocator(mmap_threshold=64 * 1024 * 1024)
    calls = []
    monkeypatch.setattr(runtime, "tune_cpu_allocator", lambda: calls.append(1) or True)
    for value, expected in (("0", 0), ("false", 0), ("1", 1)):
        calls.clear()
        monkeypatch.setenv(runtime.ENV_VAR, value)
        assert cli.main(["info", "--model", "torch.nn:Identity"]) == 0
        assert len(calls) == expected
    monkeypatch.delenv(runtime.ENV_VAR)
    assert runtime.tuning_enabled()
