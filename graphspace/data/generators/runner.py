r"""Resumable, shardable, parallel execution of zoo generators.

A zoo is a deterministic *plan* of chunks (groups of networks) derived from its *recipe* (every
setting, the seed and a fingerprint of the data). Running a zoo trains the chunks of one shard
(`chunk.index % n == i` for `--shard i/n`) in worker processes, writes each finished chunk
atomically (temporary file + `os.replace`) to `<out>/work/chunks/` and records it in the
shard's manifest; a killed run loses at most the chunks in flight and leaves no partial file
under its final name. When every chunk of the plan is present (all shards wrote to one
directory, or `merge_zoo` gathered them) the zoo is *finalised*: its files are written, in
the format of the zoo kind, to `<out>/raw/` so that the matching dataset class reads
`root=<out>` directly.

Chunks always run with one intra-op thread, so results do not depend on the number of workers
or shards: a sharded and merged zoo is bit-identical to one built in a single run.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graphspace.data._io import save_torch
from graphspace.data._io import write_file as atomic_write

__all__ = ["Chunk", "ZooConfigError", "ZooJob", "ZooStatus", "merge_zoo", "parse_shard",
           "run_zoo", "zoo_status"]


class ZooConfigError(RuntimeError):
    """An output directory holds (part of) a zoo with a different recipe."""


@dataclass
class Chunk:
    """Networks trained together: `members` are their indices in the zoo; `payload` holds
    what the worker needs (e.g. their hyper-parameters), JSON-able."""

    index: int
    members: list[int]
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass
class ZooStatus:
    """Outcome of a run: `complete` when the zoo was finalised."""

    out: Path
    complete: bool
    chunks_done: int
    chunks_total: int
    members_done: int
    members_total: int
    seconds: float
    missing: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        state = "complete" if self.complete else f"{len(self.missing)} chunks missing"
        return (f"{self.out}: {self.members_done}/{self.members_total} networks, "
                f"{self.chunks_done}/{self.chunks_total} chunks ({state}), "
                f"{self.seconds:.1f} s")


class ZooJob:
    """A zoo kind: its recipe, plan, chunk computation and output format."""

    kind = "zoo"

    def recipe(self) -> dict[str, Any]:
        raise NotImplementedError

    def plan(self) -> list[Chunk]:
        """The chunks; a function of the recipe only (so shards agree)."""
        return self.plan_from_recipe(self.recipe())

    def run_chunk(self, chunk: Chunk) -> dict[str, Any]:
        """Compute one chunk (in a worker process); returns tensors / JSON-able values."""
        raise NotImplementedError

    def chunk_cost(self, chunk: Chunk) -> float:
        """Relative cost of a chunk; the most expensive chunks are started first."""
        return float(len(chunk.members))

    @classmethod
    def finalize(cls, out: Path, recipe: dict[str, Any], plan: Sequence[Chunk],
                 results: Sequence[dict[str, Any]]) -> None:
        """Write the finished zoo to `out / "raw"` (results in plan order)."""
        raise NotImplementedError

    @classmethod
    def plan_from_recipe(cls, recipe: dict[str, Any]) -> list[Chunk]:
        raise NotImplementedError


_JOBS: dict[str, type[ZooJob]] = {}


def register_job(cls: type[ZooJob]) -> type[ZooJob]:
    _JOBS[cls.kind] = cls
    return cls


def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int]:
    """`"i/n"` (or `(i, n)`) -> `(i, n)` with `0 <= i < n`."""
    if shard is None:
        return 0, 1
    if isinstance(shard, str):
        try:
            i_s, n_s = shard.split("/")
            i, n = int(i_s), int(n_s)
        except ValueError as e:
            raise ValueError(f"shard must look like 'i/n', got {shard!r}") from e
    else:
        i, n = int(shard[0]), int(shard[1])
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"invalid shard {i}/{n}")
    return i, n


def _chunk_name(index: int) -> str:
    return f"chunk-{index:05d}.pt"


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=1, sort_keys=True)
    atomic_write(path, lambda p: Path(p).write_text(text))


def _check_recipe(work: Path, recipe: dict[str, Any]) -> None:
    path = work / "zoo.json"
    want = json.loads(json.dumps(recipe))
    if path.exists():
        have = json.loads(path.read_text())
        if have != want:
            raise ZooConfigError(f"{work.parent} holds a zoo with another recipe: "
                                 f"{_recipe_diff(have, want)}; use a new output directory, "
                                 "the same settings, or delete it")
    else:
        _write_json(path, want)


def _short(v: Any) -> str:
    text = json.dumps(v, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _recipe_diff(have: dict[str, Any], want: dict[str, Any]) -> str:
    """`"field 'seed' is 0 there, 1 now (and 1 more field: ['lr'])"`."""
    diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    k = diff[0]
    a = _short(have[k]) if k in have else "absent"
    b = _short(want[k]) if k in want else "absent"
    more = f" (and {len(diff) - 1} more: {diff[1:]})" if len(diff) > 1 else ""
    return f"field '{k}' is {a} there, {b} now{more}"


def _clean_temps(chunks_dir: Path, names: set[str]) -> None:
    """Remove temporary files left by a killed run (only those of the given chunk names)."""
    if not chunks_dir.exists():
        return
    for p in chunks_dir.iterdir():
        if p.name.startswith(".") and p.name.endswith(".tmp"):
            base = p.name[1:].split(".pt.", 1)[0] + ".pt"
            if base in names:
                p.unlink(missing_ok=True)


_WORKER_JOB: ZooJob | None = None


def _die_with_parent(parent: int) -> None:
    """End this worker when the process that started it dies, even by SIGKILL (no cleanup
    runs then): Linux's `PR_SET_PDEATHSIG`, plus a thread polling `os.getppid()` (other
    systems, and the case where the forking thread, not the process, ended)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="graphspace-parent-watch", daemon=True).start()


