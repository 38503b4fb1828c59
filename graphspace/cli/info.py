"""`graphspace info`: what the analysis of a model finds."""

from __future__ import annotations

import argparse

from graphspace.cli._common import add_model_arguments, build, model_specs

NAME = "info"
HELP = "show the neuron sets and symmetries (permutation, rescaling) of a model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)


def run(a: argparse.Namespace) -> int:
    from graphspace.graphs import analyze, permutation_groups, scaling_symmetries

    (spec,) = model_specs(a)
    an = analyze(build(spec))
    print(f"{an.num_nodes} neurons in {len(an.sets)} sets, {len(an.records)} state-dict entries")
    for g in permutation_groups(an):
        heads = f", {g.num_heads} heads" if g.num_heads else ""
        print(f"  permutation group {g.name}: {g.size} neurons x {len(g.sets)} sets{heads}")
    for sid, kind in scaling_symmetries(an).items():
        print(f"  {kind} rescaling: {an.sets[sid].name}")
    return 0
