r"""INR classification: recognise the image class that an implicit neural representation encodes.

The benchmark of DWSNets (Navon et al. 2023), NFN (Zhou et al. 2023) and Neural Graphs (Kofinas
et al. 2024): each sample is a SIREN fitted to one image (MNIST / Fashion-MNIST in the papers,
the scikit-learn digits zoo offline); the label is the image class. A metanetwork must be
invariant to the SIREN's hidden-neuron permutations (and may use its sign-flip symmetry as an
augmentation).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Accuracy
from torchmetrics.classification import MulticlassConfusionMatrix

from graphspace.nn.models.graph_metanetwork import GraphMetaNetwork
from graphspace.tasks.outputs import PredictionsFile, pyplot, run_dir, save_figure


class INRClassifier(PredictionsFile, pl.LightningModule):
    """Classify parameter graphs of INRs with a graph metanetwork.

    **Outputs** (in the run directory, see `graphspace.tasks.outputs.run_dir`): after `test`,
    `confusion_matrix.png`, the test split's confusion matrix (rows: true class, columns:
    predicted; counts kept in `test_confusion`; skipped with a one-line message without
    matplotlib). `predict` writes `predictions.csv` (or `.parquet`): one row per INR with the
    predicted `label`, the class probabilities `prob_0 ... prob_{C-1}` and the `target` when
    the batch has one.

    Args:
        num_classes: number of image classes (default 10).
        model: the metanetwork (default `GraphMetaNetwork(num_classes)`); it must return
            `[batch, num_classes]` logits.
        lr, weight_decay: AdamW settings.
        label_smoothing: cross-entropy label smoothing (default 0).
        target: batch attribute holding the labels (default `y`).
        plots: save the confusion matrix figure (default `True`).
    """

    def __init__(self, num_classes: int = 10, model: nn.Module | None = None, lr: float = 1e-3,
                 weight_decay: float = 0.0, label_smoothing: float = 0.0,
                 target: str = "y", plots: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model if model is not None else GraphMetaNetwork(num_classes)
        self.acc = nn.ModuleDict({f"{s}_acc": Accuracy("multiclass", num_classes=num_classes)
                                  for s in ("train", "val", "test")})
        self.confusion = MulticlassConfusionMatrix(num_classes)
        #: ``[C, C]`` test confusion counts (row: true class, column: predicted class)
        self.test_confusion: Tensor | None = None

    def forward(self, batch: Any) -> Tensor:
        return self.model(batch)

    def _common_step(self, batch: Any, stage: str) -> Tensor:
        y = getattr(batch, self.hparams.target).view(-1).long()
        logits = self(batch)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        acc = self.acc[f"{stage}_acc"]
        acc(logits.argmax(-1), y)
        if stage == "test":
            self.confusion.update(logits.argmax(-1), y)
        self.log(f"{stage}/loss", loss, batch_size=y.numel(), prog_bar=True)
        self.log(f"{stage}/acc", acc, batch_size=y.numel(), prog_bar=True,
                 on_epoch=True, on_step=False)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._common_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._common_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._common_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0
                     ) -> dict[str, Tensor]:
        """Class probabilities and predicted label of every INR of the batch.

        Returns:
            `{"label": [B], "prob": [B, C], "target": [B]}` (`target` only when the batch
            carries the target attribute); the file gets columns `prob_0 ... prob_{C-1}`.
        """
        probs = self(batch).float().softmax(-1)
        out = {"label": probs.argmax(-1), "prob": probs}
        y = getattr(batch, self.hparams.target, None)
        if isinstance(y, Tensor):
            out["target"] = y.view(-1).long()
        return out

    def on_test_epoch_start(self) -> None:
        self.confusion.reset()

    def on_test_epoch_end(self) -> None:
        if not self.confusion.update_called:
            return
        self.test_confusion = self.confusion.compute().cpu()  # gathered across processes
        if self.hparams.plots and self.trainer.is_global_zero:
            self.plot_confusion(run_dir(self.trainer) / "confusion_matrix.png")
        self.confusion.reset()

    def plot_confusion(self, path: str | None = None) -> Any:
        """The test confusion matrix (torchmetrics' `MulticlassConfusionMatrix.plot`).

        Args:
            path: where to save the PNG (the figure is then closed); `None` returns it open.

        Returns:
            The figure (or `None` without matplotlib); its image holds `test_confusion`.
        """
        if self.test_confusion is None:
            raise ValueError("plot_confusion needs a finished test run (no confusion matrix)")
        plt = pyplot("the confusion matrix")
        if plt is None:
            return None
        fig, ax = plt.subplots(figsize=(6, 6))
        self.confusion.plot(self.test_confusion, ax=ax)
        ax.set_title("INR classification: test confusion matrix")
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        if path is not None:
            print(f"confusion matrix -> {save_figure(fig, path)}")
        return fig

    def results_table(self) -> str:
        acc = self.trainer.callback_metrics.get("test/acc") if self._trainer else None
        value = float(acc) if acc is not None else float("nan")
        return f"| model | test accuracy |\n|---|---|\n| gmn | {value:.4f} |"

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr,
                                 weight_decay=self.hparams.weight_decay)
