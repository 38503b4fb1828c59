"""Run outputs shared by the tasks: the run directory, figures and prediction files.

* `run_dir(trainer)`: where a run's outputs go (the logger's directory, else the trainer's
  `default_root_dir`).
* `pyplot()`: matplotlib's `pyplot` on the non-interactive Agg backend, or `None` with a
  one-line message when matplotlib is not installed.
* `save_figure(fig, path)`: write a PNG atomically and close the figure.
* `write_table(columns, stem)`: a predictions table as Parquet when `pyarrow` is importable,
  else CSV (floats written with `repr`, so they read back bit for bit).
* `PredictionsFile`: a `LightningModule` mixin that collects what `predict_step` returns and
  writes it as one table to the run directory at the end of `predict`, printing the path.
"""

from __future__ import annotations

import csv
import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

PLOT_HINT = "pip install matplotlib (or the 'merge' / 'dev' extra)"


def run_dir(trainer: Any) -> Path:
    """The directory a run's outputs go to: `trainer.log_dir` when a logger is set, else
    `trainer.default_root_dir` (created if needed).

    Args:
        trainer: a Lightning `Trainer`.

    Returns:
        The directory.
    """
    path = Path(trainer.log_dir or trainer.default_root_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def pyplot(what: str = "the plot") -> Any | None:
    """matplotlib's `pyplot` on the Agg backend (no display needed).

    Args:
        what: named in the message printed when matplotlib is missing.

    Returns:
        The `matplotlib.pyplot` module, or `None` when matplotlib is not installed.
    """
    if importlib.util.find_spec("matplotlib") is None:
        print(f"matplotlib is not installed: skipping {what} ({PLOT_HINT})")
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save `fig` as a PNG at `path` (atomically, parent directories created) and close it.

    Args:
        fig: a matplotlib `Figure`.
        path: the PNG path.
        dpi: resolution.

    Returns:
        The path written.
    """
    import matplotlib.pyplot as plt

    from graphspace.io import atomic_write

    out = atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=dpi,
                                                     bbox_inches="tight"))
    plt.close(fig)
    return out


def _flatten(columns: Mapping[str, Tensor | Sequence[Any]]) -> dict[str, list[Any]]:
    """`[N]` tensors become one column, `[N, K]` tensors the columns `name_0 ... name_{K-1}`."""
    out: dict[str, list[Any]] = {}
    n: int | None = None
    for name, value in columns.items():
        t = value if isinstance(value, Tensor) else torch.as_tensor(value)
        t = t.detach().cpu()
        if t.dim() == 0 or t.dim() > 2:
            raise ValueError(f"prediction column {name!r} must be [N] or [N, K], got "
                             f"{tuple(t.shape)}")
        if n is None:
            n = t.size(0)
        elif t.size(0) != n:
            raise ValueError(f"prediction column {name!r} has {t.size(0)} rows, expected {n}")
        if t.dim() == 1:
            out[name] = t.tolist()
        else:
            for k in range(t.size(1)):
                out[f"{name}_{k}"] = t[:, k].tolist()
    return out


def parquet_available() -> bool:
    """Whether `pyarrow` can be imported (then tables are written as Parquet)."""
    return importlib.util.find_spec("pyarrow") is not None


def write_table(columns: Mapping[str, Tensor | Sequence[Any]], stem: str | os.PathLike,
                fmt: str | None = None) -> Path:
    """Write per-row columns to `<stem>.parquet` (pyarrow importable) or `<stem>.csv`.

    Args:
        columns: column name to `[N]` or `[N, K]` values (the latter become `name_k` columns).
        stem: the path without suffix.
        fmt: `"parquet"` or `"csv"` (default: Parquet when pyarrow is importable).

    Returns:
        The path written (atomically).
    """
    from graphspace.io import atomic_write

    fmt = fmt or ("parquet" if parquet_available() else "csv")
    if fmt not in ("parquet", "csv"):
        raise ValueError(f"fmt must be 'parquet' or 'csv', got {fmt!r}")
    table = _flatten(columns)
    path = Path(f"{stem}.{fmt}")
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        atomic_write(path, lambda p: pq.write_table(pa.table(table), p))
        return path

    def write(p: str) -> None:
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(list(table))
            w.writerows(zip(*table.values()))

    return atomic_write(path, write)


class PredictionsFile:
    """Mixin for a `LightningModule` whose `predict_step` returns a dict of per-sample tensors
    (`[B]` or `[B, K]`): at the end of `predict` the rows of all batches, in order, are written
    to `<run dir>/predictions.parquet` (pyarrow importable) or `predictions.csv`, with a
    leading `index` column (the sample's position in the predict loader; per process under
    DDP, where each process writes `predictions.rank<r>.*`). The path is printed and kept in
    `predictions_path`.

    A datamodule without a `predict_dataloader` predicts on its `test_dataloader` (set in
    `setup("predict")` by `predict_on_test_loader`).
    """

    predictions_path: Path | None = None

    def predict_on_test_loader(self, stage: str) -> None:
        """At `stage == "predict"`, give a datamodule without `predict_dataloader` its
        `test_dataloader` as the predict loader (an attribute of that datamodule instance)."""
        from lightning.pytorch.utilities.model_helpers import is_overridden

        trainer = getattr(self, "_trainer", None)
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        if stage != "predict" or dm is None or is_overridden("predict_dataloader", dm):
            return
        if is_overridden("test_dataloader", dm):
            dm.predict_dataloader = dm.test_dataloader

    def setup(self, stage: str) -> None:
        self.predict_on_test_loader(stage)

    def on_predict_epoch_start(self) -> None:
        self._predict_rows: list[dict[str, Tensor]] = []

    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int,
                             dataloader_idx: int = 0) -> None:
        if isinstance(outputs, Mapping):
            self._predict_rows.append({k: v.detach().cpu() for k, v in outputs.items()})

    def on_predict_epoch_end(self) -> None:
        rows = getattr(self, "_predict_rows", [])
        if not rows:
            return
        columns: dict[str, Tensor] = {}
        for key in rows[0]:
            columns[key] = torch.cat([r[key] for r in rows])
        n = next(iter(columns.values())).size(0)
        trainer = self.trainer  # type: ignore[attr-defined]
        stem = "predictions" if trainer.world_size == 1 else \
            f"predictions.rank{trainer.global_rank}"
        path = write_table({"index": torch.arange(n), **columns}, run_dir(trainer) / stem)
        self.predictions_path = path
        self._predict_rows = []
        print(f"predictions ({n} rows) -> {path}")
