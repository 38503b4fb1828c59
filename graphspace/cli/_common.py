"""What every `graphspace` subcommand shares: one-line errors, optional-dependency checks,
model specs in the configs' `class_path`/`init_args` syntax, validated checkpoint loading.

Nothing here imports torch at module level, so that `graphspace --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import warnings
from typing import Any, NoReturn

DIST = "graphspace-weights"
"""The distribution name on the package index (the import name is `graphspace`)."""

# import name -> (package to install, extra of graphspace that brings it)
EXTRAS: dict[str, tuple[str, str]] = {
    "sklearn": ("scikit-learn", "data"),
    "mlxtend": ("mlxtend", "data"),
    "ot": ("POT", "merge"),
    "matplotlib": ("matplotlib", "merge"),
    "torch_scatter": ("torch-scatter", "scatter"),
    "triton": ("triton", "triton"),
    "transformers": ("transformers", "dev"),
    "tensorboard": ("tensorboard", "dev"),
}


class CLIError(Exception):
    """A bad command-line input; printed as one line `graphspace <cmd>: error: ...`."""


def missing_extra_message(module: str) -> str | None:
    """`"scikit-learn is needed: pip install 'graphspace-weights[data]'"` for a known optional
    dependency, else `None`."""
    top = module.split(".")[0]
    if top not in EXTRAS:
        return None
    pkg, extra = EXTRAS[top]
    return f"{pkg} is needed: pip install '{DIST}[{extra}]'"


def require(module: str) -> None:
    """Raise `CLIError` naming the extra to install when `module` is not importable."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ValueError, ImportError):  # a module blocked in sys.modules, a broken parent
        found = False
    if not found:
        raise CLIError(missing_extra_message(module) or f"the package {module!r} is needed")


class Parser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose usage errors are one line (`prog: error: ...`)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_mapping(text: str, what: str) -> dict[str, Any]:
    """A JSON or YAML mapping given on the command line (or `@file.yaml`)."""
    import yaml

    if text.startswith("@"):
        try:
            with open(text[1:]) as f:
                text = f.read()
        except OSError as e:
            raise CLIError(f"{what}: cannot read {text[1:]!r}: {e.strerror}") from None
    try:
        value = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as e:
        line = str(e).strip().splitlines()[0]
        raise CLIError(f"{what}: expected a JSON/YAML mapping, got {text!r} ({line})") from None
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise CLIError(f"{what}: expected a JSON/YAML mapping, got {type(value).__name__} "
                       f"{text!r}")
    return value


def add_model_arguments(p: argparse.ArgumentParser, per_checkpoint: bool = False) -> None:
    """`--model CLASS_PATH|MAPPING|FILE`, `--init-args MAPPING` (and the deprecated
    `--model-kwargs JSON`)."""
    p.add_argument("--model", required=True, metavar="MODEL",
                   help="the model as in the configs: a class path (package.module.Class or "
                        "package.module:factory), a mapping '{class_path: ..., init_args: "
                        "{...}}' or a YAML file holding one")
    p.add_argument("--init-args", action="append" if per_checkpoint else "store",
                   default=None, metavar="MAPPING",
                   help="init_args of the model as a JSON/YAML mapping (or @file.yaml)"
                        + ("; give it once for all checkpoints or once per checkpoint"
                           if per_checkpoint else ""))
    p.add_argument("--model-kwargs", action="append" if per_checkpoint else "store",
                   default=None, metavar="JSON", help=argparse.SUPPRESS)


def model_specs(a: argparse.Namespace, n: int = 1) -> list[dict[str, Any]]:
    """`n` mappings `{"class_path": ..., "init_args": {...}}` from the parsed arguments."""
    import yaml

    text = a.model
    if os.path.isfile(text) and text.endswith((".yaml", ".yml", ".json")):
        with open(text) as f:
            base = yaml.safe_load(f)
        if isinstance(base, dict) and "model" in base and "class_path" not in base:
            base = base["model"]
        if not isinstance(base, dict) or "class_path" not in base:
            raise CLIError(f"--model: {text!r} holds no 'class_path' mapping")
    elif text.lstrip().startswith("{"):
        base = parse_mapping(text, "--model")
        if "class_path" not in base:
            raise CLIError(f"--model: the mapping needs 'class_path', got keys {sorted(base)}")
    else:
        base = {"class_path": text, "init_args": {}}
    extra = set(base) - {"class_path", "init_args"}
    if extra:
        raise CLIError(f"--model: unexpected keys {sorted(extra)} (expected class_path, "
                       "init_args)")
    given = a.init_args
    if a.model_kwargs is not None:
        warnings.warn("--model-kwargs is deprecated and will be removed in the next release; "
                      "use --init-args (the same JSON, or YAML)", FutureWarning, stacklevel=2)
        old = a.model_kwargs
        given = (given or []) + old if isinstance(old, list) else old
    if given is None:
        given = []
    elif isinstance(given, str):
        given = [given]
    parsed = [parse_mapping(t, "--init-args") for t in given]
    if len(parsed) not in (0, 1, n):
        raise CLIError(f"--init-args given {len(parsed)} times for {n} checkpoints (expected "
                       f"once, or once per checkpoint)")
    if not parsed:
        parsed = [{}]
    parsed = parsed * n if len(parsed) == 1 else parsed
    return [{"class_path": base["class_path"],
             "init_args": {**(base.get("init_args") or {}), **p}} for p in parsed]


