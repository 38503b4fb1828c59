r"""Linear interpolation between two models and the loss barrier.

For endpoints $\theta_A, \theta_B$ and $\lambda \in [0, 1]$ the curve evaluates
$L(\theta_\lambda)$ with $\theta_\lambda = (1 - \lambda)\theta_A + \lambda\theta_B$
(accuracy too, for classification). The loss barrier (Frankle et al. 2020; Ainsworth et al.
2023, eq. 1) is

$$
B(\theta_A, \theta_B) = \max_{\lambda} \Big[ L(\theta_\lambda)
    - \big((1 - \lambda) L(\theta_A) + \lambda L(\theta_B)\big) \Big].
$$

BatchNorm running statistics are interpolated like the weights unless `reset_bn=True`
recomputes them on the loader at every $\lambda$ (the interpolated statistics are wrong
for interpolated weights; Jordan et al. 2022).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphspace.merge._utils import (
    batch_input,
    batch_target,
    iterate,
    model_device,
    state_of,
    to_device,
    weighted_average,
    with_state,
)
from graphspace.merge.repair import reset_bn_stats


def interpolate_state(state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor],
                      lam: float) -> dict[str, Tensor]:
    r"""$(1 - \lambda)\theta_A + \lambda\theta_B$ for float entries (integers from A)."""
    return weighted_average([state_a, state_b], [1.0 - lam, lam])


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable,
             loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
             num_batches: int | None = None) -> tuple[float, float | None]:
    """Mean loss (cross-entropy by default, summed per sample then averaged) and accuracy (for
    integer class targets; `None` otherwise) of `model` in eval mode."""
    loss_fn = loss_fn or (lambda out, y: F.cross_entropy(out, y, reduction="sum"))
    was = model.training
    model.eval()
    dev = model_device(model)
    total, correct, n = 0.0, 0, 0
    classify = True
    try:
        for batch in iterate(loader, num_batches):
            x, y = batch_input(batch), batch_target(batch)
            if y is None:
                raise ValueError("evaluation needs (input, target) batches")
            x, y = to_device(x, dev), to_device(y, dev)
            out = model(x)
            total += float(loss_fn(out, y))
            n += int(y.shape[0])
            if y.dtype in (torch.int64, torch.int32) and out.dim() == 2:
                correct += int((out.argmax(-1) == y).sum())
            else:
                classify = False
    finally:
        model.train(was)
    if n == 0:
        raise ValueError("the loader yielded no batches")
    return total / n, (correct / n if classify else None)


@dataclass
class InterpolationCurve:
    """Loss (and accuracy) along the segment between two models."""

    lambdas: list[float]
    loss: list[float]
    accuracy: list[float | None] = field(default_factory=list)

    @property
    def barrier(self) -> float:
        """The loss barrier (see the module docstring)."""
        return loss_barrier(self.lambdas, self.loss)

    @property
    def midpoint_loss(self) -> float:
        i = min(range(len(self.lambdas)), key=lambda k: abs(self.lambdas[k] - 0.5))
        return self.loss[i]

    @property
    def midpoint_accuracy(self) -> float | None:
        i = min(range(len(self.lambdas)), key=lambda k: abs(self.lambdas[k] - 0.5))
        return self.accuracy[i] if self.accuracy else None


def loss_barrier(lambdas: Sequence[float], losses: Sequence[float]) -> float:
    r"""$\max_\lambda L(\lambda) - ((1-\lambda) L(0) + \lambda L(1))$; `lambdas` must
    contain 0 and 1."""
    lam = [float(x) for x in lambdas]
    if 0.0 not in lam or 1.0 not in lam:
        raise ValueError("the curve must include lambda = 0 and lambda = 1")
    l0, l1 = losses[lam.index(0.0)], losses[lam.index(1.0)]
    return max(li - ((1 - x) * l0 + x * l1) for x, li in zip(lam, losses))


def interpolation_curve(
    model_a: nn.Module,
    model_b: nn.Module,
    loader: Iterable,
    lambdas: int | Sequence[float] = 11,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    reset_bn: bool = False,
    bn_loader: Iterable | None = None,
    num_batches: int | None = None,
) -> InterpolationCurve:
    """Evaluate the models on the straight line between `model_a` and `model_b`.

    Args:
        model_a, model_b: endpoints (same architecture; B usually aligned to A first).
        loader: evaluation batches `(x, y)`.
        lambdas: number of evenly spaced points in `[0, 1]` or explicit values (0 and 1 are
            always added).
        loss_fn: `loss_fn(output, target)` summed over the batch (cross-entropy by default).
        reset_bn: recompute BatchNorm statistics at every point (on `bn_loader` or
            `loader`).
        num_batches: evaluate on the first `num_batches` batches only.
    """
    lams = torch.linspace(0, 1, lambdas).tolist() if isinstance(lambdas, int) else \
        [float(x) for x in lambdas]
    lams = sorted(set(lams) | {0.0, 1.0})
    sa, sb = state_of(model_a), state_of(model_b)
    losses, accs = [], []
    for lam in lams:
        m = with_state(model_a, interpolate_state(sa, sb, lam))
        if reset_bn:
            reset_bn_stats(m, bn_loader or loader, inplace=True)
        loss, acc = evaluate(m, loader, loss_fn, num_batches)
        losses.append(loss)
        accs.append(acc)
    return InterpolationCurve(lams, losses, accs)


def interpolation_figure(plt: Any, curves: Mapping[str, InterpolationCurve],
                         title: str = "Linear interpolation") -> Any:
    r"""Loss (and accuracy, when the curves have it) against $\lambda$, one line per curve.

    The legends sit below the axes, outside the plotting area, so they never cover a curve.

    Args:
        plt: `matplotlib.pyplot`.
        curves: label to curve (e.g. `{"naive": ..., "weight_matching": ...}`).
        title: the figure title.

    Returns:
        The `Figure`: axes 0 holds one line per curve with y data `curve.loss` (labelled with
        its barrier), axes 1 (if any) one with y data `curve.accuracy`.
    """
    if not curves:
        raise ValueError("interpolation_figure needs at least one curve, got none")
    has_acc = any(c.accuracy and c.accuracy[0] is not None for c in curves.values())
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 5, 4.5),
                             squeeze=False, layout="constrained")
    axes = list(axes[0])
    for label, c in curves.items():
        axes[0].plot(c.lambdas, c.loss, marker="o", label=f"{label} (barrier {c.barrier:.3f})")
        if has_acc and c.accuracy and c.accuracy[0] is not None:
            axes[1].plot(c.lambdas, c.accuracy, marker="o", label=label)
    axes[0].set_ylabel("loss")
    if has_acc:
        axes[1].set_ylabel("accuracy")
    for ax in axes:
        ax.set_xlabel("λ")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(2, len(curves)),
                  frameon=False)
    fig.suptitle(title)
    return fig


def plot_curves(curves: Mapping[str, InterpolationCurve], path: str | Path,
                title: str = "Linear interpolation") -> Path | None:
    r"""Save loss (and accuracy) against $\lambda$ as a PNG (atomically; see
    `interpolation_figure`) and print where.

    Args:
        curves: label to curve.
        path: the PNG path.
        title: the figure title.

    Returns:
        The path, or `None` (with a printed message) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the interpolation plot "
              "(pip install matplotlib)")
        return None
    from graphspace.io import atomic_write

    fig = interpolation_figure(plt, curves, title)
    out = atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120,
                                                     bbox_inches="tight"))
    plt.close(fig)
    print(f"interpolation plot -> {out}")
    return out
