"""Model-zoo benchmark: networks generated per second and graphs loaded per second.

Run: ``python benchmarks/zoo.py [--threads 2] [--rows 10000] [--cnn 32] [--inr 64] [--hetero 8]``

Measured side by side in one process (sections can be skipped with ``--skip``):

1. **generation** -- :func:`~graphspace.data.generators.generate_cnn_zoo` (Small CNN Zoo format,
   default checkpoints), :func:`~graphspace.data.generators.generate_inr_zoo` (SIRENs, default
   steps) and :func:`~graphspace.data.generators.generate_hetero_zoo` (CNN Wild Park format), each
   on scikit-learn's digits with the default worker count (one process per core); process-pool
   start-up and the final write are included.
2. **conversion** -- a synthetic Small CNN Zoo (``--rows`` random rows of the published
   4970-column TensorFlow layout, written with
   :func:`~graphspace.data.small_cnn_zoo.write_small_cnn_zoo` as the tests do) turned into
   parameter graphs: ``SmallCNNZoo.process()`` (raw rows -> flat PyTorch-layout vectors, one
   vectorised pass), :meth:`GraphBuilder.build_many <graphspace.data.GraphBuilder.build_many>`
   (one gather per ``--batch-size`` rows), :meth:`GraphBuilder.build_batch
   <graphspace.data.GraphBuilder.build_batch>` (collated batches directly),
   :meth:`GraphBuilder.build` network by network, and the
   network-by-network routes without a builder: ``ParameterGraph.from_state_dict`` (cached
   analysis) and ``ParameterGraph.from_module`` (trace + analysis per network).
3. **loading** -- item access of the processed dataset (``ds[i]`` for every ``i``: what a
   ``DataLoader`` pays per graph), batched fetch (``ds.__getitems__``, what
   ``torch.utils.data.DataLoader`` calls) and collation into ``Batch``es of ``--batch-size``
   graphs, ``ds.batch`` (graphs and collation in one pass), and full loader epochs: PyG's
   ``DataLoader`` and a ``torch.utils.data.DataLoader`` over indices with
   ``collate_fn=ds.batch``.

Reference (issue 5): Neural Graphs turns Small-CNN-Zoo rows into PyG graphs at about 1,900
graphs/s (full dataset item, 2 CPU cores); target >= 10,000 graphs/s.
"""

from __future__ import annotations

import argparse
import math
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _timing import median_time  # benchmarks/ is on sys.path
from torch_geometric.data import Batch
from torch_geometric.loader import DataLoader

from graphspace.data import GraphBuilder, SmallCNNZoo
from graphspace.data.small_cnn_zoo import (
    rows_to_state_dicts,
    small_cnn_layout,
    write_small_cnn_zoo,
)
from graphspace.graphs import ParameterGraph, analyze
from graphspace.testing.models import SmallCNN

REFERENCE = 1_900.0  # Neural Graphs, graphs/s (issue 5)
TARGET = 10_000.0  # graphs/s


def write_synthetic_zoo(raw: Path, rows: int, seed: int = 0) -> None:
    """A Small CNN Zoo of ``rows`` final checkpoints (random TF-layout weights and metrics with
    the published columns), one run per row, and an NFN-style permutation file."""
    rng = np.random.default_rng(seed)
    layout = small_cnn_layout()
    width = layout[-1].end
    weights = (rng.standard_normal((rows, width), dtype=np.float32) * 0.3)
    acts = ["relu", "tanh"]
    metrics = {
        "config.activation": [acts[i % 2] for i in range(rows)],
        "config.dropout": rng.uniform(0, 0.7, rows).tolist(),
        "config.epochs": [86] * rows,
        "config.learning_rate": [0.01] * rows,
        "config.optimizer": ["adam"] * rows,
        "config.w_init": ["he_normal"] * rows,
        "modeldir": [f"/tmp/run{i}" for i in range(rows)],
        "step": [86] * rows,
        "test_accuracy": rng.uniform(size=rows).tolist(),
        "test_loss": rng.uniform(size=rows).tolist(),
        "train_accuracy": rng.uniform(size=rows).tolist(),
        "train_loss": rng.uniform(size=rows).tolist(),
    }
    write_small_cnn_zoo(raw, weights, metrics, layout, rng.permutation(rows))


