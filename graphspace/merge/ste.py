r"""Straight-through estimator matching (Ainsworth et al. 2023, "Git Re-Basin", sec. 3.3).

Learn the permutation of B that minimises the loss at the midpoint of A and the permuted B.
Free weights $\tilde\theta$ (initialised at $\theta_A$) are projected onto the
permutation orbit of B by weight matching, $\mathrm{proj}(\tilde\theta) =
\pi^\star(\theta_B)$ with $\pi^\star = \arg\max_\pi \langle \tilde\theta,
\pi(\theta_B)\rangle$; the loss

$$
\mathcal L\Big(\tfrac12\big(\theta_A + \mathrm{proj}(\tilde\theta)\big)\Big)
$$

is evaluated at the projected point while its gradient flows straight through the projection to
$\tilde\theta$ (forward value $\tilde\theta + \mathrm{sg}(\pi^\star(\theta_B) -
\tilde\theta)$). Each step warm-starts weight matching from the previous permutation; the
permutation with the lowest validation (or, without validation, training) midpoint loss is kept.
Defaults follow the authors' MNIST MLP setup (SGD, learning rate $10^{-2}$, momentum 0.9).

[`STEMatching`][graphspace.merge.ste.STEMatching] is a `LightningModule`: run it with a `Trainer`,
from a LightningCLI YAML (`experiments/merge_ste_digits.yaml`) or with
[`ste_matching`][graphspace.merge.ste.ste_matching].
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from graphspace.merge._utils import batch_input, batch_target, iterate, to_device
from graphspace.merge.spec import AlignmentSpec
from graphspace.merge.weight_matching import MatchResult, align_state, weight_matching
from graphspace.tasks.outputs import PredictionsFile


def _sanitize(key: str) -> str:
    return key.replace(".", "__")


def _load_endpoint(model: str | None, kwargs: dict[str, Any] | None,
                   checkpoint: str | None, which: str) -> nn.Module:
    from graphspace.io import build_model, load_state_dict

    if model is None or checkpoint is None:
        raise ValueError(f"STEMatching needs model_{which}, or `model` (package.module:Factory) "
                         f"and `checkpoint_{which}`")
    m = build_model(model, kwargs)
    m.load_state_dict(load_state_dict(checkpoint))
    return m


class STEMatching(PredictionsFile, pl.LightningModule):
    r"""Learn B's permutation with a straight-through estimator of the midpoint loss.

    Args:
        model: model factory `"package.module:Factory"` (used with the checkpoints).
        checkpoint_a: checkpoint of the reference model A (safetensors or `torch.save`).
        checkpoint_b: checkpoint of model B.
        model_kwargs: keyword arguments of the factory.
        lr: learning rate (default `1e-2`).
        momentum: SGD momentum (default 0.9).
        optimizer: `"sgd"` or `"adam"`.
        max_passes: pass limit of each weight-matching projection.
        seed: seed of the group order in weight matching.
        output: if set, the merged midpoint (best permutation) is written there after `fit`.
        model_a: the reference model itself (instead of `model`/`checkpoint_a`).
        model_b: model B itself.

    Shapes:
        batches are `(x, y)` pairs (or dicts with `"x"`/`"y"`); the loss is cross-entropy.
    """

    def __init__(
        self,
        model: str | None = None,
        checkpoint_a: str | None = None,
        checkpoint_b: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        lr: float = 1e-2,
        momentum: float = 0.9,
        optimizer: str = "sgd",
        max_passes: int = 100,
        seed: int = 0,
        output: str | None = None,
        model_a: nn.Module | None = None,
        model_b: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model_a", "model_b"])
        if model_a is None:
            model_a = _load_endpoint(model, model_kwargs, checkpoint_a, "a")
        if model_b is None:
            model_b = _load_endpoint(model, model_kwargs, checkpoint_b, "b")
        self.model_a = copy.deepcopy(model_a).requires_grad_(False)
        self.model_b = copy.deepcopy(model_b).requires_grad_(False)
        self.spec = AlignmentSpec(self.model_a)
        self.spec.check(self.model_b.state_dict(), "model B")
        self.param_keys = [k for k, _ in self.model_a.named_parameters()]
        self.tilde = nn.ParameterDict({
            _sanitize(k): nn.Parameter(p.detach().clone())
            for k, p in self.model_a.named_parameters()
        })
        self.lr, self.momentum, self.optimizer_name = lr, momentum, optimizer
        self.max_passes, self.seed, self.output = max_passes, seed, output
        self.loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy
        self._perms: dict[str, Tensor] | None = None
        #: best permutation and midpoint loss by validation, and by training batches
        self.best: dict[str, tuple[float, dict[str, Tensor] | None]] = {
            "val": (math.inf, None), "train": (math.inf, None)}
        self._val: list[tuple[float, int]] = []
        self._test: dict[str, list[float]] = {}

    # -- the projection ---------------------------------------------------------------------
    def _states(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return ({k: v.detach() for k, v in self.model_a.state_dict().items()},
                {k: v.detach() for k, v in self.model_b.state_dict().items()})

    def project(self) -> dict[str, Tensor]:
        """Weight matching of B onto the current free weights (warm-started)."""
        sa, sb = self._states()
        tilde = dict(sa)
        tilde.update({k: self.tilde[_sanitize(k)].detach() for k in self.param_keys})
        res = weight_matching(tilde, sb, spec=self.spec, init=self._perms,
                              max_passes=self.max_passes, seed=self.seed,
                              device=self.device)
        self._perms = res.perms
        return res.perms

    def _permuted_b(self, perms: dict[str, Tensor]) -> dict[str, Tensor]:
        _, sb = self._states()
        cpu = align_state(self.spec, {k: v.cpu() for k, v in sb.items()}, perms)
        return {k: v.to(self.device) for k, v in cpu.items()}

    def midpoint_state(self, perms: dict[str, Tensor], straight_through: bool = False
                       ) -> dict[str, Tensor]:
        r"""$\tfrac12(\theta_A + \pi(\theta_B))$ (straight-through to the free weights)."""
        sa, _ = self._states()
        pb = self._permuted_b(perms)
        out = {}
        for k, va in sa.items():
            if not va.is_floating_point():
                out[k] = va
                continue
            vb = pb[k]
            if straight_through and k in self.param_keys:
                t = self.tilde[_sanitize(k)]
                vb = t + (vb - t).detach()
            out[k] = 0.5 * (va + vb)
        return out

    def _metrics(self, state: dict[str, Tensor], batch: Any) -> tuple[Tensor, Tensor | None]:
        x, y = batch_input(batch), batch_target(batch)
        if y is None:
            raise ValueError("STEMatching needs (input, target) batches")
        out = functional_call(self.model_a, state, (x,))
        loss = self.loss_fn(out, y)
        acc = (out.argmax(-1) == y).float().mean() if out.dim() == 2 and \
            not y.is_floating_point() else None
        return loss, acc

    # -- Lightning hooks --------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        perms = self.project()
        loss, acc = self._metrics(self.midpoint_state(perms, straight_through=True), batch)
        self._log("train/loss", loss, prog_bar=True)
        if acc is not None:
            self._log("train/acc", acc)
        self.offer(float(loss.detach()), perms, "train")
        return loss

    def _log(self, name: str, value: Tensor, **kw: Any) -> None:
        if self._trainer is not None:  # also usable without a Trainer (ste_matching)
            self.log(name, value, **kw)

    def offer(self, loss: float, perms: dict[str, Tensor], source: str) -> None:
        """Keep `perms` if its midpoint loss is the best seen from `source`."""
        if loss < self.best[source][0]:
            self.best[source] = (loss, {k: v.clone() for k, v in perms.items()})

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        perms = self._perms if self._perms is not None else self.project()
        with torch.no_grad():
            loss, acc = self._metrics(self.midpoint_state(perms), batch)
        n = int(batch_input(batch).shape[0])
        self._val.append((float(loss) * n, n))
        self._log("val/loss", loss, prog_bar=True)
        if acc is not None:
            self._log("val/acc", acc)
        return loss

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # partial data: not a fair score
            self._val.clear()
            return
        if self._val and self._perms is not None:
            self.offer(sum(s for s, _ in self._val) / sum(n for _, n in self._val), self._perms,
                       "val")
        self._val.clear()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        sa, sb = self._states()
        ident = self.spec.identity()
        rows = {
            "A": sa,
            "B": sb,
            "naive midpoint": self.midpoint_state(ident),
            "STE midpoint": self.midpoint_state(self.permutations()),
        }
        n = float(batch_input(batch).shape[0])
        with torch.no_grad():
            for name, st in rows.items():
                loss, acc = self._metrics(st, batch)
                acc_v = float(acc) if acc is not None else float("nan")
                r = self._test.setdefault(name, [0.0, 0.0, 0.0])
                r[0] += float(loss) * n
                r[1] += acc_v * n
                r[2] += n
                self._log(f"test/{name.replace(' ', '_')}_loss", loss)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0
                     ) -> dict[str, Tensor]:
        """Per-sample predictions of A, B, the naive midpoint and the STE midpoint (written to
        the run's predictions file, see `graphspace.tasks.outputs.PredictionsFile`).

        Returns:
            `{"target": [B], "pred_<model>": [B], "loss_<model>": [B]}` for the models `a`,
            `b`, `naive_midpoint` and `ste_midpoint` (per-sample cross-entropy; no loss
            columns when the batches carry no targets).
        """
        x, y = batch_input(batch), batch_target(batch)
        sa, sb = self._states()
        rows = {"a": sa, "b": sb, "naive_midpoint": self.midpoint_state(self.spec.identity()),
                "ste_midpoint": self.midpoint_state(self.permutations())}
        out: dict[str, Tensor] = {}
        if y is not None:
            out["target"] = y
        with torch.no_grad():
            for name, st in rows.items():
                logits = functional_call(self.model_a, st, (x,))
                out[f"pred_{name}"] = logits.argmax(-1)
                if y is not None:
                    out[f"loss_{name}"] = F.cross_entropy(logits.float(), y, reduction="none")
        return out

    def results_table(self) -> str:
        """Markdown table of the test losses/accuracies (A, B, naive and STE midpoints)."""
        lines = ["| model | loss | accuracy |", "|---|---|---|"]
        for name, (s, a, n) in self._test.items():
            lines.append(f"| {name} | {s / n:.4f} | {a / n:.4f} |")
        return "\n".join(lines)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = list(self.tilde.parameters())
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr)
        raise ValueError(f"unknown optimizer {self.optimizer_name!r}; use 'sgd' or 'adam'")

    def on_fit_end(self) -> None:
        if self.output:
            from graphspace.io import save_state_dict

            save_state_dict(self.merged_model().state_dict(), self.output)

    # -- results ----------------------------------------------------------------------------
    def permutations(self) -> dict[str, Tensor]:
        """The best permutation by validation loss, else by training loss, else the current."""
        for source in ("val", "train"):
            perms = self.best[source][1]
            if perms is not None:
                return perms
        return self._perms if self._perms is not None else self.project()

    def aligned_model_b(self) -> nn.Module:
        """A copy of B permuted by
        [`permutations`][graphspace.merge.ste.STEMatching.permutations]."""
        m = copy.deepcopy(self.model_b).requires_grad_(True)
        m.load_state_dict(self._permuted_b(self.permutations()))
        return m

    def merged_model(self) -> nn.Module:
        """The midpoint of A and the permuted B (a new module)."""
        m = copy.deepcopy(self.model_a).requires_grad_(True)
        m.load_state_dict(self.midpoint_state(self.permutations()))
        return m


def ste_matching(
    model_a: nn.Module,
    model_b: nn.Module,
    loader: Iterable,
    *,
    epochs: int = 5,
    val_loader: Iterable | None = None,
    lr: float = 1e-2,
    momentum: float = 0.9,
    optimizer: str = "sgd",
    seed: int = 0,
    num_batches: int | None = None,
) -> MatchResult:
    """Run [`STEMatching`][graphspace.merge.ste.STEMatching] with a plain training loop (no
    `Trainer`).

    The best permutation is chosen by the midpoint loss on `val_loader` before training (the
    plain weight-matching solution) and after every epoch (by the training-batch loss when no
    validation loader is given). `MatchResult.passes` counts the optimisation steps.
    """
    module = STEMatching(model_a=model_a, model_b=model_b, lr=lr, momentum=momentum,
                         optimizer=optimizer, seed=seed)
    dev = next(model_a.parameters()).device
    module.to(dev)
    opt = module.configure_optimizers()

    def validate() -> None:
        perms = module.project()
        total, n = 0.0, 0
        with torch.no_grad():
            for batch in val_loader:  # type: ignore[union-attr]
                batch = to_device(batch, dev)
                loss, _ = module._metrics(module.midpoint_state(perms), batch)
                k = int(batch_input(batch).shape[0])
                total, n = total + float(loss) * k, n + k
        if n:
            module.offer(total / n, perms, "val")

    if val_loader is not None:  # the starting point (plain weight matching) is a candidate
        validate()
    steps = 0
    for _ in range(epochs):
        module.train()
        for batch in iterate(loader, num_batches):
            batch = to_device(batch, dev)
            perms = module.project()
            loss, _ = module._metrics(module.midpoint_state(perms, straight_through=True), batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            module.offer(float(loss.detach()), perms, "train")
        if val_loader is not None:
            module.eval()
            validate()
    return MatchResult(perms=module.permutations(), passes=steps)