def _init_worker(job: ZooJob, parent: int | None = None) -> None:
    global _WORKER_JOB
    if parent is not None:
        _die_with_parent(parent)
    torch.set_num_threads(1)
    _WORKER_JOB = job


def _work(chunk: Chunk) -> tuple[int, dict[str, Any]]:
    assert _WORKER_JOB is not None
    return chunk.index, _WORKER_JOB.run_chunk(chunk)


def _run_serial(job: ZooJob, chunk: Chunk) -> dict[str, Any]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return job.run_chunk(chunk)
    finally:
        torch.set_num_threads(n)


def _save_chunk(path: Path, chunk: Chunk, result: dict[str, Any]) -> None:
    obj = {"index": chunk.index, "members": list(chunk.members), "result": result}
    save_torch(path, obj)


def _load_chunk(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _chunk_ok(path: Path, chunk: Chunk) -> str | None:
    """`None` when the chunk file reads back and belongs to `chunk`, else what is wrong."""
    try:
        obj = _load_chunk(path)
    except Exception as e:  # truncated/corrupt: EOFError, RuntimeError, UnpicklingError, ...
        lines = str(e).strip().splitlines()
        return f"truncated or corrupt ({lines[0] if lines else type(e).__name__})"
    if not isinstance(obj, dict) or obj.get("index") != chunk.index or \
            obj.get("members") != list(chunk.members) or "result" not in obj:
        return "does not match the plan"
    return None


def _drop_bad_chunks(chunks_dir: Path, chunks: Sequence[Chunk]) -> list[int]:
    """Check every existing chunk file of `chunks`; report and delete bad ones (they are then
    regenerated). Returns their indices."""
    bad = []
    for c in chunks:
        path = chunks_dir / _chunk_name(c.index)
        if not path.exists():
            continue
        why = _chunk_ok(path, c)
        if why is not None:
            print(f"graphspace zoo: warning: chunk {c.index} ({path}) is {why}; it is "
                  "regenerated", file=sys.stderr)
            path.unlink()
            bad.append(c.index)
    return bad


def run_zoo(
    job: ZooJob,
    out: str | os.PathLike,
    shard: str | tuple[int, int] | None = None,
    workers: int | None = None,
    progress: bool = True,
    on_chunk: Callable[[int], None] | None = None,
) -> ZooStatus:
    """Run (or resume) the chunks of one shard of `job` in `out` and finalise the zoo when
    every chunk exists.

    Args:
        job: the zoo to build.
        out: output directory.
        shard: `"i/n"`: run only chunks with `index % n == i`.
        workers: worker processes (default: all CPU cores; `1` runs in this process).
        progress: show a tqdm progress bar.
        on_chunk: called with the index of every chunk after it was saved (e.g. logging).
    """
    t0 = time.perf_counter()
    i, n = parse_shard(shard)
    out = Path(out)
    work = out / "work"
    chunks_dir = work / "chunks"
    chunks_dir.mkdir(parents=True, exist_ok=True)
    recipe = job.recipe()
    _check_recipe(work, recipe)
    plan = job.plan()
    mine = [c for c in plan if c.index % n == i]
    _clean_temps(chunks_dir, {_chunk_name(c.index) for c in mine})
    _drop_bad_chunks(chunks_dir, mine)
    manifest = work / f"manifest-{i}-of-{n}.json"
    done = {c.index for c in mine if (chunks_dir / _chunk_name(c.index)).exists()}
    pending = [c for c in mine if c.index not in done]

    def record() -> None:
        members = sorted(m for c in mine if c.index in done for m in c.members)
        _write_json(manifest, {"shard": f"{i}/{n}", "chunks": sorted(done),
                               "members": members,
                               "complete": len(done) == len(mine)})

    record()
    bar = None
    if progress and pending:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(c.members) for c in mine),
                   initial=sum(len(c.members) for c in mine if c.index in done),
                   desc=f"{job.kind} zoo shard {i}/{n}", unit="net")

    def finished(chunk: Chunk, result: dict[str, Any]) -> None:
        _save_chunk(chunks_dir / _chunk_name(chunk.index), chunk, result)
        done.add(chunk.index)
        record()
        if bar is not None:
            bar.update(len(chunk.members))
        if on_chunk is not None:
            on_chunk(chunk.index)

    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else (os.cpu_count() or 1)
    nw = min(workers, max(len(pending), 1))
    try:
        if nw <= 1:
            for c in pending:
                finished(c, _run_serial(job, c))
        else:
            # fork (as DataLoader workers: one thread each) also works from scripts without a
            # `__main__` guard; spawn where fork is unavailable
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            ctx = mp.get_context(method)
            ex = cf.ProcessPoolExecutor(nw, mp_context=ctx, initializer=_init_worker,
                                        initargs=(job, os.getpid()))
            try:
                by_index = {c.index: c for c in pending}
                order = sorted(pending, key=lambda c: -job.chunk_cost(c))
                futures = [ex.submit(_work, c) for c in order]
                for f in cf.as_completed(futures):
                    idx, result = f.result()
                    finished(by_index[idx], result)
            finally:
                ex.shutdown(wait=True, cancel_futures=True)
    finally:
        if bar is not None:
            bar.close()
    return _maybe_finalize(type(job), out, recipe, plan, t0)


