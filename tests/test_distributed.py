"""Pruning across processes: every rank's masks equal, bit for bit, the
single-process fastprune result on the whole model. Each world size is one
spawn running every check (spawning costs seconds of imports)."""
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import fastprune.prune as FAST
from dist_util import run_ranks

SIZES = [(7, 5), (3, 11), (16, 4), (1, 1), (9, 9), (2, 6)]


def model(dtype, seed=0):
    """Linears whose weights have many ties (values on a coarse grid), so
    that the thresholds fall inside runs of equal magnitudes."""
    g = torch.Generator().manual_seed(seed)
    layers = nn.ModuleList(nn.Linear(i, o, bias=False) for o, i in SIZES)
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_((torch.randn(layer.weight.shape, generator=g) * 3).round() / 4)
    return layers.to(dtype)


def part(rank, world, n=len(SIZES)):
    """This rank's layer indices: contiguous, in rank order (uneven; a rank may get none)."""
    return list(range(n * rank // world, n * (rank + 1) // world))


def masks_of(layers, idx):
    return [layers[i].weight_mask.clone() for i in idx]


def partitioned_checks(rank, world):
    import fastprune.distributed as D

    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for amounts in ([0.4], [0.3, 17], [0.5, 0.25]):  # iterative rounds
            whole, mine = model(dtype), model(dtype)
            idx = part(rank, world)
            for amount in amounts:
                FAST.global_unstructured([(m, "weight") for m in whole], FAST.L1Unstructured, amount=amount)
                D.global_unstructured([(mine[i], "weight") for i in idx], FAST.L1Unstructured, amount=amount)
                for a, b in zip(masks_of(whole, idx), masks_of(mine, idx)):
                    assert torch.equal(a, b) and a.dtype == b.dtype, (dtype, amounts)
                for i in idx:
                    assert torch.equal(mine[i].weight, whole[i].weight)
    # Importance scores as a dict, as in the single-process API.
    whole, mine = model(torch.float32, 1), model(torch.float32, 1)
    idx = part(rank, world)
    scores = {i: torch.linspace(-1, 1, whole[i].weight.numel()).view(whole[i].weight.shape).round()
              for i in range(len(SIZES))}
    FAST.global_unstructured([(m, "weight") for m in whole], FAST.L1Unstructured, amount=0.6,
                             importance_scores={(whole[i], "weight"): scores[i] for i in range(len(SIZES))})
    D.global_unstructured([(mine[i], "weight") for i in idx], FAST.L1Unstructured, amount=0.6,
                          importance_scores={(mine[i], "weight"): scores[i] for i in idx})
    assert all(torch.equal(a, b) for a, b in zip(masks_of(whole, idx), masks_of(mine, idx)))

    # Random: exactly k, and the masks do not depend on the rank count.
    torch.manual_seed(5)
    mine = model(torch.float32)
    D.global_unstructured([(mine[i], "weight") for i in idx], FAST.RandomUnstructured, amount=0.3)
    out["random"] = {i: mine[i].weight_mask.clone() for i in idx}

    # Errors: a mismatched amount raises on every rank; nothing is pruned.
    mine = model(torch.float32)
    with pytest.raises(D.DistributedPruningError, match="different calls"):
        D.global_unstructured([(mine[i], "weight") for i in idx], FAST.L1Unstructured,
                              amount=0.3 if rank == 0 else 0.5)
    assert not FAST.is_pruned(mine)
    # A local error on one rank: that rank raises it, the others say which rank failed.
    bad = {(mine[i], "weight"): torch.ones(3) for i in idx} if rank == world - 1 else None
    if rank == world - 1 and idx:
        with pytest.raises(IndexError):
            D.global_unstructured([(mine[i], "weight") for i in idx], FAST.L1Unstructured, amount=0.3,
                                  importance_scores=bad)
    else:
        with pytest.raises((D.DistributedPruningError, IndexError), match=f"rank {world - 1} failed|shape"):
            D.global_unstructured([(mine[i], "weight") for i in idx], FAST.L1Unstructured, amount=0.3,
                                  importance_scores=bad)
    assert not FAST.is_pruned(mine)
    # An amount above the global candidates: the single-process error, on every rank.
    with pytest.raises(ValueError, match="should be smaller than the number of parameters"):
        D.global_unstructured([(mine[i], "weight") for i in idx], FAST.L1Unstructured, amount=10 ** 6)
    assert not FAST.is_pruned(mine)
    return out


@pytest.fixture(scope="module")
def partitioned():
    return {world: run_ranks(world, partitioned_checks) for world in (2, 3, 4)}


def test_partitioned_masks_equal_the_single_process_result(partitioned):
    assert set(partitioned) == {2, 3, 4}


def test_partitioned_random_prunes_exactly_k_whatever_the_rank_count(partitioned):
    total = sum(o * i for o, i in SIZES)
    results = []
    for world, per_rank in partitioned.items():
        masks = {}
        for r in per_rank:
            masks.update(r["random"])
        assert sorted(masks) == list(range(len(SIZES)))
        flat = torch.cat([masks[i].reshape(-1) for i in range(len(SIZES))])
        assert int((flat == 0).sum()) == round(0.3 * total)
        results.append(flat)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_no_process_group_is_a_clear_error():
    import fastprune.distributed as D

    with pytest.raises(RuntimeError, match="no initialized process group"):
        D.global_unstructured([(nn.Linear(2, 2), "weight")], FAST.L1Unstructured, amount=0.5)


def dtensor_checks(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    meshes = [(init_device_mesh("cpu", (world,)), [[Shard(0)], [Shard(1)], [Replicate()]])]
    if world == 4:
        mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        meshes.append((mesh2, [[Replicate(), Shard(0)], [Shard(0), Shard(1)], [Shard(1), Shard(1)]]))

    def sharded(layers, mesh, placements):
        for layer in layers:
            layer.weight = nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, placements))
        return layers

    checked = 0
    for mesh, placement_list in meshes:
        for placements in placement_list:
            for dtype in (torch.float32, torch.bfloat16):
                # Per tensor, then an iterative round (the container path).
                whole, mine = model(dtype), sharded(model(dtype), mesh, placements)
                for amount in (0.4, 0.25):
                    for a, b in zip(whole, mine):
                        FAST.l1_unstructured(a, "weight", amount=amount)
                        FAST.l1_unstructured(b, "weight", amount=amount)
                        assert type(b.weight_mask).__name__ == "DTensor"
                        assert b.weight_mask.placements == b.weight_orig.placements
                        assert torch.equal(a.weight_mask, b.weight_mask.full_tensor()), (placements, dtype)
                        assert torch.equal(a.weight, b.weight.full_tensor())
                # Global, twice (the second round ranks only what is left).
                whole, mine = model(dtype, 2), sharded(model(dtype, 2), mesh, placements)
                for amount in (0.3, 0.5):
                    FAST.global_unstructured([(m, "weight") for m in whole], FAST.L1Unstructured, amount=amount)
                    FAST.global_unstructured([(m, "weight") for m in mine], FAST.L1Unstructured, amount=amount)
                    for a, b in zip(whole, mine):
                        assert torch.equal(a.weight_mask, b.weight_mask.full_tensor()), (placements, dtype)
                # Remove makes it permanent, as unsharded.
                for a, b in zip(whole, mine):
                    FAST.remove(a, "weight")
                    FAST.remove(b, "weight")
                    assert torch.equal(a.weight, b.weight.full_tensor())
                assert not FAST.is_pruned(mine)
                checked += 1
    return checked


def all_dtensor_checks(rank, world):
    return {"l1": dtensor_checks(rank, world), **dtensor_method_checks(rank, world)}


@pytest.fixture(scope="module")
def dtensors():
    """One spawn per world size runs every DTensor check."""
    return {world: run_ranks(world, all_dtensor_checks, timeout=300) for world in (2, 3, 4)}


def test_dtensor_l1_masks_equal_the_unsharded_result(dtensors):
    assert all(r["l1"] > 0 for per_rank in dtensors.values() for r in per_rank)


def test_dtensor_structured_identity_custom_masks_and_errors(dtensors):
    # The checks ran inside the ranks (ln/random structured, identity,
    # custom_from_mask, containers, errors); here: every rank came back.
    assert {world: len(per_rank) for world, per_rank in dtensors.items()} == {2: 2, 3: 3, 4: 4}


def test_dtensor_random_unstructured_is_exact_and_rank_count_independent(dtensors):
    results = [masks for per_rank in dtensors.values() for r in per_rank for masks in r["random"].values()]
    assert len(results) >= 2 * 3 * 3
    for masks in results:
        for (o, i), m in zip(SIZES, masks):
            n = o * i
            kept = n - round(0.3 * n)
            assert int((m == 1).sum()) <= kept
        ones = sum(o * i - round(0.3 * o * i) for o, i in SIZES)
        assert int(sum((m == 1).sum() for m in masks)) == ones - round(0.25 * ones)
    for masks in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], masks))


