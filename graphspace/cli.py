"""The ``graphspace`` console script.

Subcommands: ``convert`` (checkpoint -> parameter graph file), ``info`` (what the analysis of a
model finds), and, when their packages are present, ``merge``, ``zoo`` and the LightningCLI
subcommands ``fit|validate|test|predict``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _convert(argv: Sequence[str]) -> int:
    from graphspace.graphs import ParameterGraph
    from graphspace.graphs.io import save_graph
    from graphspace.io import build_model, load_state_dict

    p = argparse.ArgumentParser(prog="graphspace convert",
                                description="Convert a checkpoint into a parameter-graph file.")
    p.add_argument("checkpoint", nargs="?", help="state dict (.safetensors or torch.save)")
    p.add_argument("--model", required=True, help="model factory, package.module:Factory")
    p.add_argument("--model-kwargs", default="{}", help="JSON keyword arguments of the factory")
    p.add_argument("--kernel", default="edge", choices=["edge", "channel"])
    p.add_argument("-o", "--output", required=True, help="output .safetensors graph file")
    a = p.parse_args(argv)
    model = build_model(a.model, json.loads(a.model_kwargs))
    if a.checkpoint:
        model.load_state_dict(load_state_dict(a.checkpoint))
    g = ParameterGraph.from_module(model, kernel=a.kernel)
    save_graph(g, a.output, {"graphspace.model": a.model})
    print(f"wrote {a.output}: {g.num_nodes} nodes, {g.num_edges} edges "
          f"({g.num_param_edges} parameter edges)")
    return 0


def _info(argv: Sequence[str]) -> int:
    from graphspace.graphs import analyze, permutation_groups, scaling_symmetries
    from graphspace.io import build_model

    p = argparse.ArgumentParser(prog="graphspace info",
                                description="Show the neuron sets and symmetries of a model.")
    p.add_argument("--model", required=True, help="model factory, package.module:Factory")
    p.add_argument("--model-kwargs", default="{}")
    a = p.parse_args(argv)
    model = build_model(a.model, json.loads(a.model_kwargs))
    an = analyze(model)
    print(f"{an.num_nodes} neurons in {len(an.sets)} sets, {len(an.records)} state-dict entries")
    for g in permutation_groups(an):
        heads = f", {g.num_heads} heads" if g.num_heads else ""
        print(f"  permutation group {g.name}: {g.size} neurons x {len(g.sets)} sets{heads}")
    for sid, kind in scaling_symmetries(an).items():
        print(f"  {kind} rescaling: {an.sets[sid].name}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from graphspace.runtime import tune_cpu_allocator, tuning_enabled

    if tuning_enabled():  # a launcher-level setting: see graphspace.runtime
        tune_cpu_allocator()
    commands = {"convert": _convert, "info": _info}
    try:
        from graphspace.merge.cli import main as merge_main

        commands["merge"] = merge_main
    except ImportError:
        pass
    try:
        from graphspace.zoo_cli import main as zoo_main

        commands["zoo"] = zoo_main
    except ImportError:
        pass
    lightning_cmds = ("fit", "validate", "test", "predict")
    try:
        from graphspace.tasks.cli import main as lightning_main
    except ImportError:
        lightning_main = None
    if not argv or argv[0] in ("-h", "--help"):
        names = sorted(commands) + (list(lightning_cmds) if lightning_main else [])
        print("usage: graphspace {" + ",".join(names) + "} ...")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in lightning_cmds and lightning_main is not None:
        return int(lightning_main(argv) or 0)
    if cmd not in commands:
        print(f"graphspace: unknown command {cmd!r}", file=sys.stderr)
        return 2
    return int(commands[cmd](rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
