"""Pruning across processes: every rank's masks equal, bit for bit, the
single-process fastprune result on the whole model. Each world size is one
spawn running every check (spawning costs seconds of imports)."""
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


def test_dtensor_l1_masks_equal_the_unsharded_result():
    for world in (2, 3, 4):
        assert all(n > 0 for n in run_ranks(world, dtensor_checks))
