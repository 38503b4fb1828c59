"""``graphspace fit|validate|test|predict``: LightningCLI over graphspace's tasks.

Any ``LightningModule`` / ``LightningDataModule`` can be named by class path in the YAML
(``model: {class_path: ..., init_args: ...}``). After ``fit``, the best checkpoint is tested on
the test split and, for tasks that provide ``results_table()``, the table is printed and saved
as ``results.md`` in the run's log directory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback


class GraphspaceCLI(LightningCLI):
    """LightningCLI that tests the best checkpoint after ``fit`` and reports results."""

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="test the best checkpoint after fit and print a results table")

    def after_fit(self) -> None:
        cfg = self.config.get(self.subcommand, self.config)
        if not cfg.get("test_after_fit", True):
            return
        dm = self.datamodule
        has_test = dm is not None and type(dm).test_dataloader is not \
            pl.LightningDataModule.test_dataloader
        if not has_test:
            return
        ckpt = "best" if self.trainer.checkpoint_callback is not None and \
            self.trainer.checkpoint_callback.best_model_path else None
        self.trainer.test(self.model, datamodule=dm, ckpt_path=ckpt, verbose=False)
        report(self.trainer, self.trainer.lightning_module)


    def after_test(self) -> None:
        report(self.trainer, self.trainer.lightning_module)


def report(trainer: pl.Trainer, module: pl.LightningModule) -> str | None:
    """Print and save (``<log_dir>/results.md``, atomically) the module's results table."""
    table_fn = getattr(module, "results_table", None)
    if table_fn is None:
        return None
    # Trainer.log_dir is a collective under DDP (rank 0 broadcasts it): every process asks.
    log_dir = trainer.log_dir or trainer.default_root_dir
    if not trainer.is_global_zero:
        return None
    table = table_fn()
    print("\nTest results\n" + table)
    if log_dir:
        from graphspace.io import atomic_write

        path = os.path.join(log_dir, "results.md")

        def write(p: str) -> None:
            with open(p, "w") as f:
                f.write(table + "\n")

        atomic_write(path, write)
        print(f"saved {path}")
    return table


def main(argv: Sequence[str] | None = None) -> int:
    GraphspaceCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveConfigCallback,
        save_config_kwargs={"overwrite": True},
        args=list(argv) if argv is not None else None,
    )
    return 0