def timed(fn: Callable[[], object], repeats: int = 1) -> float:
    """Median wall time of ``repeats`` calls (seconds), no warm-up."""
    return median_time(fn, repeats, warmup=False)


Row = tuple[str, int, float, str]  # what, count, seconds, unit


def bench_generation(work: Path, n_cnn: int, n_inr: int, n_hetero: int) -> list[Row]:
    from graphspace.data.generators import (
        generate_cnn_zoo,
        generate_hetero_zoo,
        generate_inr_zoo,
    )

    rows: list[Row] = []
    if n_cnn:
        t = timed(lambda: generate_cnn_zoo(work / "cnn", num_models=n_cnn, seed=0,
                                           data="digits", progress=False))
        rows.append(("CNN zoo (Small CNN, 7 checkpoints, 30 epochs)", n_cnn, t, "networks"))
    if n_inr:
        t = timed(lambda: generate_inr_zoo(work / "inr", seed=0, data="digits",
                                           num_images=n_inr, chunk_size=max(1, n_inr // 2),
                                           progress=False))
        rows.append(("SIREN INR zoo (2-32-32-1, 300 Adam steps)", n_inr, t, "networks"))
    if n_hetero:
        t = timed(lambda: generate_hetero_zoo(work / "hetero", num_models=n_hetero, seed=0,
                                              data="digits", progress=False))
        rows.append(("heterogeneous CNN zoo (3 checkpoints, 8 epochs)", n_hetero, t,
                     "networks"))
    return rows


def bench_conversion(root: Path, n_rows: int, n_slow: int, batch_size: int, repeats: int
                     ) -> tuple[list[Row], SmallCNNZoo]:
    rows: list[Row] = []
    write_synthetic_zoo(root / "raw", n_rows)
    t = timed(lambda: SmallCNNZoo(str(root), "train", force_reload=True))
    rows.append(("SmallCNNZoo.process() (rows -> flat vectors, 3 splits)", n_rows, t, "rows"))
    weights = np.load(root / "raw" / "weights.npy")
    layout = small_cnn_layout()
    model = SmallCNN()
    keys = list(model.state_dict())
    b = GraphBuilder(model)

    def flats() -> torch.Tensor:
        sd = rows_to_state_dicts(weights, layout)
        return torch.cat([sd[k].reshape(n_rows, -1) for k in keys], 1)

    t_flat = timed(flats, repeats)
    rows.append(("TF rows -> flat PyTorch vectors (vectorised)", n_rows, t_flat, "rows"))
    f = flats()
    y = torch.rand(n_rows)
    chunks = f.split(batch_size)

    def many(share: bool) -> None:
        for c in chunks:
            b.build_many(c, share_structure=share)

    t = timed(lambda: many(True), repeats)
    rows.append((f"GraphBuilder.build_many, {batch_size} rows per gather", n_rows, t, "graphs"))
    t = timed(lambda: many(False), repeats)
    rows.append(("  same, structure tensors copied per graph", n_rows, t, "graphs"))
    t = timed(lambda: [b.build_batch(c, {"y": yc}) for c, yc in zip(chunks, y.split(batch_size))],
              repeats)
    rows.append((f"GraphBuilder.build_batch -> Batch of {batch_size} (collated)", n_rows, t,
                 "graphs"))

    def one_by_one(share: bool) -> None:
        for v in f:
            b.build(v, share_structure=share)

    t = timed(lambda: one_by_one(True), repeats)
    rows.append(("GraphBuilder.build, network by network", n_rows, t, "graphs"))
    t = timed(lambda: one_by_one(False), repeats)
    rows.append(("  same, structure tensors copied per graph", n_rows, t, "graphs"))
    a = analyze(model)
    sds = [b.unflatten(v) for v in f[:n_slow]]
    t = timed(lambda: [ParameterGraph.from_state_dict(sd, a) for sd in sds])
    rows.append(("ParameterGraph.from_state_dict per row (cached analysis)", n_slow, t,
                 "graphs"))
    n_mod = max(1, n_slow // 5)

    def from_module() -> None:
        for sd in sds[:n_mod]:
            m = SmallCNN()
            m.load_state_dict(sd)
            ParameterGraph.from_module(m)

    t = timed(from_module)
    rows.append(("ParameterGraph.from_module per row (trace each)", n_mod, t, "graphs"))
    return rows, SmallCNNZoo(str(root), "train")


def bench_loading(ds: SmallCNNZoo, batch_size: int, repeats: int) -> list[Row]:
    n = len(ds)
    rows: list[Row] = []
    ds[0]  # builder set up
    t = timed(lambda: [ds[i] for i in range(n)], repeats)
    rows.append(("ds[i] for every i (item access)", n, t, "graphs"))
    chunks = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    t = timed(lambda: [ds.__getitems__(c) for c in chunks], repeats)
    rows.append((f"ds.__getitems__, {batch_size} at a time (batched fetch)", n, t, "graphs"))
    t = timed(lambda: [Batch.from_data_list([ds[i] for i in c]) for c in chunks], repeats)
    rows.append((f"ds[i] + Batch.from_data_list({batch_size})", n, t, "graphs"))
    t = timed(lambda: [Batch.from_data_list(ds.__getitems__(c)) for c in chunks], repeats)
    rows.append((f"__getitems__ + Batch.from_data_list({batch_size})", n, t, "graphs"))
    items = [ds[i] for i in chunks[0]]
    t1 = timed(lambda: [Batch.from_data_list(items) for _ in range(len(chunks))], repeats)
    rows.append((f"  of which collation alone ({batch_size} graphs/batch)", n, t1, "graphs"))
    t = timed(lambda: [ds.batch(c) for c in chunks], repeats)
    rows.append((f"ds.batch({batch_size}) (vectorised graphs + collation)", n, t, "graphs"))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True)
    t = timed(lambda: [None for _ in loader], repeats)
    rows.append((f"PyG DataLoader epoch (shuffle, batch {batch_size}, 0 workers)", n, t,
                 "graphs"))
    fast = torch.utils.data.DataLoader(range(n), batch_size=batch_size, shuffle=True,
                                       collate_fn=ds.batch)
    t = timed(lambda: [None for _ in fast], repeats)
    rows.append(("DataLoader(range(n), collate_fn=ds.batch) epoch", n, t, "graphs"))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=10_000, help="rows of the synthetic zoo")
    p.add_argument("--slow-rows", type=int, default=500,
                   help="rows converted with ParameterGraph.from_state_dict")
    p.add_argument("--cnn", type=int, default=32, help="networks of the CNN generator")
    p.add_argument("--inr", type=int, default=64, help="SIRENs of the INR generator")
    p.add_argument("--hetero", type=int, default=8, help="networks of the hetero generator")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip", nargs="*", default=[], choices=["generate", "convert", "load"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}; median of {args.repeats} runs where repeated")
    rows: list[tuple[str, list[Row]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "generate" not in args.skip:
            rows.append(("generation (digits, default workers = one per core)",
                         bench_generation(work / "gen", args.cnn, args.inr, args.hetero)))
        ds = None
        if "convert" not in args.skip or "load" not in args.skip:
            conv, ds = bench_conversion(work / "zoo", args.rows, args.slow_rows,
                                        args.batch_size, args.repeats)
            if "convert" not in args.skip:
                rows.append((f"conversion of a {args.rows:,}-row Small CNN Zoo "
                             "(4970 parameters, kernel='edge')", conv))
        if "load" not in args.skip and ds is not None:
            rows.append((f"loading the processed training split ({len(ds):,} graphs)",
                         bench_loading(ds, args.batch_size, args.repeats)))
    for title, rs in rows:
        print(f"\n{title}")
        print(f"{'step':60s} {'count':>7s} {'seconds':>9s} {'per second':>14s} "
              f"{'ms each':>9s} {'vs 1,900/s':>10s}")
        for what, count, secs, unit in rs:
            rate = count / secs if secs > 0 else math.inf
            rel = f"{rate / REFERENCE:9.1f}x" if unit == "graphs" else ""
            print(f"{what:60s} {count:7d} {secs:9.3f} {rate:10.0f} {unit:<6s}"
                  f"{1e3 * secs / count:8.3f} {rel:>10s}")
    print(f"\nreference: Neural Graphs {REFERENCE:,.0f} graphs/s (full dataset item, 2 cores); "
          f"target >= {TARGET:,.0f} graphs/s")


if __name__ == "__main__":
    main()