# The other drop-in methods on DTensors (ln/random structured, random
# unstructured, identity, custom_from_mask, containers) and the error cases.

NORMS = (1, 2, float("inf"), float("-inf"), 0, 3)


def _meshes(world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    meshes = [(init_device_mesh("cpu", (world,)), [[Shard(0)], [Shard(1)], [Replicate()]])]
    if world == 4:
        mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        meshes.append((mesh2, [[Replicate(), Shard(0)], [Shard(0), Shard(1)], [Replicate(), Shard(1)]]))
    return meshes


def _sharded(layers, mesh, placements):
    from torch.distributed.tensor import distribute_tensor

    for layer in layers:
        layer.weight = nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, placements))
    return layers


def _same(a, b, what):
    assert type(b.weight_mask).__name__ == "DTensor", what
    assert b.weight_mask.placements == b.weight_orig.placements, what
    assert torch.equal(a.weight_mask, b.weight_mask.full_tensor()), what
    assert torch.equal(a.weight, b.weight.full_tensor()), what


def dtensor_method_checks(rank, world):
    import fastprune.distributed as D
    from torch.distributed.tensor import distribute_tensor

    out = {"random": {}}
    for mesh, placement_list in _meshes(world):
        for placements in placement_list:
            for dtype in (torch.float32, torch.bfloat16):
                what = (mesh.shape, placements, dtype)
                # ln_structured along both dims, every kind of norm, two rounds
                # (the second ranks only the live channels), DTensor scores.
                for dim in (0, -1):
                    whole, mine = model(dtype, 3), _sharded(model(dtype, 3), mesh, placements)
                    for i, (a, b) in enumerate(zip(whole, mine)):
                        n = NORMS[(i + dim) % len(NORMS)]
                        FAST.ln_structured(a, "weight", 0.4, n, dim)
                        FAST.ln_structured(b, "weight", 0.4, n, dim)
                        _same(a, b, what + (dim, n))
                        scores = torch.linspace(-2, 2, a.weight.numel()).view(a.weight.shape).round().to(dtype)
                        FAST.ln_structured(a, "weight", 0.34, n, dim, importance_scores=scores)
                        FAST.ln_structured(b, "weight", 0.34, n, dim, importance_scores=distribute_tensor(
                            scores, mesh, placements))
                        _same(a, b, what + (dim, n, "round 2"))
                # random_structured: rank 0's draws, whatever the other ranks' seeds.
                whole, mine = model(dtype), _sharded(model(dtype), mesh, placements)
                for dim in (1, 0):
                    torch.manual_seed(11)
                    for a in whole:
                        FAST.random_structured(a, "weight", 0.5, dim)
                    torch.manual_seed(11 if rank == 0 else 100 + rank)
                    for b in mine:
                        FAST.random_structured(b, "weight", 0.5, dim)
                    for a, b in zip(whole, mine):
                        _same(a, b, what + ("random_structured", dim))
                # identity, custom_from_mask (a DTensor mask) and l1 in one container.
                whole, mine = model(dtype, 4), _sharded(model(dtype, 4), mesh, placements)
                g = torch.Generator().manual_seed(4)
                for a, b in zip(whole, mine):
                    FAST.identity(a, "weight")
                    FAST.identity(b, "weight")
                    _same(a, b, what + ("identity",))
                    m = (torch.rand(a.weight.shape, generator=g) > 0.3).to(dtype)
                    FAST.custom_from_mask(a, "weight", m)
                    FAST.custom_from_mask(b, "weight", distribute_tensor(m, mesh, placements))
                    FAST.ln_structured(a, "weight", 1, 2, 0)
                    FAST.ln_structured(b, "weight", 1, 2, 0)
                    FAST.l1_unstructured(a, "weight", 0.3)
                    FAST.l1_unstructured(b, "weight", 0.3)
                    _same(a, b, what + ("container",))
                    # random_unstructured in the container: exactly k of the entries still at 1.
                    ones = int((b.weight_mask.full_tensor() == 1).sum())
                    FAST.random_unstructured(b, "weight", 0.5)
                    after = b.weight_mask.full_tensor()
                    assert int((after == 1).sum()) == ones - round(0.5 * ones), what
                    assert not bool(((after == 1) & (a.weight_mask == 0)).any()), what
                    FAST.remove(b, "weight")
                assert not FAST.is_pruned(mine)
            # Random unstructured, per tensor and global: exactly k, and
            # the same masks whatever the mesh, placements and rank count.
            if dtype is torch.bfloat16:
                mine = _sharded(model(torch.float32), mesh, placements)
                torch.manual_seed(7)
                for b in mine:
                    FAST.random_unstructured(b, "weight", 0.3)
                FAST.global_unstructured([(b, "weight") for b in mine], FAST.RandomUnstructured, amount=0.25)
                out["random"][(tuple(mesh.shape), str(placements))] = [b.weight_mask.full_tensor() for b in mine]
    _dtensor_error_checks(rank, world, D)
    return out


