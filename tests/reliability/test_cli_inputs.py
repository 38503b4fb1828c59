"""Issue 17's table, CLI rows: every bad input to `graphspace merge`, `convert` and `zoo` is one
line on stderr and a non-zero exit, before any output is written; plus a bounded fuzz of
`merge` on corrupted checkpoint files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphspace.cli import main
from graphspace.io import save_state_dict
from graphspace.testing.models import MLP

MODEL = ["--model", "graphspace.testing.models.MLP", "--init-args", "{sizes: [4, 8, 3]}"]
ROOT = Path(__file__).resolve().parents[2]


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _sd(seed=0, sizes=(4, 8, 3)):
    torch.manual_seed(seed)
    return MLP(sizes).state_dict()


@pytest.fixture
def good(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.pt"
    save_state_dict(_sd(0), a)
    save_state_dict(_sd(1), b)
    return a, b


def _bad_file(tmp_path: Path, kind: str) -> Path:
    """One bad checkpoint per kind; returns its path."""
    sd = _sd(2)
    st_path, pt_path = tmp_path / "ok.safetensors", tmp_path / "ok.pt"
    save_state_dict(sd, st_path)
    save_state_dict(sd, pt_path)
    p = tmp_path / f"bad_{kind}"
    if kind == "empty.safetensors" or kind == "empty.pt":
        p = tmp_path / kind
        p.write_bytes(b"")
    elif kind == "truncated.safetensors":
        p = tmp_path / kind
        p.write_bytes(st_path.read_bytes()[:100])
    elif kind == "corrupt_header.safetensors":
        p = tmp_path / kind
        data = bytearray(st_path.read_bytes())
        data[10:20] = b"\xff" * 10
        p.write_bytes(bytes(data))
    elif kind == "truncated.pt":
        p = tmp_path / kind
        p.write_bytes(pt_path.read_bytes()[:200])
    elif kind == "garbage.pt":
        p = tmp_path / kind
        p.write_bytes(b"this is not a checkpoint at all")
    elif kind == "pickle_renamed.safetensors":
        p = tmp_path / kind
        p.write_bytes(pt_path.read_bytes())
    elif kind == "safetensors_renamed.pt":
        p = tmp_path / kind
        p.write_bytes(st_path.read_bytes())
    elif kind == "missing.pt":
        p = tmp_path / kind
    elif kind == "directory.pt":
        p = tmp_path / kind
        p.mkdir()
    elif kind == "code.pt":
        p = tmp_path / kind
        torch.save({"w": torch.ones(1), "payload": Evil()}, p)
    elif kind == "not_a_state_dict.pt":
        p = tmp_path / kind
        torch.save([1, 2, 3], p)
    elif kind == "nan.safetensors":
        p = tmp_path / kind
        sd["net.0.weight"][1, 2] = float("nan")
        save_state_dict(sd, p)
    elif kind == "inf.pt":
        p = tmp_path / kind
        sd["net.2.bias"][0] = float("inf")
        save_state_dict(sd, p)
    elif kind == "int32.safetensors":
        p = tmp_path / kind
        save_state_dict({k: (v * 100).to(torch.int32) for k, v in sd.items()}, p)
    elif kind == "wider.safetensors":
        p = tmp_path / kind
        save_state_dict(_sd(2, (4, 16, 3)), p)
    elif kind == "extra_key.pt":
        p = tmp_path / kind
        save_state_dict({**sd, "net.9.weight": torch.ones(2)}, p)
    elif kind == "missing_key.pt":
        p = tmp_path / kind
        save_state_dict({k: v for k, v in sd.items() if k != "net.2.bias"}, p)
    else:
        raise AssertionError(kind)
    return p


# kind -> what the one error line must contain (besides the file name)
BAD = {
    "empty.safetensors": "is empty",
    "empty.pt": "is empty",
    "truncated.safetensors": "not a readable safetensors file",
    "corrupt_header.safetensors": "not a readable safetensors file",
    "truncated.pt": "not a readable torch.save file",
    "garbage.pt": "not a readable torch.save file",
    "pickle_renamed.safetensors": "torch.save file named .safetensors",
    "safetensors_renamed.pt": "looks like a safetensors file",
    "missing.pt": "cannot read",
    "directory.pt": "is a directory",
    "code.pt": "refusing to load",
    "not_a_state_dict.pt": "does not hold a state dict",
    "nan.safetensors": "NaN or Inf in tensor 'net.0.weight' (1 entries)",
    "inf.pt": "NaN or Inf in tensor 'net.2.bias'",
    "int32.safetensors": "tensor 'net.0.weight' is int32, the model's is float32",
    "wider.safetensors": "tensor 'net.0.weight' has shape (16, 4), expected (8, 4)",
    "extra_key.pt": "unexpected tensor 'net.9.weight'",
    "missing_key.pt": "missing tensor 'net.2.bias'",
}


def _one_line(capsys, cmd: str) -> str:
    err = capsys.readouterr().err
    lines = [s for s in err.splitlines() if s.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"graphspace {cmd}: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


# file checks do not depend on the method; NaN/Inf are refused by every method
MERGE_CASES = [(k, "average") for k in sorted(BAD)] + [
    (k, m) for k in ("nan.safetensors", "inf.pt") for m in ("ot_fusion", "weight_matching")]


@pytest.mark.parametrize("kind, method", MERGE_CASES)
def test_merge_refuses_bad_checkpoints_in_one_line(tmp_path, capsys, good, kind, method):
    bad = _bad_file(tmp_path, kind)
    out = tmp_path / "merged.safetensors"
    rc = main(["merge", str(good[0]), str(bad), *MODEL, "--method", method, "-o", str(out)])
    assert rc == 1
    line = _one_line(capsys, "merge")
    assert BAD[kind] in line and bad.name in line
    assert not out.exists()


@pytest.mark.parametrize("kind", sorted(BAD))
def test_convert_refuses_bad_checkpoints_in_one_line(tmp_path, capsys, kind):
    bad = _bad_file(tmp_path, kind)
    out = tmp_path / "g.safetensors"
    rc = main(["convert", str(bad), *MODEL, "-o", str(out)])
    assert rc == 1
    line = _one_line(capsys, "convert")
    assert BAD[kind] in line and bad.name in line
    assert not out.exists()


@pytest.mark.parametrize("argv, needle", [
    (["--weights", "1"], "--weights: 1 values for 2 checkpoints"),
    (["--weights", "1", "-1"], "non-negative"),
    (["--method", "ste"], "needs --data"),
    (["--repair", "repair"], "needs --data"),
    (["--num-batches", "0"], "--num-batches must be >= 1"),
    (["--init-args", "{sizes: [4, 8, 3]}", "--init-args", "{}", "--init-args", "{}"],
     "--init-args given 4 times for 2 checkpoints"),
    (["--data-kwargs", "[1]"], "--data-kwargs: expected a JSON/YAML mapping"),
])
def test_merge_bad_options_are_one_line(tmp_path, capsys, good, argv, needle):
    out = tmp_path / "m.safetensors"
    rc = main(["merge", *map(str, good), *MODEL, "-o", str(out), *argv])
    assert rc == 1
    assert needle in _one_line(capsys, "merge")
    assert not out.exists()


def test_merge_output_must_not_be_an_input(capsys, good):
    rc = main(["merge", *map(str, good), *MODEL, "-o", str(good[0])])
    assert rc == 1 and "is also an input checkpoint" in _one_line(capsys, "merge")


def test_merge_float16_is_cast_with_a_warning_and_equals_the_float32_merge(tmp_path, capsys,
                                                                          good):
    half = tmp_path / "half.safetensors"
    sd = _sd(1)
    save_state_dict({k: v.half() for k, v in sd.items()}, half)
    out16, out32 = tmp_path / "m16.safetensors", tmp_path / "m32.safetensors"
    rc = main(["merge", str(good[0]), str(half), *MODEL, "--method", "average",
               "-o", str(out16)])
    err = capsys.readouterr().err
    assert rc == 0
    assert "4 tensors stored as float16 were cast to the model's dtype" in err
    # the reference: the same float16 values given as float32 merge to the same weights
    ref = tmp_path / "ref.safetensors"
    save_state_dict({k: v.half().float() for k, v in sd.items()}, ref)
    assert main(["merge", str(good[0]), str(ref), *MODEL, "--method", "average",
                 "-o", str(out32)]) == 0
    from graphspace.io import load_state_dict

    a, b = load_state_dict(out16), load_state_dict(out32)
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == torch.float32 for k in a)


def test_allow_nonfinite_lets_average_merge_nan(tmp_path, capsys, good):
    bad = _bad_file(tmp_path, "nan.safetensors")
    out = tmp_path / "m.safetensors"
    rc = main(["merge", str(good[0]), str(bad), *MODEL, "--method", "average",
               "--allow-nonfinite", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    from graphspace.io import load_state_dict

    w = load_state_dict(out)["net.0.weight"]
    assert torch.isnan(w[1, 2]) and int(torch.isnan(w).sum()) == 1  # averaging: just that entry


def test_merge_strip_prefix_hint(tmp_path, capsys, good):
    ck = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in _sd(1).items()}}, ck)
    rc = main(["merge", str(good[0]), str(ck), *MODEL, "-o", str(tmp_path / "m.pt")])
    assert rc == 1
    assert _one_line(capsys, "merge").endswith("pass --strip-prefix net.")


@pytest.mark.parametrize("argv, needle", [
    (["-o", "g.pt"], "--output must end with .safetensors"),
    (["--model", "graphspace.testing.models.MLP", "--init-args", "{sizes: 3}"],
     "cannot build"),
])
def test_convert_bad_options_are_one_line(tmp_path, capsys, good, argv, needle):
    args = ["convert", str(good[0]), *MODEL, "-o", str(tmp_path / "g.safetensors")]
    args += argv
    if argv[0] == "-o":
        args[-1] = str(tmp_path / argv[1])
    rc = main(args)
    assert rc == 1 and needle in _one_line(capsys, "convert")


# -- zoo -------------------------------------------------------------------------------------

def _zoo_args(out, *extra):
    return ["zoo", "inr", str(out), "--num-images", "2", "--steps", "2", "--hidden", "4",
            "--workers", "1", "--no-progress", "--chunk-size", "1", *extra]


@pytest.mark.parametrize("shard, needle", [
    ("3/3", "with 0 <= i < n, got '3/3'"),
    ("0/0", "with 0 <= i < n, got '0/0'"),
    ("x", "expected 'i/n' such as 0/4, got 'x'"),
    ("-1/2", "with 0 <= i < n"),
])
def test_zoo_bad_shard_is_one_line(tmp_path, capsys, shard, needle):
    rc = main(_zoo_args(tmp_path / "z", f"--shard={shard}"))
    assert rc == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err
    assert not (tmp_path / "z").exists()


def test_zoo_status_and_merge_on_missing_folders_are_one_line(tmp_path, capsys):
    assert main(["zoo", "status", str(tmp_path / "nope")]) == 1
    assert "is not a directory" in _one_line(capsys, "zoo")
    assert main(["zoo", "status", str(tmp_path)]) == 1
    assert "holds no zoo" in _one_line(capsys, "zoo")
    assert main(["zoo", "merge", str(tmp_path), str(tmp_path / "nope")]) == 1
    assert "holds no zoo" in _one_line(capsys, "zoo")


def test_zoo_resume_with_another_recipe_names_the_field(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "z"
    assert main(_zoo_args(out)) == 0
    capsys.readouterr()
    assert main(_zoo_args(out, "--seed", "7")) == 1
    line = _one_line(capsys, "zoo")
    assert "field 'seed' is 0 there, 7 now" in line


def test_zoo_truncated_chunk_is_reported_and_regenerated(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "z"
    assert main(_zoo_args(out)) == 0
    chunk = out / "work" / "chunks" / "chunk-00001.pt"
    good_bytes = chunk.read_bytes()
    raw = {p.name: p.read_bytes() for p in (out / "raw").iterdir() if p.is_file()}
    chunk.write_bytes(good_bytes[: len(good_bytes) // 2])
    (out / "raw" / "zoo.json").unlink()  # as if the run had been killed before finalising
    capsys.readouterr()
    assert main(_zoo_args(out)) == 0
    err = capsys.readouterr().err
    assert "chunk 1" in err and "truncated or corrupt" in err and "regenerated" in err
    assert chunk.read_bytes() == good_bytes  # seeded: regenerated bit-identical
    assert {p.name: p.read_bytes() for p in (out / "raw").iterdir() if p.is_file()} == raw


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(t) for t in text.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc")
def test_sigkill_of_the_parent_leaves_no_orphaned_workers(tmp_path):
    pytest.importorskip("sklearn")
    cmd = [sys.executable, "-m", "graphspace.cli", "zoo", "inr", str(tmp_path / "z"),
           "--num-images", "8", "--steps", "200000", "--workers", "2", "--chunk-size", "1",
           "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        workers: list[int] = []
        while time.monotonic() < deadline and len(workers) < 2:
            workers = [c for c in _children(proc.pid) if _alive(c)]
            time.sleep(0.2)
        assert len(workers) >= 2, proc.stderr.read().decode() if proc.poll() is not None \
            else "no workers started"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        alive = [w for w in workers if _alive(w)]
        for w in alive:  # clean up before failing
            os.kill(w, signal.SIGKILL)
        assert alive == [], "workers outlived their parent"
    finally:
        if proc.poll() is None:
            proc.kill()


# -- bounded fuzz ----------------------------------------------------------------------------

@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(suffix=st.sampled_from([".safetensors", ".pt"]),
       cut=st.floats(0.0, 1.0),
       flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), max_size=4))
def test_fuzz_merge_on_corrupted_files(tmp_path_factory, capsys, suffix, cut, flips):
    d = tmp_path_factory.mktemp("fuzz")
    a, b = d / f"a{suffix}", d / f"b{suffix}"
    save_state_dict(_sd(0), a)
    save_state_dict(_sd(1), b)
    data = bytearray(b.read_bytes())
    for pos, val in flips:
        data[min(int(pos * len(data)), len(data) - 1)] = val
    data = data[: int(cut * len(data))] if cut < 1.0 else data
    b.write_bytes(bytes(data))
    out = d / "m.safetensors"
    rc = main(["merge", str(a), str(b), *MODEL, "--method", "average", "-o", str(out)])
    err = capsys.readouterr().err
    if rc == 0:  # the corruption hit no byte that matters (e.g. padding, a value bit)
        assert out.exists()
        assert "Traceback" not in err
    else:
        assert rc == 1 and not out.exists()
        lines = [s for s in err.splitlines() if s.strip()]
        assert len(lines) == 1 and lines[0].startswith("graphspace merge: error: "), err
