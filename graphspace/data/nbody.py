r"""Charged-particle N-body dataset (Kipf et al. 2018; Fuchs et al. 2020; Satorras et al. 2021).

The system of the EGNN paper's N-body experiment: $n = 5$ particles in 3-D with
charges $q_i \in \{-1, +1\}$ (uniform), unit masses and pairwise Coulomb-like forces

$$
\mathbf{F}_i = \kappa \sum_{j \ne i} q_i q_j
    \frac{\mathbf{x}_i - \mathbf{x}_j}{\lVert \mathbf{x}_i - \mathbf{x}_j \rVert^3}
= -\nabla_{\mathbf{x}_i} U, \qquad
U = \kappa \sum_{i < j} \frac{q_i q_j}{\lVert \mathbf{x}_i - \mathbf{x}_j \rVert}
$$

(like charges repel). Initial positions are $\mathcal{N}(0, \sigma_{loc}^2)$ with
$\sigma_{loc} = 1$; initial velocities have a uniformly random direction and norm
`vel_norm` $= 0.5$. The trajectory is integrated with the leapfrog scheme of the
NRI simulator (a first kick, then drift $\mathbf{x} \mathrel{+}= \Delta t\,
\mathbf{v}$ and kick $\mathbf{v} \mathrel{+}= \Delta t\, \mathbf{F}(\mathbf{x})$
per step, $\Delta t = 0.001$), with every force component clipped to
$\pm 0.1/\Delta t$ as in the reference simulator, and no bounding box (removed by
Fuchs et al. for the 3-D version). A frame is saved every `sample_freq = 100` steps;
frame $k$ is the state after step $(k+1) \cdot 100$. The learning task of
Satorras et al. (2021) maps the positions/velocities at frame 30 to the positions at
frame 40, i.e. 1000 integration steps later, with 3000 / 2000 / 2000 train / val / test
trajectories.

References:
    T. Kipf, E. Fetaya, K.-C. Wang, M. Welling, R. Zemel, "Neural Relational Inference for
    Interacting Systems", ICML 2018. F. Fuchs, D. Worrall, V. Fischer, M. Welling,
    "SE(3)-Transformers", NeurIPS 2020. V. G. Satorras, E. Hoogeboom, M. Welling,
    "E(n) Equivariant Graph Neural Networks", ICML 2021.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor
from torch_geometric.data import Data, InMemoryDataset

__all__ = [
    "ChargedSimulation",
    "NBodyCharged",
    "charged_energy",
    "coulomb_forces",
    "simulate_charged_particles",
]

_DEFAULT_SIZES = {"train": 3000, "val": 2000, "test": 2000}
_SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}


class ChargedSimulation(NamedTuple):
    """Output of [`simulate_charged_particles`][graphspace.data.nbody.simulate_charged_particles].

    Attributes:
        loc: saved positions, shape `(S, F, n, d)` (`F` saved frames).
        vel: saved velocities (the velocity of the drift that produced `loc`; a
            half step behind the positions in leapfrog terms), `(S, F, n, d)`.
        charges: particle charges, `(S, n)`.
        clamped: whether any force component was clipped in the trajectory, `(S,)`.
        min_dist: smallest pairwise distance seen over the integration, `(S,)`.
    """

    loc: Tensor
    vel: Tensor
    charges: Tensor
    clamped: Tensor
    min_dist: Tensor


def coulomb_forces(
    loc: Tensor, charges: Tensor, interaction_strength: float = 1.0
) -> tuple[Tensor, Tensor]:
    r"""Pairwise Coulomb-like forces $\mathbf{F}_i = \kappa \sum_{j\ne i} q_i q_j
    (\mathbf{x}_i - \mathbf{x}_j)/\lVert \mathbf{x}_i - \mathbf{x}_j\rVert^3$.

    Args:
        loc: positions `(..., n, d)`.
        charges: charges `(..., n)`.
        interaction_strength: $\kappa$.

    Returns:
        `(forces (..., n, d), min pairwise distance (...))`.
    """
    n = loc.size(-2)
    diff = loc.unsqueeze(-2) - loc.unsqueeze(-3)  # (..., n, n, d): x_i - x_j
    r2 = (diff * diff).sum(-1)
    eye = torch.eye(n, dtype=torch.bool, device=loc.device)
    r2 = r2.masked_fill(eye, 1.0)
    inv_r3 = r2.pow(-1.5).masked_fill(eye, 0.0)
    size = interaction_strength * charges.unsqueeze(-1) * charges.unsqueeze(-2) * inv_r3
    forces = (size.unsqueeze(-1) * diff).sum(-2)
    min_dist = r2.masked_fill(eye, float("inf")).flatten(-2).amin(-1).sqrt()
    return forces, min_dist


def charged_energy(
    loc: Tensor, vel: Tensor, charges: Tensor, interaction_strength: float = 1.0
) -> Tensor:
    r"""Total energy $\tfrac12 \sum_i \lVert\mathbf{v}_i\rVert^2 + \kappa \sum_{i<j}
    q_i q_j / \lVert \mathbf{x}_i - \mathbf{x}_j \rVert$ (unit masses).

    Args:
        loc: positions `(..., n, d)`.
        vel: velocities `(..., n, d)`.
        charges: charges `(..., n)`.
        interaction_strength: $\kappa$.

    Returns:
        Energies of shape `(...)`.
    """
    n = loc.size(-2)
    kinetic = 0.5 * (vel * vel).sum((-1, -2))
    diff = loc.unsqueeze(-2) - loc.unsqueeze(-3)
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=loc.device), diagonal=1)
    # mask the diagonal before the square root (finite gradients)
    r = (diff * diff).sum(-1).masked_fill(~upper, 1.0).sqrt()
    qq = charges.unsqueeze(-1) * charges.unsqueeze(-2)
    pot = torch.where(upper, qq / r, 0.0)
    return kinetic + interaction_strength * pot.sum((-1, -2))


def simulate_charged_particles(
    num_samples: int,
    num_frames: int,
    num_particles: int = 5,
    dim: int = 3,
    sample_freq: int = 100,
    delta_t: float = 0.001,
    loc_std: float = 1.0,
    vel_norm: float = 0.5,
    interaction_strength: float = 1.0,
    max_force: float | None | Literal["default"] = "default",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> ChargedSimulation:
    r"""Simulate `num_samples` independent charged-particle systems, vectorised.

    Args:
        num_samples: number of trajectories $S$.
        num_frames: number of saved frames $F$; frame $k$ is the state after
            step $(k+1) \cdot$ `sample_freq`.
        num_particles: particles per system (5 in the paper).
        dim: spatial dimension (3 in the paper).
        sample_freq: integration steps between saved frames (100).
        delta_t: integration step $\Delta t$ (0.001).
        loc_std: standard deviation of the initial positions (1.0).
        vel_norm: norm of every initial velocity (0.5).
        interaction_strength: force constant $\kappa$ (1.0).
        max_force: clip every force component to $\pm$ this value; `"default"`
            is the reference simulator's $0.1/\Delta t$, `None` disables clipping
            (then total momentum is conserved exactly).
        generator: random generator (determinism); the draw order is charges, positions,
            velocities.
        dtype: floating dtype of the integration (float64 by default).

    Returns:
        A `ChargedSimulation`.
    """
    if max_force == "default":
        max_force = 0.1 / delta_t
    g = generator
    s, n = num_samples, num_particles
    charges = torch.randint(0, 2, (s, n), generator=g).to(dtype) * 2 - 1
    loc = torch.randn(s, n, dim, generator=g, dtype=dtype) * loc_std
    vel = torch.randn(s, n, dim, generator=g, dtype=dtype)
    vel = vel * (vel_norm / vel.norm(dim=-1, keepdim=True))

    clamped = torch.zeros(s, dtype=torch.bool)
    min_dist = torch.full((s,), float("inf"), dtype=dtype)

    def kick(loc: Tensor) -> Tensor:
        nonlocal clamped, min_dist
        forces, md = coulomb_forces(loc, charges, interaction_strength)
        min_dist = torch.minimum(min_dist, md)
        if max_force is not None:
            clamped = clamped | (forces.abs() > max_force).flatten(1).any(1)
            forces = forces.clamp(-max_force, max_force)
        return delta_t * forces

    locs = torch.empty(s, num_frames, n, dim, dtype=dtype)
    vels = torch.empty_like(locs)
    vel = vel + kick(loc)
    for step in range(1, num_frames * sample_freq + 1):
        loc = loc + delta_t * vel
        if step % sample_freq == 0:
            frame = step // sample_freq - 1
            locs[:, frame] = loc
            vels[:, frame] = vel
            if frame == num_frames - 1:
                break
        vel = vel + kick(loc)
    return ChargedSimulation(locs, vels, charges, clamped, min_dist)


class NBodyCharged(InMemoryDataset):
    r"""The charged-particle N-body dataset of the EGNN paper, generated locally.

    Each `Data` is one system at frame `frame_input` with

    * `pos` $(n, d)$: positions, `vel` $(n, d)$: velocities,
    * `charges` $(n, 1)$: charges $\pm 1$,
    * `y` $(n, d)$: the target positions at frame `frame_target`
      ($(40-30) \times 100 = 1000$ steps later by default),
    * `edge_index` $(2, n(n-1))$: the fully connected graph without self loops,
    * `edge_attr` $(n(n-1), 1)$: the charge products $q_i q_j$,
    * `clamped` $(1,)$: whether the simulator clipped a force in this trajectory
      (a close encounter; about 45% of the default trajectories).

    The EGNN baseline uses `x = ||vel||` as node feature and `[q_i q_j, ||x_i-x_j||^2]`
    as edge attributes (see `benchmarks/nbody_egnn.py`).

    `process()` simulates the split with a seed derived from `seed` and the split
    name (so splits are distinct and reproducible) and saves it under
    `root/processed`; the file name encodes every simulation parameter.

    Args:
        root: dataset directory.
        split: `"train"`, `"val"` or `"test"`.
        num_samples: trajectories in this split (default 3000 / 2000 / 2000).
        seed: base random seed.
        num_particles: particles per system (5).
        dim: spatial dimension (3).
        frame_input: input frame (30).
        frame_target: target frame (40).
        sample_freq: integration steps per frame (100).
        delta_t: integration step (0.001).
        loc_std: initial position scale (1.0).
        vel_norm: initial speed (0.5).
        interaction_strength: force constant (1.0).
        max_force: force clipping, see
            [`simulate_charged_particles`][graphspace.data.nbody.simulate_charged_particles].
        transform: PyG transform applied on access.
        pre_transform: PyG transform applied before saving.
        pre_filter: PyG filter applied before saving.
        force_reload: regenerate even if the processed file exists.
        log: print PyG processing messages.
    """

    def __init__(
        self,
        root: str,
        split: Literal["train", "val", "test"] = "train",
        num_samples: int | None = None,
        seed: int = 43,
        num_particles: int = 5,
        dim: int = 3,
        frame_input: int = 30,
        frame_target: int = 40,
        sample_freq: int = 100,
        delta_t: float = 0.001,
        loc_std: float = 1.0,
        vel_norm: float = 0.5,
        interaction_strength: float = 1.0,
        max_force: float | None | Literal["default"] = "default",
        transform: Callable | None = None,
        pre_transform: Callable | None = None,
        pre_filter: Callable | None = None,
        force_reload: bool = False,
        log: bool = False,
    ) -> None:
        if split not in _SPLIT_INDEX:
            raise ValueError(f"split must be one of {list(_SPLIT_INDEX)}, got {split!r}")
        if not 0 <= frame_input < frame_target:
            raise ValueError("need 0 <= frame_input < frame_target")
        self.split = split
        self.num_samples = _DEFAULT_SIZES[split] if num_samples is None else num_samples
        self.seed = seed
        self.params = {
            "num_samples": self.num_samples,
            "seed": seed,
            "num_particles": num_particles,
            "dim": dim,
            "frame_input": frame_input,
            "frame_target": frame_target,
            "sample_freq": sample_freq,
            "delta_t": delta_t,
            "loc_std": loc_std,
            "vel_norm": vel_norm,
            "interaction_strength": interaction_strength,
            "max_force": max_force,
        }
        super().__init__(
            root, transform, pre_transform, pre_filter, log=log, force_reload=force_reload
        )
        self.load(self.processed_paths[0])

    @property
    def raw_file_names(self) -> list[str]:
        return []

    @property
    def processed_file_names(self) -> list[str]:
        key = json.dumps(self.params, sort_keys=True).encode()
        digest = hashlib.sha1(key).hexdigest()[:12]
        return [f"nbody_charged_{self.split}_{digest}.pt"]

    def download(self) -> None:
        """Nothing to download: the data are simulated in `process`."""

    def split_seed(self) -> int:
        """The seed used for this split (distinct per split)."""
        return self.seed * 1009 + 7919 * _SPLIT_INDEX[self.split]

    def process(self) -> None:
        p = self.params
        gen = torch.Generator().manual_seed(self.split_seed())
        sim = simulate_charged_particles(
            p["num_samples"],
            num_frames=p["frame_target"] + 1,
            num_particles=p["num_particles"],
            dim=p["dim"],
            sample_freq=p["sample_freq"],
            delta_t=p["delta_t"],
            loc_std=p["loc_std"],
            vel_norm=p["vel_norm"],
            interaction_strength=p["interaction_strength"],
            max_force=p["max_force"],
            generator=gen,
        )
        n = p["num_particles"]
        edge_index = (~torch.eye(n, dtype=torch.bool)).nonzero().T.contiguous()
        f0, f1 = p["frame_input"], p["frame_target"]
        data_list = []
        for i in range(p["num_samples"]):
            q = sim.charges[i].float()
            data = Data(
                pos=sim.loc[i, f0].float(),
                vel=sim.vel[i, f0].float(),
                y=sim.loc[i, f1].float(),
                charges=q.unsqueeze(-1),
                edge_index=edge_index.clone(),
                edge_attr=(q[edge_index[0]] * q[edge_index[1]]).unsqueeze(-1),
                clamped=sim.clamped[i].view(1),
                num_nodes=n,
            )
            if self.pre_filter is not None and not self.pre_filter(data):
                continue
            if self.pre_transform is not None:
                data = self.pre_transform(data)
            data_list.append(data)
        self.save(data_list, self.processed_paths[0])

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({len(self)}, split={self.split!r})"