def _untouched(layers):
    assert not FAST.is_pruned(layers)


def _dtensor_error_checks(rank, world, D):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world,))
    mine = _sharded(model(torch.float32), mesh, [Shard(0)])
    # Plain tensors where DTensors belong: the same ValueError everywhere, nothing pruned.
    plain = torch.ones(mine[0].weight.shape)
    for prune_it in (lambda: FAST.l1_unstructured(mine[0], "weight", 0.5, importance_scores=plain),
                     lambda: FAST.ln_structured(mine[0], "weight", 0.5, 2, 0, importance_scores=plain),
                     lambda: FAST.custom_from_mask(mine[0], "weight", plain),
                     lambda: FAST.global_unstructured([(b, "weight") for b in mine], FAST.L1Unstructured,
                                                      amount=0.5, importance_scores={(mine[0], "weight"): plain})):
        with pytest.raises(ValueError, match="must be a DTensor"):
            prune_it()
        _untouched(mine)
    # Scores with other placements, or on another mesh: redistribute first.
    from torch.distributed.tensor import distribute_tensor
    w = mine[0].weight.full_tensor().detach()
    with pytest.raises(ValueError, match="the parameter's mesh and placements"):
        FAST.ln_structured(mine[0], "weight", 0.5, 2, 0, importance_scores=distribute_tensor(w, mesh, [Shard(1)]))
    _untouched(mine)
    # DTensors on different meshes cannot be ranked together.
    other = init_device_mesh("cpu", (world,), mesh_dim_names=("other",))
    assert other != mesh
    with pytest.raises(ValueError, match="the parameter's mesh and placements"):
        FAST.l1_unstructured(mine[0], "weight", 0.5, importance_scores=distribute_tensor(w, other, [Shard(0)]))
    _untouched(mine)
    mixed = model(torch.float32)
    _sharded(mixed[:2], mesh, [Shard(0)])
    _sharded(mixed[2:], other, [Shard(0)])
    with pytest.raises(ValueError, match="different device meshes"):
        FAST.global_unstructured([(b, "weight") for b in mixed], FAST.L1Unstructured, amount=0.5)
    _untouched(mixed)
    with pytest.raises(ValueError, match="DTensor and plain parameters"):
        FAST.global_unstructured([(mine[0], "weight"), (nn.Linear(2, 2), "weight")], FAST.L1Unstructured,
                                 amount=0.5)
    _untouched(mine)
    # Different calls on different ranks: DistributedPruningError on every rank, no hang.
    for prune_it in (lambda: FAST.ln_structured(mine[0], "weight", 0.5 if rank else 0.25, 2, 0),
                     lambda: FAST.ln_structured(mine[0], "weight", 0.5, 1 if rank else 2, 0),
                     lambda: FAST.random_structured(mine[0], "weight", 0.5, 0 if rank else 1),
                     lambda: FAST.random_unstructured(mine[0], "weight", 3 if rank else 4),
                     lambda: FAST.global_unstructured([(b, "weight") for b in mine],
                                                      FAST.L1Unstructured if rank else FAST.RandomUnstructured,
                                                      amount=0.5),
                     lambda: FAST.global_unstructured([(b, "weight") for b in mine[:len(mine) - (rank == 0)]],
                                                      FAST.L1Unstructured, amount=0.5)):
        with pytest.raises(D.DistributedPruningError, match="different calls"):
            prune_it()
        _untouched(mine)
    # Different dtypes (a local shard cast on one rank only).
    w = mine[0].weight
    local = w.to_local().detach().to(torch.bfloat16 if rank == world - 1 else torch.float32)
    odd = nn.Linear(1, 1, bias=False)
    odd.weight = nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=w.shape,
                                                 stride=w.stride()))
    with pytest.raises(D.DistributedPruningError, match="different calls"):
        FAST.l1_unstructured(odd, "weight", 0.5)
    _untouched(odd)
    # A local failure on one rank (wrong-shaped scores there): it raises its
    # own error, the others say which rank failed.
    bad = {(b, "weight"): torch.ones(2) for b in mine} if rank == world - 1 else None
    with pytest.raises((D.DistributedPruningError, IndexError),
                       match="shape" if rank == world - 1 else f"rank {world - 1} failed"):
        FAST.global_unstructured([(b, "weight") for b in mine], FAST.L1Unstructured, amount=0.5,
                                 importance_scores=bad)
    _untouched(mine)
    # The same bad amount everywhere: the single-process error, on every rank.
    with pytest.raises(ValueError, match="should be smaller than the number of parameters"):
        FAST.ln_structured(mine[0], "weight", 100, 2, 0)
    _untouched(mine)
    # Partitioned API: mismatched methods and dtypes.
    plain_layers = model(torch.bfloat16 if rank == 0 else torch.float32)
    for method, in ((FAST.L1Unstructured if rank else FAST.RandomUnstructured,), (FAST.L1Unstructured,)):
        with pytest.raises(D.DistributedPruningError, match="different calls"):
            D.global_unstructured([(plain_layers[i], "weight") for i in range(len(SIZES))], method, amount=0.5)
        _untouched(plain_layers)


def test_plain_prunes_do_not_import_dtensor_support():
    """DTensor and FSDP2 support costs about a second of imports (sympy
    included); a process that prunes plain tensors never pays it."""
    code = ("import sys, torch.nn as nn, fastprune.prune as P\n"
            "m = nn.Linear(8, 8)\n"
            "P.l1_unstructured(m, 'weight', 0.5)\n"
            "P.global_unstructured([(m, 'weight')], P.L1Unstructured, amount=0.2)\n"
            "P.remove(m, 'weight')\n"
            "print(*(name in sys.modules for name in ('torch.distributed.tensor', 'torch.distributed.fsdp')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["False", "False"]
