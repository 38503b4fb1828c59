r"""Figures of the tasks (matplotlib; the callers import it through
`graphspace.tasks.outputs.pyplot`, so it runs without a display).

* `prediction_scatter`: predicted against true values, one panel per predictor, Kendall's
  $\tau$ in each title (generalization prediction).
* `learning_curves`: training / validation loss and validation $\tau$ per epoch.

The INR confusion matrix is drawn by torchmetrics' `MulticlassConfusionMatrix.plot`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor


def _list(v: Tensor | Sequence[float]) -> list[float]:
    return v.detach().cpu().double().tolist() if isinstance(v, Tensor) else [float(x) for x in v]


def prediction_scatter(plt: Any, predictions: Mapping[str, Tensor | Sequence[float]],
                       target: Tensor | Sequence[float], taus: Mapping[str, float],
                       quantity: str = "test accuracy") -> Any:
    r"""Predicted against actual values, one panel per predictor, with the line $y = x$.

    Args:
        plt: `matplotlib.pyplot`.
        predictions: predictor name to its `[N]` predictions.
        target: the `[N]` true values.
        taus: predictor name to its Kendall $\tau$ (shown in the panel title).
        quantity: axis label of what is predicted.

    Returns:
        The `Figure`; panel `k` holds one scatter whose offsets are `(target, predictions)`
        of the `k`-th predictor.
    """
    names = list(predictions)
    if not names:
        raise ValueError("prediction_scatter needs at least one predictor, got none")
    y = _list(target)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4), squeeze=False,
                             layout="constrained")
    lo_all = min(y + [v for n in names for v in _list(predictions[n])])
    hi_all = max(y + [v for n in names for v in _list(predictions[n])])
    for ax, name in zip(axes[0], names):
        p = _list(predictions[name])
        if len(p) != len(y):
            raise ValueError(f"predictions of {name!r}: expected {len(y)} values (one per "
                             f"target), got {len(p)}")
        ax.scatter(y, p, s=14, alpha=0.7)
        ax.plot([lo_all, hi_all], [lo_all, hi_all], color="grey", lw=1, ls="--")
        ax.set_xlabel(f"actual {quantity}")
        ax.set_ylabel(f"predicted {quantity}")
        ax.set_title(f"{name}: Kendall τ = {taus.get(name, float('nan')):.3f}")
    return fig


def learning_curves(plt: Any, history: Mapping[str, Sequence[float]],
                    epochs: Sequence[int]) -> Any:
    r"""Loss curves (left) and validation Kendall $\tau$ (right) against the epoch.

    Args:
        plt: `matplotlib.pyplot`.
        history: series name to one value per epoch; names starting with `train/loss` or
            `val/loss` go to the left panel, `val/tau` to the right one.
        epochs: the epoch of every value.

    Returns:
        The `Figure`; every series is one `Line2D` labelled with its name, whose y data are
        the logged values.
    """
    fig, (ax_loss, ax_tau) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    x = list(epochs)
    # one colour per predictor (the part after the last "_"), solid = train, dashed = val
    predictors = list(dict.fromkeys(name.rsplit("_", 1)[-1] for name in history))
    colour = {n: f"C{i % 10}" for i, n in enumerate(predictors)}
    for name in sorted(history, key=lambda k: (predictors.index(k.rsplit("_", 1)[-1]), k)):
        values = history[name]
        if len(values) != len(x):
            raise ValueError(f"history {name!r}: expected {len(x)} values (one per epoch), "
                             f"got {len(values)}")
        style = {"marker": ".", "label": name, "color": colour[name.rsplit("_", 1)[-1]],
                 "ls": "-" if name.startswith("train/") else "--"}
        if name.startswith(("train/loss", "val/loss")):
            ax_loss.plot(x, list(values), **style)
        elif name.startswith("val/tau"):
            ax_tau.plot(x, list(values), **{**style, "ls": "-"})
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("MSE loss")
    if ax_loss.lines and all(v > 0 for ln in ax_loss.lines for v in ln.get_ydata()):
        ax_loss.set_yscale("log")
    ax_tau.set_xlabel("epoch")
    ax_tau.set_ylabel("validation Kendall τ")
    for ax in (ax_loss, ax_tau):
        if ax.lines:
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize="small")
        ax.xaxis.get_major_locator().set_params(integer=True)
    return fig
