r"""Activations of neuron sets, read from the exported program that the model analysis walked.

[`ActivationTap`][graphspace.merge.activations.ActivationTap] runs a model through the
`torch.export` program of [`graphspace.graphs.analyze`][graphspace.graphs.analyze] (exported again
for each new input shape) and returns, for each requested neuron set of the analysis, its values as
a `[samples, neurons]` matrix (the neuron axis moved last; batch, spatial positions and tokens all
count as samples). The graph node that carries each set, and where its neurons lie, come from the
analysis walk itself, so every set the analysis knows (`Linear`/`Conv` outputs, norms, residual
sums, packed q/k/v, ...) is found without per-architecture code. A set that no traced value carries
is computed from its single incoming dense parameter record, $z = x W^\top + b$; a set with none
(RNN gates) cannot be read.

Values are *pre-activations* (the output of the layer, before its nonlinearity).

[`activation_statistics`][graphspace.merge.activations.activation_statistics] streams per-neuron
means and (co)variances of one or two models over a loader; activation matching, activation-based OT
fusion and REPAIR use them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from graphspace.graphs import ModelAnalysis, analyze
from graphspace.merge._utils import batch_input, iterate, model_device, to_device
from graphspace.merge.spec import node_lookup


def _program_args(model: nn.Module, ep: Any, user: tuple) -> list[Any]:
    """Flat inputs of an exported program: the model's current tensors, then `user`."""
    live: dict[str, Tensor] = dict(model.named_parameters(remove_duplicate=False))
    live.update(dict(model.named_buffers(remove_duplicate=False)))
    it = iter(user)
    args: list[Any] = []
    for spec in ep.graph_signature.input_specs:
        if spec.kind.name == "USER_INPUT":
            args.append(next(it))
        elif spec.target in live:
            args.append(live[spec.target])
        else:
            args.append(ep.constants[spec.target])
    return args


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set[str]) -> None:
        super().__init__(gm)
        self.wanted = wanted
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted:
            self.values[n.name] = out
        return out


