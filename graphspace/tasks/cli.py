"""`graphspace fit|validate|test|predict`: LightningCLI over graphspace's tasks.

Any `LightningModule` / `LightningDataModule` can be named by class path in the YAML
(`model: {class_path: ..., init_args: ...}`). After `fit`, the best checkpoint is tested on
the test split and, for tasks that provide `results_table()`, the table is printed and saved
as `results.md` in the run's log directory (printed once: Lightning's own metric table is off by
default, `--verbose true` turns it back on). Without a `trainer.logger` in the config the
run logs explicitly to TensorBoard when it is installed, else to CSV, under
`trainer.default_root_dir`; every run ends by printing where its outputs went.

This module is the implementation behind `graphspace.cli.lightning`; run it through the
`graphspace` command.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback


class GraphspaceCLI(LightningCLI):
    """LightningCLI that tests the best checkpoint after `fit` and reports results."""

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="test the best checkpoint after fit and print a results table")

    def _prepare_subcommand_parser(self, klass, subcommand, **kwargs):  # type: ignore[no-untyped-def]
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand in ("validate", "test"):
            # the results are printed by `report`; Lightning's metric table would repeat them
            parser.set_defaults(verbose=False)
        return parser

    def _instantiate_trainer(self, config, callbacks):  # type: ignore[no-untyped-def]
        if config.get("logger") in (None, True):
            config["logger"] = default_logger(config.get("default_root_dir"))
        return super()._instantiate_trainer(config, callbacks)

    def _test_after_fit(self) -> None:
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

    def after_fit(self) -> None:
        self._test_after_fit()
        outputs(self.trainer)

    def after_validate(self) -> None:
        report(self.trainer, self.trainer.lightning_module, stage="validate")
        outputs(self.trainer)

    def after_test(self) -> None:
        report(self.trainer, self.trainer.lightning_module)
        outputs(self.trainer)

    def after_predict(self) -> None:
        outputs(self.trainer)


def default_logger(root: str | None):  # type: ignore[no-untyped-def]
    """TensorBoard when installed, else CSV, under `root` (Lightning's default place), set
    explicitly so that Lightning does not warn about choosing one."""
    import importlib.util

    save_dir = root or os.getcwd()
    if importlib.util.find_spec("tensorboard") is not None or \
            importlib.util.find_spec("tensorboardX") is not None:
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=save_dir, name="lightning_logs")
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(save_dir=save_dir, name="lightning_logs")


def outputs(trainer: pl.Trainer) -> str | None:
    """Print where the run's outputs went (log directory, best checkpoint)."""
    log_dir = trainer.log_dir or trainer.default_root_dir
    if not trainer.is_global_zero:
        return None
    lines = [f"outputs: {os.path.abspath(log_dir)}"] if log_dir else []
    cb = trainer.checkpoint_callback
    best = getattr(cb, "best_model_path", "") if cb is not None else ""
    if best:
        lines.append(f"best checkpoint: {os.path.abspath(best)}")
    if lines:
        print("\n".join(lines))
    return log_dir


def report(trainer: pl.Trainer, module: pl.LightningModule, stage: str = "test"
           ) -> str | None:
    """Print and save (`<log_dir>/results.md`, atomically) the module's results table; a
    module without one gets its logged metrics printed (once)."""
    table_fn = getattr(module, "results_table", None)
    # Trainer.log_dir is a collective under DDP (rank 0 broadcasts it): every process asks.
    log_dir = trainer.log_dir or trainer.default_root_dir
    if not trainer.is_global_zero:
        return None
    if table_fn is None or stage != "test":
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if getattr(v, "numel", lambda: 1)() == 1}
        if metrics:
            print(f"\n{stage.capitalize()} metrics")
            for k in sorted(metrics):
                print(f"  {k}: {metrics[k]:.6g}")
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


class _NoAdverts:
    """Drops Lightning's "Tip: try installing ..." advert (an info line, not a warning)."""

    @staticmethod
    def filter(record) -> bool:  # type: ignore[no-untyped-def]
        return not str(record.msg).lstrip("\U0001f4a1 ").startswith("Tip:")


def main(argv: Sequence[str] | None = None, exit_on_error: bool = True) -> int:
    """Run LightningCLI on `argv` (the verb first).

    Args:
        argv: the arguments; `None` reads `sys.argv`.
        exit_on_error: `False` makes a bad option raise `argparse.ArgumentError` instead of
            printing the usage and exiting (the `graphspace` command prints it as one line).
    """
    import logging

    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdverts)
    GraphspaceCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveConfigCallback,
        save_config_kwargs={"overwrite": True},
        # a bad option raises (`graphspace` prints it as one line) instead of printing usage
        parser_kwargs={"exit_on_error": exit_on_error},
        args=list(argv) if argv is not None else None,
    )
    return 0