def _maybe_finalize(cls: type[ZooJob], out: Path, recipe: dict[str, Any],
                    plan: Sequence[Chunk], t0: float) -> ZooStatus:
    chunks_dir = out / "work" / "chunks"
    have = [c for c in plan if (chunks_dir / _chunk_name(c.index)).exists()]
    have_idx = {c.index for c in have}
    missing = [c.index for c in plan if c.index not in have_idx]
    status = ZooStatus(out, False, len(have), len(plan), sum(len(c.members) for c in have),
                       sum(len(c.members) for c in plan), 0.0, missing)
    done_recipe = out / "raw" / "zoo.json"
    if not missing and done_recipe.exists() and \
            json.loads(done_recipe.read_text()) == json.loads(json.dumps(recipe)):
        status.complete = True  # finalised before
    elif not missing:
        results = []
        for c in plan:
            path = chunks_dir / _chunk_name(c.index)
            why = _chunk_ok(path, c)
            if why is not None:
                print(f"graphspace zoo: warning: chunk {c.index} ({path}) is {why}; deleted, "
                      "re-run the shard that builds it", file=sys.stderr)
                path.unlink()
                status.missing.append(c.index)
                continue
            results.append(_load_chunk(path)["result"])
        if status.missing:
            status.chunks_done -= len(status.missing)
            status.members_done -= sum(len(c.members) for c in plan
                                       if c.index in set(status.missing))
            status.seconds = time.perf_counter() - t0
            return status
        cls.finalize(out, recipe, plan, results)
        _write_json(out / "raw" / "zoo.json", recipe)
        status.complete = True
    status.seconds = time.perf_counter() - t0
    return status