class ActivationTap:
    """Pre-activations of neuron sets of `model` on an input batch.

    Args:
        model: the model (used as is: its current weights and train/eval mode).
        sets: neuron-set ids to return (default: every hidden permutable set).
        analysis: the model's analysis (computed if omitted).

    Example:
        >>> tap = ActivationTap(model)            # doctest: +SKIP
        >>> acts = tap(x)                         # {set_id: [samples, neurons]}
    """

    def __init__(self, model: nn.Module, sets: Iterable[int] | None = None,
                 analysis: ModelAnalysis | None = None, skip_unreadable: bool = False) -> None:
        self.model = model
        self.analysis = analysis or analyze(model)
        a = self.analysis
        self.producers = a.producers
        self._programs: dict[Any, tuple[Any, dict]] = {}
        if sets is None:
            sets = [s.id for s in a.sets if s.permutable]
        self.derived: dict[int, tuple[str, Tensor, str | None, Tensor | None]] = {}
        need: set[int] = set()
        readable = []
        for s0 in sets:
            try:
                need |= self._plan(s0)
                readable.append(s0)
            except ValueError:
                if not skip_unreadable:
                    raise
        self.sets = readable
        self._need = need

    def _plan(self, s0: int) -> set[int]:
        """The sets read to compute set `s0` (deriving it from its dense producer if no traced
        value carries it); raises `ValueError` when it cannot be read."""
        need = {s0}
        todo = [s0] if s0 not in self.producers else []
        derived: dict[int, tuple[str, Tensor, str | None, Tensor | None]] = {}
        while todo:
            s = todo.pop()
            if s in self.derived or s in derived:
                continue
            key, rows, bkey, brows, srcs = self._incoming(s)
            derived[s] = (key, rows, bkey, brows)
            for t in srcs:
                need.add(t)
                if t not in self.producers and t not in self.derived and t not in derived:
                    todo.append(t)
        self.derived.update(derived)
        return need

    def _program(self, args: tuple) -> tuple[Any, dict[int, tuple[str, Tensor, Tensor]]]:
        """The exported program for inputs shaped like `args` (export specialises shapes)."""
        key = tuple((tuple(x.shape), x.dtype) if isinstance(x, Tensor) else repr(x)
                    for x in args)
        if key not in self._programs:
            cpu = tuple(x.cpu() if isinstance(x, Tensor) else x for x in args)
            a = analyze(self.model, cpu)
            if a.num_nodes != self.analysis.num_nodes:
                raise ValueError("the model's analysis depends on the input shape; tap it with "
                                 "inputs shaped like the analysis' example input")
            self._programs[key] = (a.program, self._map_producers(a))
        return self._programs[key]

    def _map_producers(self, a: ModelAnalysis) -> dict[int, tuple[str, Tensor, Tensor]]:
        """Producers of this tap's sets read off analysis `a` of the same model (node ids
        agree; the split of nodes into sets may differ with the input's rank)."""
        where: dict[int, tuple[str, int, int]] = {}
        for sid, (name, dim, pos) in a.producers.items():
            for node, p in zip(a.sets[sid].nodes.tolist(), pos.tolist()):
                where.setdefault(node, (name, int(dim[0]), p))
        out: dict[int, tuple[str, Tensor, Tensor]] = {}
        for s in range(len(self.analysis.sets)):
            nodes = self.analysis.sets[s].nodes.tolist()
            got = [where.get(v) for v in nodes]
            if any(g is None for g in got) or len({(g[0], g[1]) for g in got}) != 1:
                continue
            out[s] = (got[0][0], torch.tensor([got[0][1]]), torch.tensor([g[2] for g in got]))
        return out

    def _incoming(self, s: int) -> tuple[str, Tensor, str | None, Tensor | None, list[int]]:
        a = self.analysis
        nodes = a.sets[s].nodes
        incoming = [r for r in a.records if r.kind == "edge" and s in r.dst_sets]
        for r in incoming[:1] if len(incoming) == 1 else []:  # z = x W^T + b, one W only
            if r.spatial or r.groups != 1:
                break
            assert r.dst is not None
            rows = node_lookup(r.dst, a.num_nodes)[nodes]
            bkey, brows = None, None
            for rb in a.records:
                if rb.kind == "node" and rb.column == 0 and rb.nodes is not None and \
                        s in rb.dst_sets:
                    bkey, brows = rb.key, node_lookup(rb.nodes, a.num_nodes)[nodes]
            return r.key, rows, bkey, brows, list(r.src_sets)
        raise ValueError(
            f"no traced value carries neuron set {a.sets[s].name!r} ({a.sets[s].kind}) and it is "
            "not produced by a dense (Linear-like) parameter: its activations cannot be read")

    @torch.no_grad()
    def __call__(self, x: Any) -> dict[int, Tensor]:
        args = x if isinstance(x, tuple) else (x,)
        ep, producers = self._program(args)
        wanted = {producers[s][0] for s in self._need if s in producers}
        for s in self._need:
            if s not in producers and s not in self.derived:
                self.derived[s] = self._incoming(s)[:4]
        for s in list(self.derived):
            for t in self.analysis.record(self.derived[s][0]).src_sets:
                if t in producers:
                    wanted.add(producers[t][0])
        rec = _Recorder(ep.graph_module, wanted)
        rec.run(*_program_args(self.model, ep, args))
        out: dict[int, Tensor] = {}

        def get(s: int) -> Tensor:
            if s in out:
                return out[s]
            size = self.analysis.sets[s].size
            if s in producers:
                name, dim, pos = producers[s]
                v = rec.values[name]
                if isinstance(v, (tuple, list)):
                    v = v[0]
                v = v.movedim(int(dim[0]), -1)
                out[s] = v[..., pos.to(v.device)].reshape(-1, size)
            else:
                key, rows, bkey, brows = self.derived[s]
                r = self.analysis.record(key)
                state = self.model.state_dict()
                w = r.to_canonical(state[key]).reshape(r.canonical_shape[0], -1)
                xs = torch.cat([get(t) for t in r.src_sets], dim=1)
                z = xs @ w[rows.to(w.device)].T
                if bkey is not None and brows is not None:
                    z = z + state[bkey].reshape(-1)[brows.to(w.device)]
                out[s] = z
            return out[s]

        return {s: get(s) for s in self.sets}


