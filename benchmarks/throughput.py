"""Benchmark: GraphMetaNetwork training throughput next to the ``nfn`` HNP model (issue 6).

Run: ``python benchmarks/throughput.py [--threads 2] [--repeats 20] [--nfn-python PATH]``
(inside ``flock /tmp/graphspace-cpu.lock`` on the shared 2-core machine).

One training step is ``zero_grad`` + forward + backward + ``Adam.step`` (lr 1e-3, MSE loss on
one output per network) on a fixed batch of ``--batch`` randomly initialised
:class:`~graphspace.testing.models.SmallCNN` networks (the Small CNN Zoo architecture), turned
into parameter graphs and collated to one PyG ``Batch`` once. The figure is the median step
time over ``--repeats`` steps (after ``--warmup`` steps), as networks/s, and its median over
``--rounds`` rounds that alternate with the nfn reference. Configurations:

* ``main job``: ``experiments/generalization_digits.yaml``'s model: ``kernel="channel"``
  graphs, ``GraphMetaNetwork(1, hidden_channels=32, num_layers=3, edge_in=9)``;
* ``defaults, channel``: ``GraphMetaNetwork``'s constructor defaults (hidden 64, 4 layers,
  ``backbone="metanet"``, ``readout="pool"``) on ``kernel="channel"`` graphs;
* ``defaults, edge``: the same on ``kernel="edge"`` graphs (one edge per kernel entry).

The reference is the ``nfn`` package's HNP invariant NFN in its predict-generalization
configuration (``benchmarks/_nfn_hnp_throughput.py``), run with ``--nfn-python`` (an
environment with ``torch`` and ``nfn`` only). Without ``--nfn-python`` the benchmark makes that
environment itself from the package registry, once, under ``~/.cache/graphspace/peers/nfn``
(``$GRAPHSPACE_CACHE`` moves it): a venv with this process's torch version and ``nfn``. The
reference is skipped with a message when neither works. The issue quotes 264 networks/s
for it on 2 CPU cores; the target is a graph metanetwork at >= 264 networks/s.

``--malloc tuned`` (default) measures the way the ``graphspace`` console script trains: with
:func:`graphspace.runtime.tune_cpu_allocator` applied, and the nfn reference run under the
same glibc settings (``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``), so both sides
keep freed memory in the process. ``--malloc default`` leaves glibc's defaults on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch_geometric.data import Batch

from graphspace.graphs import ParameterGraph
from graphspace.nn import GraphMetaNetwork
from graphspace.runtime import MMAP_THRESHOLD, TRIM_THRESHOLD, tune_cpu_allocator
from graphspace.testing.models import SmallCNN

#: networks/s of nfn's HNP model quoted in the issue (2 CPU cores)
REFERENCE = 264.0
NFN_SCRIPT = Path(__file__).with_name("_nfn_hnp_throughput.py")
PEER_PACKAGES = {"nfn": ["nfn"]}


def peer_python(name: str) -> str | None:
    """The interpreter of the peer environment `name` (created on first use under the cache
    directory with `pip`, this torch version and the peer's packages), or `None` with a
    message when it cannot be made (e.g. no registry)."""
    cache = Path(os.environ.get("GRAPHSPACE_CACHE", Path.home() / ".cache" / "graphspace"))
    root = cache / "peers" / name
    python = root / "bin" / "python"
    ready = root / ".ready"
    if ready.exists() and python.exists():
        return str(python)
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    print(f"creating the {name} peer environment in {root} ({torch_pin}, "
          f"{' '.join(PEER_PACKAGES[name])}) ...", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(root)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", torch_pin,
                        *PEER_PACKAGES[name]], check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"{name} peer environment not created ({e}); pass --{name}-python PATH")
        return None
    ready.write_text(torch_pin + "\n")
    return str(python)


@dataclass(frozen=True)
class Config:
    key: str
    name: str
    kernel: str
    hidden: int | None  # None: the constructor default
    layers: int | None


CONFIGS = (
    Config("main", "main job (generalization_digits.yaml)", "channel", 32, 3),
    Config("defaults-channel", "defaults, kernel=channel", "channel", None, None),
    Config("defaults-edge", "defaults, kernel=edge", "edge", None, None),
)


def zoo_batch(batch: int, kernel: str, seed: int = 0) -> Batch:
    """``batch`` random SmallCNN inits as one collated batch of parameter graphs."""
    torch.manual_seed(seed)
    return Batch.from_data_list(
        [ParameterGraph.from_module(SmallCNN(), kernel=kernel) for _ in range(batch)])


def build(cfg: Config, edge_in: int) -> GraphMetaNetwork:
    kwargs = {}
    if cfg.hidden is not None:
        kwargs["hidden_channels"] = cfg.hidden
    if cfg.layers is not None:
        kwargs["num_layers"] = cfg.layers
    return GraphMetaNetwork(1, edge_in=edge_in, **kwargs)


def measure(net: torch.nn.Module, batch: Batch, warmup: int, repeats: int) -> list[float]:
    """Step times (s) of ``repeats`` training steps after ``warmup`` ones."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    target = torch.rand(batch.num_graphs, 1)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(net(batch), target).backward()
        opt.step()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def run_nfn(python: str, threads: int, batch: int, warmup: int, repeats: int,
            tuned: bool) -> dict | None:
    """The nfn HNP measurement in its own interpreter, or ``None`` (with a message)."""
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        print(f"nfn HNP reference skipped: no interpreter at {python} (create a separate "
              f"environment with torch and nfn and pass --nfn-python)")
        return None
    cmd = [python, str(NFN_SCRIPT), "--json", "--threads", str(threads), "--batch", str(batch),
           "--warmup", str(warmup), "--repeats", str(repeats)]
    env = dict(os.environ)
    if tuned:  # the settings of graphspace.runtime.tune_cpu_allocator, as glibc variables
        env.update(MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD),
                   MALLOC_TRIM_THRESHOLD_=str(TRIM_THRESHOLD))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        print(f"nfn HNP reference failed ({' '.join(cmd)}):\n{proc.stderr.strip()[-2000:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--nfn-python", default=None,
                   help="interpreter of an environment with nfn (default: one made under "
                        "~/.cache/graphspace/peers/nfn)")
    p.add_argument("--configs", nargs="+", default=[c.key for c in CONFIGS],
                   choices=[c.key for c in CONFIGS],
                   help="graphspace configurations to run (default: all; defaults-edge takes "
                        "~15 s a step on 2 cores)")
    p.add_argument("--rounds", type=int, default=3,
                   help="alternating rounds of graphspace and nfn measurements (default: 3)")
    p.add_argument("--skip-nfn", action="store_true", help="do not run the nfn reference")
    p.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                   help="glibc allocator settings of both sides (default: %(default)s, as the "
                        "graphspace console script runs)")
    args = p.parse_args()
    tuned = args.malloc == "tuned" and tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads={args.threads}, python {sys.version.split()[0]}, allocator "
          f"{'tuned (graphspace.runtime)' if tuned else 'glibc defaults'} on both sides")
    print(f"batch of {args.batch} SmallCNN parameter graphs; step = forward + backward + "
          f"Adam; median of {args.repeats} steps after {args.warmup} warm-up steps, median "
          f"over {args.rounds} alternating rounds")

    # rounds alternate the graphspace configurations and the nfn reference, so a drift of the
    # shared machine's speed hits both sides alike; each figure is the median over rounds
    batches: dict[str, Batch] = {}
    nets: dict[str, GraphMetaNetwork] = {}
    meds: dict[str, list[float]] = {}
    nfn_runs: list[dict] = []
    cfgs = [c for c in CONFIGS if c.key in args.configs]
    for r in range(args.rounds):
        for cfg in cfgs:
            if cfg.kernel not in batches:
                batches[cfg.kernel] = zoo_batch(args.batch, cfg.kernel)
            b = batches[cfg.kernel]
            if cfg.key not in nets:
                torch.manual_seed(0)
                nets[cfg.key] = build(cfg, b.edge_attr.size(1))
            times = measure(nets[cfg.key], b, args.warmup, args.repeats)
            meds.setdefault(cfg.key, []).append(statistics.median(times))
            print(f"  round {r + 1}, {cfg.name}: {meds[cfg.key][-1] * 1e3:.1f} ms/step (min "
                  f"{min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})", flush=True)
        if not args.skip_nfn and args.nfn_python is None:
            args.nfn_python = peer_python("nfn")
            args.skip_nfn = args.nfn_python is None
        nfn = None if args.skip_nfn else run_nfn(args.nfn_python, args.threads, args.batch,
                                                 args.warmup, args.repeats, tuned)
        if nfn is not None:
            nfn_runs.append(nfn)
            print(f"  round {r + 1}, nfn HNP: {nfn['step_s'] * 1e3:.1f} ms/step", flush=True)

    rows = []
    for cfg in cfgs:
        net, b = nets[cfg.key], batches[cfg.kernel]
        med = statistics.median(meds[cfg.key])
        rows.append((f"graphspace GMN: {cfg.name}",
                     f"h={net.hidden_channels}, L={len(net.blocks)}, {b.num_nodes} nodes, "
                     f"{2 * b.num_edges} edges", sum(q.numel() for q in net.parameters()),
                     med, args.batch / med))
    nfn_step = None
    if nfn_runs:
        nfn_step = statistics.median(n["step_s"] for n in nfn_runs)
        rows.append((f"nfn {nfn_runs[0]['nfn_version']} HNP (predict-gen config)",
                     "hchannels 16,16,5, head 1000", nfn_runs[0]["params"], nfn_step,
                     args.batch / nfn_step))

    print()
    print(f"{'model':<52} {'size':<40} {'params':>9} {'ms/step':>8} {'nets/s':>7} "
          f"{'>= 264':>7}")
    for name, size, n_params, step_s, rate in rows:
        print(f"{name:<52} {size:<40} {n_params:>9} {step_s * 1e3:>8.1f} {rate:>7.0f} "
              f"{'yes' if rate >= REFERENCE else 'no':>7}")
    print(f"{'nfn HNP, figure quoted in the issue (2 CPU cores)':<52} {'':<40} {'':>9} "
          f"{64 / REFERENCE * 1e3:>8.1f} {REFERENCE:>7.0f}")
    print(f"target: graph metanetwork >= {REFERENCE:.0f} networks/s")
    if nfn_step is not None:
        for cfg in cfgs:
            ratio = nfn_step / statistics.median(meds[cfg.key])
            print(f"{cfg.name}: {ratio:.2f}x the nfn HNP throughput measured alongside "
                  f"(per round: " + ", ".join(
                      f"{n['step_s'] / m:.2f}" for n, m in zip(nfn_runs, meds[cfg.key]))
                  + ")")


if __name__ == "__main__":
    main()