def build(spec: dict[str, Any]) -> Any:
    """The model of a spec; bad class paths and arguments become one-line `CLIError`s."""
    from graphspace.io import build_model

    try:
        return build_model(spec)
    except (ValueError, TypeError) as e:
        raise CLIError(f"--model: {e}") from None


def _common_prefix(keys: list[str], want: set[str]) -> str | None:
    """The prefix (e.g. `model.`) that, removed from every key, gives the model's keys."""
    firsts = {k.split(".", 1)[0] for k in keys if "." in k}
    for f in sorted(firsts):
        pre = f + "."
        stripped = {k[len(pre):] for k in keys if k.startswith(pre)}
        if want and want <= stripped:
            return pre
    return None


def load_checkpoint(path: str, model: Any, *, key: str | None = None, strip_prefix: str = "",
                    allow_nonfinite: bool = False, label: str = "") -> dict[str, Any]:
    """Load, check and return the state dict of `path` for `model`.

    Checks, in order, each failing with one line that names the file: readable and a state
    dict (`graphspace.io.load_state_dict`); the architecture (first differing tensor, with a
    `--strip-prefix` hint for Lightning/wrapper checkpoints); dtypes (integer or boolean values
    for floating-point parameters are refused, other floating-point dtypes are cast to the
    model's with a warning); NaN/Inf (refused unless `allow_nonfinite`).
    """
    import torch

    from graphspace.graphs import ArchitectureMismatchError, analyze, check_state_dict
    from graphspace.graphs.parameter_graph import non_finite_keys
    from graphspace.io import load_state_dict

    name = f"{label}'{path}'" if label else f"'{path}'"
    sd = load_state_dict(path, key)
    if strip_prefix:
        sd = {k[len(strip_prefix):] if k.startswith(strip_prefix) else k: v
              for k, v in sd.items()}
    own = model.state_dict()
    try:
        check_state_dict(sd, analyze(model))
        missing = [k for k in own if k not in sd]
        if missing:
            raise ArchitectureMismatchError(f"missing tensor '{missing[0]}'")
    except ArchitectureMismatchError as e:
        hint = ""
        pre = _common_prefix(list(sd), set(own))
        if pre:
            hint = f"; its keys start with '{pre}': pass --strip-prefix {pre}"
        raise CLIError(f"checkpoint {name} does not fit {type(model).__name__}: {e}{hint}") \
            from None
    cast = []
    for k in own:  # the model's order: the first tensor named is the model's first
        v = sd[k]
        want = own[k].dtype
        if v.dtype == want:
            continue
        if want.is_floating_point and not v.is_floating_point():
            raise CLIError(f"checkpoint {name}: tensor '{k}' is {str(v.dtype)[6:]}, the model's "
                           f"is {str(want)[6:]} (integer checkpoints are refused)")
        if want.is_floating_point:
            cast.append((k, v.dtype))
            sd[k] = v.to(want)
        elif v.dtype != want:
            sd[k] = v.to(want)
    if cast:
        kinds = sorted({str(d)[6:] for _, d in cast})
        print(f"graphspace: warning: checkpoint {name}: {len(cast)} tensors stored as "
              f"{'/'.join(kinds)} were cast to the model's dtype (first: '{cast[0][0]}')",
              file=sys.stderr)
    if not allow_nonfinite:
        bad = non_finite_keys(sd)
        if bad:
            from graphspace.graphs import NonFiniteWeightError

            first = sd[bad[0]]
            n_bad = int((~torch.isfinite(first)).sum())
            raise NonFiniteWeightError(
                f"checkpoint {name}: NaN or Inf in tensor '{bad[0]}' ({n_bad} entries)"
                + (f" and {len(bad) - 1} more tensors" if len(bad) > 1 else "")
                + "; pass --allow-nonfinite to merge it anyway")
    return sd


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)
