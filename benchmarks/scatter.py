"""Fused aggregation benchmark: graphspace.ops vs eager PyG, torch.compile, torch-scatter, spmm.

Times one message-passing aggregation on a random graph, forward and forward+backward
(gradients for every floating input), all methods side by side in one process, timed
round-robin so that they see the same machine conditions. Ops (``--op``):

* ``scalar``   (default) ``out_i = sum_j w_ji x_j``, one weight per edge
* ``channel``  per-channel edge weights ``w_ji (.) x_j``
* ``max``      ``max_j w_ji x_j``
* ``egnn``     ``sum_j phi_ji (p_i - p_j)`` on 3-D coordinates (``F`` is ignored)
* ``sheaf``    ``sum_j F_ji x_j`` with 4 x 4 maps on ``(N, 4, F / 4)`` stalk features
* ``scatter``  plain reduction of an ``E x F`` tensor (``--reduce sum|mean|max``)

Methods: graphspace (layout cached, as in a multi-layer network; and including the sort, as on a
new graph), eager PyG (``MessagePassing`` / ``torch_geometric.utils.scatter``), ``torch.compile``
of the gather-message-scatter code, ``torch_scatter`` on materialised messages (if installed),
a prebuilt sparse product (CSR/BSR: ``torch.sparse`` on CPU, cuSPARSE on CUDA) where the op is
one, and the bandwidth floor: compulsory bytes (indices, edge values, node features read once,
outputs written once) over the device's measured copy bandwidth.

Run (GPU, the issue's sizes)::

    python benchmarks/scatter.py --device cuda

Run (CPU, smaller sizes)::

    python benchmarks/scatter.py --device cpu --threads 2 --sizes 100k,1M,64 --op scalar
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch_geometric.nn import MessagePassing
from torch_geometric.utils import scatter as pyg_scatter

from graphspace import ops

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
DEFAULT_SIZES = ["100k,1M,64", "1M,10M,64", "1M,10M,128"]
OPS = ["scalar", "channel", "max", "egnn", "sheaf", "scatter"]
STALK = 4
STAT = "median"

Fn = Callable[..., Tensor]


def parse_size(text: str) -> tuple[int, int, int]:
    def num(s: str) -> int:
        s = s.strip().lower()
        mult = {"k": 1_000, "m": 1_000_000}.get(s[-1], 1)
        return int(float(s[:-1] if mult > 1 else s) * mult)

    n, e, f = (num(p) for p in text.split(","))
    return n, e, f


# ------------------------------------------------------------------- eager PyG reference layers

class WeightedConv(MessagePassing):
    """``w_ji x_j`` (scalar or per-channel ``w``) or ``gate_ji (.) x_j``; messages materialised."""

    def __init__(self, aggr: str) -> None:
        super().__init__(aggr=aggr)

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor) -> Tensor:
        return self.propagate(edge_index, x=x, edge_weight=edge_weight, size=(x.size(0),) * 2)

    def message(self, x_j: Tensor, edge_weight: Tensor) -> Tensor:
        return x_j * (edge_weight.unsqueeze(-1) if edge_weight.dim() == 1 else edge_weight)


class CoordConv(MessagePassing):
    """EGNN coordinate messages ``(p_i - p_j) phi_ji``."""

    def __init__(self) -> None:
        super().__init__(aggr="sum")

    def forward(self, pos: Tensor, edge_index: Tensor, coef: Tensor) -> Tensor:
        return self.propagate(edge_index, pos=pos, coef=coef, size=(pos.size(0),) * 2)

    def message(self, pos_i: Tensor, pos_j: Tensor, coef: Tensor) -> Tensor:
        return (pos_i - pos_j) * coef.unsqueeze(-1)


class BlockConv(MessagePassing):
    """Sheaf messages ``F_ji x_j`` on ``(N, d, C)`` features."""

    def __init__(self) -> None:
        super().__init__(aggr="sum", node_dim=0)

    def forward(self, x: Tensor, edge_index: Tensor, maps: Tensor) -> Tensor:
        return self.propagate(edge_index, x=x, maps=maps, size=(x.size(0),) * 2)

    def message(self, x_j: Tensor, maps: Tensor) -> Tensor:
        return torch.bmm(maps, x_j)


# ------------------------------------------------------------------------------------- problems

@dataclass
class Problem:
    inputs: list[Tensor]
    ours: Fn
    pyg: Fn
    plain: Fn  # gather -> message -> scatter in plain torch (what torch.compile gets)
    message: Fn  # the E x F messages, for torch_scatter
    reduce: str
    dst: Tensor
    sparse: tuple[str, Fn, list[Tensor]] | None = None
    floor: tuple[int, int] = (0, 0)
    notes: dict[str, str] = field(default_factory=dict)


def _plain_reduce(msg: Tensor, dst: Tensor, n: int, reduce: str) -> Tensor:
    shape = (n,) + tuple(msg.shape[1:])
    if reduce == "sum":
        return msg.new_zeros(shape).index_add(0, dst, msg)
    idx = dst.view((-1,) + (1,) * (msg.dim() - 1)).expand_as(msg)
    red = {"max": "amax", "mean": "mean"}[reduce]
    return msg.new_zeros(shape).scatter_reduce(0, idx, msg, red, include_self=False)


def _csr(dst: Tensor, cols: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    perm = torch.argsort(dst, stable=True)
    ptr = torch.zeros(n + 1, dtype=torch.long, device=dst.device)
    ptr[1:] = torch.bincount(dst, minlength=n).cumsum(0)
    return perm, ptr, cols[perm]


def make_problem(op: str, n: int, e: int, f: int, device: torch.device, reduce: str,
                 seed: int = 0) -> Problem:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, uniform: bool = False) -> Tensor:
        t = torch.rand(*shape, generator=g) if uniform else torch.randn(*shape, generator=g)
        return t.to(device)

    ei = torch.randint(0, n, (2, e), generator=g).to(device)
    src, dst = ei[0], ei[1]
    idx = 2 * 8 * e
    if op in ("scalar", "channel", "max"):
        red = "max" if op == "max" else "sum"
        x = rnd(n, f)
        w = rnd(e, uniform=True) if op != "channel" else rnd(e, f, uniform=True)
        conv = WeightedConv(red)
        wb = w.numel() * 4

        def msg_w(x: Tensor, w: Tensor) -> Tensor:
            return x.index_select(0, src) * (w.unsqueeze(-1) if w.dim() == 1 else w)

        p = Problem(
            [x, w], lambda x, w: ops.weighted_aggregate(x, ei, w, n, red),
            lambda x, w: conv(x, ei, w),
            lambda x, w: _plain_reduce(msg_w(x, w), dst, n, red), msg_w, red, dst,
            floor=(idx + wb + 8 * n * f, 2 * idx + 3 * wb + 20 * n * f))
        if op != "channel" and not (op == "max" and device.type != "cpu"):
            perm, ptr, col = _csr(dst, src, n)

            def spmm(x: Tensor, w_sorted: Tensor) -> Tensor:
                a = torch.sparse_csr_tensor(ptr, col, w_sorted, (n, n), check_invariants=False)
                return torch.sparse.mm(a, x, "amax") if op == "max" else torch.sparse.mm(a, x)

            kind = "cuSPARSE" if device.type == "cuda" else "torch.sparse"
            p.sparse = (f"sparse CSR spmm ({kind}, prebuilt)", spmm, [x, w[perm]])
        return p
    if op == "egnn":
        pos, coef = rnd(n, 3), rnd(e)
        conv_c = CoordConv()

        def msg_c(pos: Tensor, coef: Tensor) -> Tensor:
            return (pos.index_select(0, dst) - pos.index_select(0, src)) * coef.unsqueeze(-1)

        return Problem(
            [pos, coef], lambda p, c: ops.egnn_coord_aggregate(p, ei, c),
            lambda p, c: conv_c(p, ei, c),
            lambda p, c: _plain_reduce(msg_c(p, c), dst, n, "sum"), msg_c, "sum", dst,
            floor=(idx + 4 * e + 24 * n, 2 * idx + 12 * e + 60 * n))
    if op == "sheaf":
        c = max(f // STALK, 1)
        x, maps = rnd(n, STALK, c), rnd(e, STALK, STALK)
        conv_b = BlockConv()

        def msg_b(x: Tensor, maps: Tensor) -> Tensor:
            return torch.bmm(maps, x.index_select(0, src))

        p = Problem(
            [x, maps], lambda x, m: ops.sheaf_aggregate(x, ei, m, n),
            lambda x, m: conv_b(x, ei, m),
            lambda x, m: _plain_reduce(msg_b(x, m), dst, n, "sum"), msg_b, "sum", dst,
            floor=(idx + 64 * e + 8 * n * STALK * c, 2 * idx + 192 * e + 20 * n * STALK * c))
        perm, ptr, col = _csr(dst, src, n)

        def bsr(x: Tensor, maps_sorted: Tensor) -> Tensor:
            a = torch.sparse_bsr_tensor(ptr, col, maps_sorted, (n * STALK, n * STALK),
                                        check_invariants=False)
            return (a @ x.reshape(n * STALK, -1)).view(n, STALK, -1)

        p.sparse = ("sparse BSR spmm (prebuilt)", bsr, [x, maps[perm]])
        return p
    if op == "scatter":
        msg = rnd(e, f)

        def ident(m: Tensor) -> Tensor:
            return m

        p = Problem(
            [msg], lambda m: ops.scatter(m, dst, 0, n, reduce),
            lambda m: pyg_scatter(m, dst, 0, n, reduce),
            lambda m: _plain_reduce(m, dst, n, reduce), ident, reduce, dst,
            floor=(8 * e + 4 * e * f + 4 * n * f, 16 * e + 8 * e * f + 8 * n * f))
        if reduce in ("sum", "mean") or device.type == "cpu":
            perm, ptr, _ = _csr(dst, dst, n)

            def spmm_s(m: Tensor) -> Tensor:
                a = torch.sparse_csr_tensor(ptr, perm, torch.ones_like(m[:, 0]), (n, e),
                                            check_invariants=False)
                return torch.sparse.mm(a, m, {"max": "amax"}.get(reduce, reduce))

            p.sparse = ("sparse CSR spmm (N x E ones, prebuilt)", spmm_s, [msg])
        return p
    raise ValueError(op)


# ----------------------------------------------------------------------------------- timing

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def summarise(times: list[float]) -> float:
    """The median, or with ``--stat min`` the minimum (the better estimate of the uncontended
    time on a machine shared with other jobs)."""
    return min(times) if STAT == "min" else statistics.median(times)


def bench_interleaved(fns: dict[str, Callable[[], object]], device: torch.device,
                      repeat: int) -> dict[str, float | str]:
    """Warm every function up, then time them round-robin; failures are reported, not timed."""
    times: dict[str, list[float]] = {}
    failed: dict[str, str] = {}
    for name, fn in fns.items():
        try:
            fn()
            times[name] = []
        except (RuntimeError, torch.OutOfMemoryError) as err:
            failed[name] = "failed: " + str(err).splitlines()[0][:60]
        gc.collect()
    for _ in range(repeat):
        for name in times:
            times[name].append(_timed(fns[name], device))
    return {**{k: summarise(v) for k, v in times.items()}, **failed}


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    n = 64 * 2**20 if device.type == "cpu" else 512 * 2**20
    a = torch.empty(n // 4, dtype=torch.float32, device=device).uniform_()
    b = torch.empty_like(a)
    b.copy_(a)
    ms = min(_timed(lambda: b.copy_(a), device) for _ in range(9))
    return 2 * n / (ms / 1e3)


Row = tuple[str, float | None, float | None, str]


def run_size(op: str, n: int, e: int, f: int, device: torch.device, repeat: int,
             bandwidth: float, skip: set[str], reduce: str) -> list[Row]:
    """Time every method on one problem size; rows of (method, fwd ms, fwd+bwd ms, note)."""
    p = make_problem(op, n, e, f, device, reduce)

    def cold(*args: Tensor) -> Tensor:
        ops.clear_layout_cache()
        return p.ours(*args)

    methods: dict[str, tuple[Fn, list[Tensor]] | None] = {
        "graphspace (cached layout)": (p.ours, p.inputs),
        "graphspace (incl. sort)": (cold, p.inputs),
        "eager PyG": (p.pyg, p.inputs),
        "torch.compile (gather-message-scatter)": (torch.compile(p.plain, dynamic=False),
                                                   p.inputs),
        "torch-scatter (materialised)": None,
        "sparse product": None,
    }
    notes = {"torch-scatter (materialised)": "not installed",
             "sparse product": "not applicable to this op"}
    if importlib.util.find_spec("torch_scatter") is not None:
        import torch_scatter

        def ts(*args: Tensor) -> Tensor:
            return torch_scatter.scatter(p.message(*args), p.dst, 0, dim_size=n,
                                         reduce=p.reduce)

        methods["torch-scatter (materialised)"] = (ts, p.inputs)
    if p.sparse is not None:
        name, fn, inputs = p.sparse
        del methods["sparse product"]
        methods[name] = (fn, inputs)
        # torch's CSR/BSR backward coalesces repeated (row, col) entries and then rejects its
        # own value gradient, so the sparse baselines differentiate the node features only
        notes[name] = "bwd: grad of node features only"
    fwd_fns: dict[str, Callable[[], object]] = {}
    bwd_fns: dict[str, Callable[[], object]] = {}
    for name, spec in methods.items():
        if spec is None:
            continue
        if any(s in name for s in skip):
            notes[name] = "skipped (--skip)"
            continue
        fn, inputs = spec
        sparse_baseline = name not in ("graphspace (cached layout)", "graphspace (incl. sort)",
                                       "eager PyG", "torch.compile (gather-message-scatter)",
                                       "torch-scatter (materialised)")
        leaves = [t.detach().requires_grad_(not (sparse_baseline and i > 0))
                  for i, t in enumerate(inputs)]

        def fwd(fn=fn, inputs=inputs):
            with torch.no_grad():
                return fn(*inputs)

        def fwd_bwd(fn=fn, leaves=leaves):
            out = fn(*leaves)
            out.backward(torch.ones_like(out))
            for t in leaves:
                t.grad = None

        fwd_fns[name], bwd_fns[name] = fwd, fwd_bwd
    t_fwd = bench_interleaved(fwd_fns, device, repeat)
    t_bwd = bench_interleaved(bwd_fns, device, repeat)
    rows: list[Row] = []
    for name in methods:
        a, b = t_fwd.get(name), t_bwd.get(name)
        note = notes.get(name, "")
        for v in (a, b):
            if isinstance(v, str):
                note = v
        rows.append((name, a if isinstance(a, float) else None,
                     b if isinstance(b, float) else None, note))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rows.append(("bandwidth floor (compulsory bytes / copy BW)", p.floor[0] / bandwidth * 1e3,
                 (p.floor[0] + p.floor[1]) / bandwidth * 1e3, ""))
    return rows


def _fmt(t: float | None) -> str:
    return f"{t:10.2f}" if t is not None else f"{'n/a':>10s}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES,
                   help="N,E,F triples with k/M suffixes, e.g. 100k,1M,64")
    p.add_argument("--op", choices=OPS, default="scalar")
    p.add_argument("--reduce", choices=["sum", "mean", "max"], default="sum",
                   help="reduction of --op scatter")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--stat", choices=["median", "min"], default="median",
                   help="summary of the repeated timings")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--skip", nargs="*", default=[],
                   help="skip methods whose name contains one of these strings")
    args = p.parse_args()
    global STAT
    STAT = args.stat
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bw = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"machine: {platform.machine()} {name or ''}, torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}, device={device}, "
          f"graphspace backend={ops.resolve_backend(device, 'weighted_aggregate')}, "
          f"copy bandwidth {bw / 1e9:.1f} GB/s")
    what = f"{args.op}" + (f" ({args.reduce})" if args.op == "scatter" else "")
    print(f"op: {what}, float32, {args.stat} of {args.repeat} interleaved runs, times in ms; "
          "speed-up = eager PyG time / method time")
    for size in args.sizes:
        n, e, f = parse_size(size)
        print(f"\nN={n:,} E={e:,} F={f}")
        print(f"{'method':46s} {'forward':>10s} {'fwd+bwd':>10s} {'speed-up':>17s}")
        rows = run_size(args.op, n, e, f, device, args.repeat, bw, set(args.skip), args.reduce)
        ref = next((r for r in rows if r[0] == "eager PyG"), None)
        for method, t_f, t_fb, note in rows:
            speed = ""
            if ref is not None and ref[1] and t_f and ref[2] and t_fb:
                speed = f"{ref[1] / t_f:6.2f}x {ref[2] / t_fb:6.2f}x"
            print(f"{method:46s} {_fmt(t_f)} {_fmt(t_fb)} {speed:>17s} {note}")


if __name__ == "__main__":
    main()
