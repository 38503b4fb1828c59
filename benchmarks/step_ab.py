"""Benchmark: the metanetwork's training step, this checkout against an older revision.

Run: ``python benchmarks/step_ab.py --base 6fb9871 [--config main] [--rounds 4]``

The older revision is checked out into a temporary git worktree; each measurement runs in a
fresh process with that tree (or this one) first on ``PYTHONPATH``, in alternating rounds:
old, new, new with the layers' input validation switched off. One measurement is the median
of 15 training steps (``zero_grad`` + forward + backward + ``Adam.step``) of
``GraphMetaNetwork`` on 32 Small CNN Zoo graphs collated into one batch, after 5 warm-up
steps. ``--config main`` is the main job's model (``kernel="channel"``, hidden 32, 3 layers);
``defaults_channel`` / ``defaults_edge`` are the constructor defaults on either kernel.
Prints the medians over rounds and the ratios new/old and (validation on)/(off).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _measure(cfg: str, validate: bool) -> float:
    import torch
    from torch_geometric.data import Batch

    from graphspace.graphs import ParameterGraph
    from graphspace.nn import GraphMetaNetwork
    from graphspace.runtime import tune_cpu_allocator
    from graphspace.testing.models import SmallCNN

    torch.set_num_threads(2)
    tune_cpu_allocator()
    try:  # absent in revisions older than the validation layer
        from graphspace.nn.validation import set_validation

        set_validation(validate)
    except ImportError:
        pass
    torch.manual_seed(0)
    kernel = "edge" if cfg == "defaults_edge" else "channel"
    batch = Batch.from_data_list([ParameterGraph.from_module(SmallCNN(), kernel=kernel)
                                  for _ in range(32)])
    width = batch.edge_attr.shape[1]
    model = (GraphMetaNetwork(1, hidden_channels=32, num_layers=3, edge_in=width)
             if cfg == "main" else GraphMetaNetwork(1, edge_in=width))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    y = torch.randn(32, 1)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = ((model(batch).reshape(-1, 1) - y) ** 2).mean()
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    times = []
    for _ in range(15):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _run(root: Path, cfg: str, validate: bool) -> float:
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, __file__, "--child", cfg, str(int(validate))],
                         env=env, cwd=root, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--base", help="git revision to compare against")
    p.add_argument("--config", default="main",
                   choices=["main", "defaults_channel", "defaults_edge"])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(_measure(a.child[0], a.child[1] == "1")))
        return
    if not a.base:
        p.error("--base REV is required")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), a.base],
                       cwd=ROOT, check=True)
        try:
            runs: dict[str, list[float]] = {"old": [], "new": [], "new_noval": []}
            for _ in range(a.rounds):
                runs["old"].append(_run(base, a.config, True))
                runs["new"].append(_run(ROOT, a.config, True))
                runs["new_noval"].append(_run(ROOT, a.config, False))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT,
                           check=False)
    old, new, noval = (statistics.median(runs[k]) for k in ("old", "new", "new_noval"))
    print(f"config {a.config}, {a.rounds} alternating rounds (medians), base {a.base}")
    print(f"  old {old * 1e3:.1f} ms   new {new * 1e3:.1f} ms   new/old {new / old:.3f}")
    print(f"  validation cost {(new - noval) / noval * 100:+.1f} %")


if __name__ == "__main__":
    main()
