r"""Stochastic-block-model graphs, generated locally and deterministically under a seed.

Each graph is drawn from a stochastic block model (Holland et al. 1983) with
`torch_geometric.utils.stochastic_blockmodel_graph`: nodes in blocks $b(i)$, an
undirected edge $\{i, j\}$ present with probability $p_{in}$ if
$b(i) = b(j)$ and $p_{out}$ otherwise. Node features are a noisy one-hot code of the
block,

$$
\mathbf{x}_i = s\,\mathbf{e}_{b(i)} + \sigma\,\boldsymbol{\epsilon}_i,
\qquad \boldsymbol{\epsilon}_i \sim \mathcal{N}(0, I_F),
$$

($\mathbf{e}_{b}$ is the $b$-th unit vector of $\mathbb{R}^F$, $F \ge$
the number of blocks), and the node label is the block. With $s / \sigma$ small the
features alone are ambiguous and a GNN has to use the community structure, which makes SBM a
controlled benchmark for node-level graph contrastive learning (linear-probe accuracy on frozen
embeddings, as in GRACE, Zhu et al. 2020).

Every graph carries `train_mask` / `val_mask` / `test_mask` (a random split of its nodes,
by default 10 % / 10 % / 80 % as in GRACE's evaluation protocol).
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch_geometric.data import Data, InMemoryDataset
from torch_geometric.loader import DataLoader
from torch_geometric.utils import stochastic_blockmodel_graph


def make_sbm_graph(
    block_sizes: Sequence[int],
    p_in: float,
    p_out: float,
    num_features: int,
    feature_signal: float = 1.0,
    feature_noise: float = 1.0,
    train_ratio: float = 0.1,
    val_ratio: float = 0.1,
    seed: int = 0,
) -> Data:
    r"""One SBM graph with noisy one-hot block features, labels and a node split.

    The global random state is left untouched (the graph is drawn inside
    `torch.random.fork_rng`), so the same arguments always give the same graph.

    Args:
        block_sizes: nodes per block.
        p_in, p_out: edge probabilities within and between blocks.
        num_features: feature size $F$ (at least the number of blocks).
        feature_signal: $s$, the weight of the one-hot block code (default 1).
        feature_noise: $\sigma$, the standard deviation of the Gaussian noise (default 1).
        train_ratio, val_ratio: fractions of nodes in the train / validation masks; the rest
            is the test mask.
        seed: random seed.

    Returns:
        `Data(x [N, F], edge_index [2, E] (undirected, no self-loops), y [N],
        train_mask, val_mask, test_mask [N])`.
    """
    k = len(block_sizes)
    if k == 0 or min(block_sizes) <= 0:
        raise ValueError(f"block_sizes must be positive, got {list(block_sizes)}")
    if num_features < k:
        raise ValueError(f"num_features={num_features} < number of blocks {k}")
    if not (0.0 <= p_out <= 1.0 and 0.0 <= p_in <= 1.0):
        raise ValueError("edge probabilities must lie in [0, 1]")
    if train_ratio <= 0 or val_ratio < 0 or train_ratio + val_ratio >= 1:
        raise ValueError("need train_ratio > 0, val_ratio >= 0, train_ratio + val_ratio < 1")
    probs = torch.full((k, k), float(p_out))
    probs.fill_diagonal_(float(p_in))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        edge_index = stochastic_blockmodel_graph(list(block_sizes), probs, directed=False)
        y = torch.repeat_interleave(torch.arange(k), torch.tensor(list(block_sizes)))
        n = y.numel()
        x = feature_signal * torch.nn.functional.one_hot(y, num_features).float()
        x = x + feature_noise * torch.randn(n, num_features)
        perm = torch.randperm(n)
    n_train = max(1, round(train_ratio * n))
    n_val = round(val_ratio * n)
    masks = []
    for lo, hi in ((0, n_train), (n_train, n_train + n_val), (n_train + n_val, n)):
        m = torch.zeros(n, dtype=torch.bool)
        m[perm[lo:hi]] = True
        masks.append(m)
    return Data(x=x, edge_index=edge_index, y=y, train_mask=masks[0], val_mask=masks[1],
                test_mask=masks[2], num_nodes=n)


class SBMDataset(InMemoryDataset):
    r"""`num_graphs` stochastic-block-model graphs (see
    [`make_sbm_graph`][graphspace.data.sbm.make_sbm_graph]), held in memory; graph `g` is drawn with
    seed `seed + g`. Nothing is written to disk.

    Args:
        num_graphs: number of graphs (default 1).
        block_sizes: nodes per block (default four blocks of 100).
        p_in, p_out: within / between-block edge probabilities (default 0.1 / 0.01).
        num_features: feature size (default 16).
        feature_signal, feature_noise: one-hot weight and noise level (default 1 / 1.5).
        train_ratio, val_ratio: node split (default 0.1 / 0.1).
        seed: base seed (default 0).
    """

    def __init__(
        self,
        num_graphs: int = 1,
        block_sizes: Sequence[int] = (100, 100, 100, 100),
        p_in: float = 0.1,
        p_out: float = 0.01,
        num_features: int = 16,
        feature_signal: float = 1.0,
        feature_noise: float = 1.5,
        train_ratio: float = 0.1,
        val_ratio: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__(None)
        graphs = [
            make_sbm_graph(block_sizes, p_in, p_out, num_features, feature_signal,
                           feature_noise, train_ratio, val_ratio, seed + g)
            for g in range(num_graphs)
        ]
        self.num_blocks = len(block_sizes)
        self.data, self.slices = self.collate(graphs)

    @property
    def num_classes(self) -> int:
        return self.num_blocks


class SBMDataModule(pl.LightningDataModule):
    r"""A `LightningDataModule` of SBM graphs for node-level contrastive learning.

    Training iterates over the graphs (unsupervised: labels are not used by the contrastive
    loss); validation and test iterate over the same graphs, whose `train_mask` nodes train a
    linear probe that is scored on `val_mask` / `test_mask` nodes. Deterministic under
    `seed`.

    Args:
        num_graphs: graphs in the dataset (default 1).
        num_blocks, block_size: `num_blocks` blocks of `block_size` nodes, unless
            `block_sizes` is given (default 4 x 100).
        block_sizes: explicit block sizes (overrides `num_blocks` / `block_size`).
        p_in, p_out, num_features, feature_signal, feature_noise, train_ratio, val_ratio, seed:
            see [`make_sbm_graph`][graphspace.data.sbm.make_sbm_graph].
        batch_size: graphs per batch (default 1).
    """

    def __init__(
        self,
        num_graphs: int = 1,
        num_blocks: int = 4,
        block_size: int = 100,
        block_sizes: Sequence[int] | None = None,
        p_in: float = 0.1,
        p_out: float = 0.01,
        num_features: int = 16,
        feature_signal: float = 1.0,
        feature_noise: float = 1.5,
        train_ratio: float = 0.1,
        val_ratio: float = 0.1,
        seed: int = 0,
        batch_size: int = 1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.block_sizes = list(block_sizes) if block_sizes is not None \
            else [block_size] * num_blocks
        self.dataset: SBMDataset | None = None

    @property
    def num_features(self) -> int:
        return int(self.hparams.num_features)

    @property
    def num_classes(self) -> int:
        return len(self.block_sizes)

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            h = self.hparams
            self.dataset = SBMDataset(h.num_graphs, self.block_sizes, h.p_in, h.p_out,
                                      h.num_features, h.feature_signal, h.feature_noise,
                                      h.train_ratio, h.val_ratio, h.seed)

    def _loader(self, shuffle: bool) -> DataLoader:
        self.setup()
        assert self.dataset is not None
        gen = torch.Generator().manual_seed(int(self.hparams.seed))
        return DataLoader(self.dataset, batch_size=self.hparams.batch_size, shuffle=shuffle,
                          generator=gen if shuffle else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader(shuffle=self.hparams.num_graphs > 1)

    def val_dataloader(self) -> DataLoader:
        return self._loader(shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(shuffle=False)


def block_homophily(data: Data) -> Tensor:
    """Fraction of edges that join nodes of the same block (edge homophily)."""
    src, dst = data.edge_index
    return (data.y[src] == data.y[dst]).float().mean()
