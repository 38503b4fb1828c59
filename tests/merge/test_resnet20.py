"""Weight matching on the Git Re-Basin ResNet-20 (width 1): the automatically derived spec finds
all 12 permutation groups and matching undoes an exact permutation."""

import copy

import pytest
import torch

from graphspace.merge import AlignmentSpec, align_state, invert, permuted_copy, weight_matching
from graphspace.merge.weight_matching import _IncrementalCosts, _independent_runs, group_cost
from graphspace.testing.models import resnet20


def _randomised(seed: int) -> torch.nn.Module:
    """ResNet-20 whose BatchNorm parameters and statistics are random too (fresh ones are
    constant, which would hide a mis-permuted norm)."""
    torch.manual_seed(seed)
    model = resnet20(1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return model.eval()


@pytest.fixture(scope="module")
def model_a() -> torch.nn.Module:
    return _randomised(0)


@pytest.fixture(scope="module")
def spec(model_a) -> AlignmentSpec:
    return AlignmentSpec(model_a)


def _random_perms(spec: AlignmentSpec, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {grp.name: torch.randperm(grp.size, generator=g) for grp in spec.groups}


def test_all_twelve_groups_found(spec, model_a):
    assert len(spec.groups) == 12
    # a residual stream ties the stem / shortcut / conv2 outputs of a stage (11 neuron sets);
    # a block-internal group is one conv1 output and its BatchNorm (2 sets)
    streams = sorted(g.size for g in spec.groups if len(g.members) > 2)
    internal = sorted(g.size for g in spec.groups if len(g.members) == 2)
    assert streams == [16, 32, 64]
    assert internal == [16] * 3 + [32] * 3 + [64] * 3
    # every tensor except fc.bias and the BN batch counters has an axis some group permutes
    touched = {s.key for slots in spec.slots for s in slots}
    untouched = {k for k in model_a.state_dict() if k not in touched
                 and not k.endswith(("running_mean", "running_var"))}
    assert untouched == {"fc.bias"} | {k for k in model_a.state_dict()
                                       if k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_permuted_copy_is_recovered(spec, model_a, seed):
    perms = _random_perms(spec, seed)
    b = permuted_copy(model_a, perms, spec)
    sa, sb = model_a.state_dict(), b.state_dict()
    assert not torch.equal(sa["layers.8.conv1.weight"], sb["layers.8.conv1.weight"])
    # the permuted copy computes the same function (eval mode: BN uses permuted statistics)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ya, yb = model_a(x), b.eval()(x)
    assert (ya - yb).abs().max() <= 1e-5
    res = weight_matching(model_a, b, spec=spec, seed=seed)
    assert res.converged and res.passes <= 5
    expected = invert(perms)
    assert all(torch.equal(res.perms[k], expected[k]) for k in perms)
    aligned = align_state(spec, sb, res.perms)
    for k, v in sa.items():
        assert torch.equal(aligned[k], v), k
    with torch.no_grad():
        assert (permuted_copy(b, res.perms, spec).eval()(x) - ya).abs().max() <= 1e-5


def test_self_alignment_is_identity(spec, model_a):
    res = weight_matching(model_a, copy.deepcopy(model_a), spec=spec)
    assert res.passes == 1 and res.converged
    for name, perm in res.perms.items():
        assert torch.equal(perm, torch.arange(perm.numel())), name


def test_independent_models_objective_matches_dense_inner_product(spec, model_a):
    b = _randomised(1)
    res = weight_matching(model_a, b, spec=spec)
    aligned = align_state(spec, b.state_dict(), res.perms)
    sa = model_a.state_dict()

    def inner(sd):
        return sum(float((sa[k].double() * sd[k].double()).sum()) for k in spec.matched)

    assert inner(aligned) == pytest.approx(res.objective[-1], rel=1e-6)
    assert inner(aligned) > inner(b.state_dict())


def test_incremental_costs_equal_fresh_costs(spec, model_a):
    """Costs updated by low-rank corrections after every group moved equal costs computed
    from scratch (group_cost) under the new permutations."""
    b = _randomised(1)
    a_c = spec.canonical(model_a.state_dict(), dtype=torch.float64)
    b_c = spec.canonical(b.state_dict(), dtype=torch.float64)
    inc = _IncrementalCosts(spec, a_c, b_c, torch.float64)
    prev = spec.identity()
    for step in range(4):
        perms = _random_perms(spec, 10 + step)
        if step >= 2:  # only some groups move: others must pick up exactly their moves
            perms = {k: (p if i % 3 else prev[k]) for i, (k, p) in enumerate(perms.items())}
        for gi, g in enumerate(spec.groups):  # the matching loop reports every move
            if not torch.equal(perms[g.name], prev[g.name]):
                inc.touch(gi)
        prev = perms
        node_map = spec.node_map(perms)
        for gi in range(len(spec.groups)):
            got = inc.get(gi, node_map)
            want = group_cost(spec, gi, a_c, b_c, node_map)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
            inc.dirty[gi] = False
        # unchanged permutations: nothing to update, nothing marked dirty
        for gi in range(len(spec.groups)):
            inc.get(gi, node_map)
        assert not any(inc.dirty)


def test_concurrent_solves_give_the_sequential_result(spec, model_a, monkeypatch):
    """Units solved together in threads are never dependent on each other, so matching with
    parallel solves returns exactly what one-at-a-time matching returns."""
    import importlib

    wm = importlib.import_module("graphspace.merge.weight_matching")
    monkeypatch.setattr(wm, "PARALLEL_MIN_SIZE", 1)  # this model's groups are small
    monkeypatch.setattr(wm, "_POOL", None)
    b = _randomised(2)
    costs = _IncrementalCosts(spec, spec.canonical(model_a.state_dict()),
                              spec.canonical(b.state_dict()), torch.float32)
    reads = {tuple(u): costs.reads(u) for u in spec.units}
    runs = _independent_runs(list(spec.units), reads, 2)
    assert any(len(r) == 2 for r in runs)  # the parallel path is exercised
    for run in runs:
        assert not (reads[tuple(run[-1])] & set(run[0])) or len(run) == 1
    one = weight_matching(model_a, b, spec=spec, parallel_solves=1, seed=3)
    assert wm._POOL is None
    two = weight_matching(model_a, b, spec=spec, parallel_solves=2, seed=3)
    assert wm._POOL is not None  # threads were used
    assert one.passes == two.passes and one.objective == two.objective
    for k, p in one.perms.items():
        assert torch.equal(p, two.perms[k])
    # a stream group reads the block-internal groups around it: never paired with them
    stream = max(range(len(spec.groups)), key=lambda g: len(spec.groups[g].members))
    assert len(reads[(stream,)]) > 1


def _match_in_child(a, b) -> None:
    torch.set_num_threads(1)  # torch's own OpenMP pool does not survive fork either
    weight_matching(a, b)


def test_parallel_solves_work_in_a_forked_child(model_a, monkeypatch):
    """The solver threads belong to the process that made them: a forked child (DataLoader
    workers, DDP launchers) must make its own instead of waiting on threads it does not have."""
    import importlib
    import multiprocessing
    import os

    if not hasattr(os, "fork"):
        pytest.skip("needs fork")
    wm = importlib.import_module("graphspace.merge.weight_matching")
    monkeypatch.setattr(wm, "PARALLEL_MIN_SIZE", 1)
    b = _randomised(4)
    weight_matching(model_a, b)  # the parent's pool now exists
    assert wm._POOL is not None
    proc = multiprocessing.get_context("fork").Process(target=_match_in_child, args=(model_a, b))
    proc.start()
    proc.join(60)
    if proc.is_alive():
        proc.kill()
        pytest.fail("weight matching hung in a forked child")
    assert proc.exitcode == 0