def merge_zoo(out: str | os.PathLike, sources: Sequence[str | os.PathLike] = ()) -> ZooStatus:
    """Gather the chunks of shards built in other directories into `out` and finalise the zoo.

    With no `sources` (all shards wrote to `out`) it only finalises. Raises
    `ZooConfigError` when recipes differ.
    """
    t0 = time.perf_counter()
    out = Path(out)
    work = out / "work"
    (work / "chunks").mkdir(parents=True, exist_ok=True)
    recipe = json.loads((work / "zoo.json").read_text()) if (work / "zoo.json").exists() \
        else None
    for src in sources:
        src = Path(src)
        other = json.loads((src / "work" / "zoo.json").read_text())
        if recipe is None:
            recipe = other
            _write_json(work / "zoo.json", recipe)
        elif other != recipe:
            raise ZooConfigError(f"{src} holds a zoo with another recipe than {out}: "
                                 f"{_recipe_diff(recipe, other)}")
        for p in sorted((src / "work" / "chunks").glob("chunk-*.pt")):
            dst = work / "chunks" / p.name
            if not dst.exists():
                atomic_write(dst, lambda tmp, p=p: shutil.copyfile(p, tmp))
    if recipe is None:
        raise FileNotFoundError(f"no zoo recipe in {work} or the sources")
    cls = _JOBS.get(recipe["kind"])
    if cls is None:
        raise ZooConfigError(f"unknown zoo kind {recipe['kind']!r}")
    return _maybe_finalize(cls, out, recipe, cls.plan_from_recipe(recipe), t0)


def zoo_status(out: str | os.PathLike) -> ZooStatus:
    """Progress of the zoo in `out` (from its recipe and finished chunks; nothing is run)."""
    out = Path(out)
    if not (out / "work" / "zoo.json").is_file():
        raise FileNotFoundError(f"{out} holds no zoo (no work/zoo.json)")
    recipe = json.loads((out / "work" / "zoo.json").read_text())
    cls = _JOBS.get(recipe["kind"])
    if cls is None:
        raise ZooConfigError(f"unknown zoo kind {recipe['kind']!r}")
    plan = cls.plan_from_recipe(recipe)
    chunks_dir = out / "work" / "chunks"
    have = [c for c in plan if (chunks_dir / _chunk_name(c.index)).exists()]
    have_idx = {c.index for c in have}
    return ZooStatus(out, (out / "raw" / "zoo.json").exists() and len(have) == len(plan),
                     len(have), len(plan), sum(len(c.members) for c in have),
                     sum(len(c.members) for c in plan), 0.0,
                     [c.index for c in plan if c.index not in have_idx])