@dataclass
class SetStatistics:
    r"""Streaming statistics of one neuron set: per-neuron means and variances of model A (and
    B), and the cross moment $E[a b^\top]$ when two models are tapped."""

    count: int
    mean_a: Tensor
    var_a: Tensor
    mean_b: Tensor | None = None
    var_b: Tensor | None = None
    cross: Tensor | None = None

    @property
    def std_a(self) -> Tensor:
        return self.var_a.clamp_min(0).sqrt()

    @property
    def std_b(self) -> Tensor:
        assert self.var_b is not None
        return self.var_b.clamp_min(0).sqrt()

    def correlation(self, eps: float = 1e-8) -> Tensor:
        r"""Pearson correlation $\mathrm{corr}(a_i, b_j)$ (`[n_A, n_B]`)."""
        assert self.cross is not None and self.mean_b is not None
        cov = self.cross - self.mean_a[:, None] * self.mean_b[None, :]
        return cov / (self.std_a[:, None] * self.std_b[None, :] + eps)

    def squared_distance(self) -> Tensor:
        r"""$E[(a_i - b_j)^2]$ (`[n_A, n_B]`), the activation ground cost of OT fusion."""
        assert self.cross is not None and self.mean_b is not None and self.var_b is not None
        ea2 = self.var_a + self.mean_a ** 2
        eb2 = self.var_b + self.mean_b ** 2
        return ea2[:, None] + eb2[None, :] - 2 * self.cross


@torch.no_grad()
def activation_statistics(
    model_a: nn.Module,
    loader: Iterable,
    sets: Sequence[int] | None = None,
    model_b: nn.Module | None = None,
    num_batches: int | None = None,
    analysis: ModelAnalysis | None = None,
    analysis_b: ModelAnalysis | None = None,
) -> dict[int, SetStatistics]:
    """Per-set activation statistics of `model_a` (and `model_b`, paired sample by sample)
    over the first `num_batches` batches of `loader`. Models are run in their current mode.
    """
    tap_a = ActivationTap(model_a, sets, analysis)
    tap_b = ActivationTap(model_b, tap_a.sets, analysis_b) if model_b is not None else None
    dev_a = model_device(model_a)
    dev_b = model_device(model_b) if model_b is not None else dev_a
    acc: dict[int, list[Any]] = {}
    for batch in iterate(loader, num_batches):
        x = batch_input(batch)
        xa = tap_a(to_device(x, dev_a))
        xb = tap_b(to_device(x, dev_b)) if tap_b is not None else None
        for s, va in xa.items():
            va = va.double()
            st = acc.setdefault(s, [0, 0.0, 0.0, 0.0, 0.0, 0.0])
            st[0] += va.shape[0]
            st[1] = st[1] + va.sum(0)
            st[2] = st[2] + (va * va).sum(0)
            if xb is not None:
                vb = xb[s].double().to(va.device)
                if vb.shape[0] != va.shape[0]:
                    raise ValueError(f"set {s}: models A and B give different sample counts")
                st[3] = st[3] + vb.sum(0)
                st[4] = st[4] + (vb * vb).sum(0)
                st[5] = st[5] + va.T @ vb
    if not acc:
        raise ValueError("the loader yielded no batches")
    out = {}
    for s, (n, sa, sa2, sb, sb2, sab) in acc.items():
        ma = sa / n
        res = SetStatistics(count=n, mean_a=ma, var_a=sa2 / n - ma ** 2)
        if tap_b is not None:
            mb = sb / n
            res.mean_b, res.var_b, res.cross = mb, sb2 / n - mb ** 2, sab / n
        out[s] = res
    return out
