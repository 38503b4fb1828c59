"""`graphspace convert`: a checkpoint -> a parameter-graph file."""

from __future__ import annotations

import argparse
import os

from graphspace.cli._common import (
    CLIError,
    add_model_arguments,
    build,
    load_checkpoint,
    model_specs,
)

NAME = "convert"
HELP = "convert a checkpoint into a parameter-graph file (safetensors)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?",
                   help="state dict (.safetensors or torch.save); without it the model's "
                        "initial weights are converted")
    add_model_arguments(p)
    p.add_argument("--kernel", default="edge", choices=["edge", "channel"])
    p.add_argument("--key", default=None, help="entry of the checkpoint holding the state dict")
    p.add_argument("--strip-prefix", default="",
                   help="remove this prefix from checkpoint keys (e.g. 'model.' for Lightning)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="convert weights holding NaN or Inf (refused by default)")
    p.add_argument("-o", "--output", required=True, help="output .safetensors graph file")


def run(a: argparse.Namespace) -> int:
    if not a.output.endswith(".safetensors"):
        raise CLIError(f"--output must end with .safetensors, got {a.output!r}")
    out_dir = os.path.dirname(os.path.abspath(a.output))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CLIError(f"--output: {out_dir!r} is not a directory")
    (spec,) = model_specs(a)
    model = build(spec)
    if a.checkpoint:
        sd = load_checkpoint(a.checkpoint, model, key=a.key, strip_prefix=a.strip_prefix,
                             allow_nonfinite=a.allow_nonfinite)
        model.load_state_dict(sd)
    from graphspace.graphs import ParameterGraph
    from graphspace.graphs.io import save_graph

    g = ParameterGraph.from_module(model, kernel=a.kernel,
                                   check_finite=not a.allow_nonfinite)
    save_graph(g, a.output, {"graphspace.model": spec["class_path"]})
    print(f"wrote {a.output}: {g.num_nodes} nodes, {g.num_edges} edges "
          f"({g.num_param_edges} parameter edges)")
    return 0
