"""Sharded pruning survives what users do around a prune (issue #20).

Each check does one thing a user does to a sharded model before, during or
after a prune, and compares with the same thing done unsharded in one
process (torch.nn.utils.prune, or fastprune where torch has no such method):
ranks that hold nothing, ``.to()``/``.float()``/``to_empty`` and
``assign=True`` loads of FSDP2 models, FSDP2 over tensor parallelism
(``_StridedShard``), a bad input or a failure on one rank, ``torch.compile``,
forward methods registered with FSDP2, and the optimizer hook's reach.

One spawn per world size runs every check of a group; each check reports its
own outcome, so one pytest test per check says which one broke. Process
groups time out after ``PG_TIMEOUT`` seconds: a rank left waiting fails the
check instead of stalling the run.
"""
import copy
import time
import traceback

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as REF
from torch.testing import assert_close

import fastprune.prune as FAST
from dist_util import run_ranks
from test_fsdp import Tiny, assert_pruned_zero, linears, loss, tokens, wrapped

PG_TIMEOUT = 60
WORLDS = [2, 3]


def run_checks(rank, world, checks):
    """Run each check (a function of rank and world); its traceback, or None."""
    out = {}
    for check in checks:
        try:
            check(rank, world)
            out[check.__name__] = None
        except (Exception, pytest.fail.Exception):  # (pytest.raises fails with a BaseException)
            out[check.__name__] = traceback.format_exc()
    return out


def outcome(results, name):
    """Fail with every rank's traceback of check ``name``."""
    failures = [f"rank {r}:\n{res[name]}" for r, res in enumerate(results) if res[name] is not None]
    assert not failures, "\n".join(failures)


def untouched(modules):
    return not any(FAST.is_pruned(m) for m in modules)


# ----------------------------------------------------------------------------
# The rank-partitioned API (fastprune.distributed.global_unstructured)
# ----------------------------------------------------------------------------

def layers(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = nn.ModuleList(nn.Linear(i, o, bias=False) for o, i in [(5, 4), (3, 7), (6, 6), (2, 9)])
    with torch.no_grad():
        for layer in out:  # tie-free across layers
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
    return out


def empty_rank_l1(rank, world):
    """Rank 1 passes no pairs: every rank still gets the single-process masks
    of its own layers, and an L1 prune leaves the CPU generator alone."""
    import fastprune.distributed as D

    whole, mine = layers(), layers()
    owned = {0: [0, 1], 1: []}.get(rank, [2, 3])
    if world == 2 and rank == 0:
        owned = [0, 1, 2, 3]
    FAST.global_unstructured([(m, "weight") for m in whole], FAST.L1Unstructured, amount=0.4)
    state = torch.get_rng_state()
    D.global_unstructured([(mine[i], "weight") for i in owned], FAST.L1Unstructured, amount=0.4)
    assert torch.equal(torch.get_rng_state(), state), "L1 moved the CPU generator"
    for i in owned:
        assert torch.equal(mine[i].weight_mask, whole[i].weight_mask), i
    # A second round: rank 1 still has nothing, the others rank the live entries.
    FAST.global_unstructured([(m, "weight") for m in whole], FAST.L1Unstructured, amount=3)
    D.global_unstructured([(mine[i], "weight") for i in owned], FAST.L1Unstructured, amount=3)
    for i in owned:
        assert torch.equal(mine[i].weight_mask, whole[i].weight_mask), i


def empty_rank_amount_compared(rank, world):
    """A rank with no pairs but another amount: the same error everywhere."""
    import fastprune.distributed as D

    mine = layers()
    pairs = [] if rank == 1 else [(mine[rank], "weight")]
    with pytest.raises(D.DistributedPruningError, match="different calls"):
        D.global_unstructured(pairs, FAST.L1Unstructured, amount=0.9 if rank == 1 else 0.4)
    assert untouched(mine)


def dtensors_refused(rank, world):
    """DTensors belong to fastprune.prune.global_unstructured: said on every rank."""
    import fastprune.distributed as D
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    mine = layers()
    for m in mine:
        m.weight = nn.Parameter(distribute_tensor(m.weight.detach(), mesh, [Shard(0)]))
    with pytest.raises(ValueError, match="fastprune.prune.global_unstructured"):
        D.global_unstructured([(m, "weight") for m in mine], FAST.L1Unstructured, amount=0.4)
    assert untouched(mine)


def rank_dies_mid_prune(rank, world):
    """The last rank dies after the agreement, inside the select: the others
    raise (gloo sees the peer gone, at the latest at the process group's
    timeout) and keep their model unchanged."""
    import os

    import fastprune.distributed as D
    from fastprune import ops

    mine = layers()
    if rank == world - 1:
        real = ops.radix_histogram
        calls = []

        def dying(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                os._exit(3)
            return real(*args, **kwargs)

        ops.radix_histogram = dying
    started = time.monotonic()
    with pytest.raises(RuntimeError):
        D.global_unstructured([(mine[rank], "weight")], FAST.L1Unstructured, amount=0.4)
    assert untouched(mine)
    return time.monotonic() - started


def l1_leaves_the_generator_alone(rank, world):
    """An L1 prune draws no random number, partitioned as in one process."""
    import fastprune.distributed as D

    mine = layers()
    state = torch.get_rng_state()
    D.global_unstructured([(mine[rank], "weight")], FAST.L1Unstructured, amount=0.4)
    assert FAST.is_pruned(mine[rank]) and torch.equal(torch.get_rng_state(), state)


PARTITIONED = [empty_rank_l1, empty_rank_amount_compared, dtensors_refused, l1_leaves_the_generator_alone]


def test_rank_dies_mid_prune():
    waited = run_ranks(3, rank_dies_mid_prune, pg_timeout=PG_TIMEOUT, lost=[2])
    assert all(w < PG_TIMEOUT + 15 for w in waited[:2]), waited


def test_collective_device_follows_the_backend(monkeypatch):
    """gloo: the CPU; NCCL: the tensors' device, or the current CUDA device
    on a rank that has none (NCCL refuses CPU buffers)."""
    from fastprune import _crossrank

    backend = {"name": "gloo"}
    monkeypatch.setattr(_crossrank.dist, "get_backend", lambda group=None: backend["name"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert _crossrank.comm_device(None, torch.device("cuda", 0)) == torch.device("cpu")
    backend["name"] = "nccl"
    assert _crossrank.comm_device(None, None) == torch.device("cuda", 1)
    assert _crossrank.comm_device(None, torch.device("cuda", 0)) == torch.device("cuda", 0)


# ----------------------------------------------------------------------------
# DTensor parameters: _StridedShard, a bad input on one rank
# ----------------------------------------------------------------------------

def strided(t, mesh, split_factor):
    """``t`` as a DTensor with ``_StridedShard(0, split_factor)`` on a 1-D
    mesh: the local rows torch's own placement assigns to this rank."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import _StridedShard, _StridedShardOffsetMode

    placement = _StridedShard(0, split_factor=split_factor)
    n, rows = placement.local_shard_size_and_offset(t.shape[0], mesh.size(), mesh.get_coordinate()[0],
                                                    _StridedShardOffsetMode.ALL)
    local = t[list(rows)[:n]].clone()
    out = DTensor.from_local(local, mesh, [placement], run_check=False, shape=t.shape, stride=t.stride())
    assert torch.equal(out.full_tensor(), t)  # the layout is torch's
    return out


def strided_shard_masks(rank, world):
    """Interleaved row blocks (FSDP2 over tensor parallelism) get exact
    masks: per-tensor and global L1, ln/random structured along both dims,
    N:M along the rows, per-row masks."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    calls = [lambda m: FAST.l1_unstructured(m, "weight", 0.3),
             lambda m: FAST.ln_structured(m, "weight", 0.3, 2, 0),
             lambda m: FAST.ln_structured(m, "weight", 2, 1, 1),
             lambda m: FAST.random_structured(m, "weight", 0.25, 0),
             lambda m: FAST.l1_semi_structured(m, "weight"),
             lambda m: FAST.channelwise_l1_unstructured(m, "weight", 0.5)]
    for rows, split in ((12, 2), (7, 2), (13, 3), (2, 2)):
        torch.manual_seed(rows)
        whole = nn.Linear(8, rows)
        mine = copy.deepcopy(whole)
        mine.weight = nn.Parameter(strided(whole.weight.detach(), mesh, split))
        for i, call in enumerate(calls):
            torch.manual_seed(i)
            call(whole)
            torch.manual_seed(i)
            call(mine)
            assert torch.equal(mine.weight_mask.full_tensor(), whole.weight_mask), (rows, split, i)
            assert torch.equal(mine.weight.full_tensor(), whole.weight), (rows, split, i)
    # Global: strided, Shard(1) and plain-sharded parameters ranked together.
    from torch.distributed.tensor import Shard, distribute_tensor

    whole, mine = layers(3), layers(3)
    mine[0].weight = nn.Parameter(strided(mine[0].weight.detach(), mesh, 2))
    mine[1].weight = nn.Parameter(distribute_tensor(mine[1].weight.detach(), mesh, [Shard(1)]))
    for m in mine[2:]:
        m.weight = nn.Parameter(strided(m.weight.detach(), mesh, 3))
    for amount in (0.3, 0.5):
        FAST.global_unstructured([(m, "weight") for m in whole], FAST.L1Unstructured, amount=amount)
        FAST.global_unstructured([(m, "weight") for m in mine], FAST.L1Unstructured, amount=amount)
        for a, b in zip(whole, mine):
            assert torch.equal(b.weight_mask.full_tensor(), a.weight_mask), amount


def sharded_layers(world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    mine = layers()
    for m in mine:
        m.weight = nn.Parameter(distribute_tensor(m.weight.detach(), mesh, [Shard(0)]))
    return mine


def bad_pair_on_one_rank(rank, world):
    """An extra plain pair, or a misspelled name, on rank 1 only: rank 1
    raises the error it hit (for the name: the reference's AttributeError),
    the others DistributedPruningError, promptly; nothing is pruned."""
    import fastprune.distributed as D

    mine = sharded_layers(world)
    plain = nn.Linear(3, 3)
    pairs = [(m, "weight") for m in mine]
    for extra, error in (((plain, "weight"), ValueError), ((mine[0], "wieght"), AttributeError)):
        started = time.monotonic()
        with pytest.raises(error if rank == 1 else D.DistributedPruningError):
            FAST.global_unstructured(pairs + [extra] if rank == 1 else pairs, FAST.L1Unstructured, amount=0.5)
        assert time.monotonic() - started < PG_TIMEOUT / 3
        assert untouched(mine) and untouched([plain])
    # Every rank misspelling the name gets the reference's error, no collective needed.
    with pytest.raises(AttributeError, match="wieght"):
        FAST.global_unstructured([(mine[0], "wieght")], FAST.L1Unstructured, amount=0.5)
    assert untouched(mine)


def rank_raises_mid_prune(rank, world):
    """Rank 1 raises inside the select, after the agreement: it sees its
    error, the others a RuntimeError within the process group's timeout,
    and nobody's model changed."""
    from fastprune import ops

    mine = sharded_layers(world)
    if rank == 1:
        real = ops.radix_histogram
        calls = []

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise MemoryError("injected")
            return real(*args, **kwargs)

        ops.radix_histogram = failing
    with pytest.raises(MemoryError if rank == 1 else RuntimeError):
        FAST.global_unstructured([(m, "weight") for m in mine], FAST.L1Unstructured, amount=0.5)
    assert untouched(mine)


def local_failure_everywhere(rank, world):
    """A per-row prune with an int amount above what one rank's rows still
    have fails in that rank's kernel only: every rank raises the
    single-process ValueError and nobody prunes (it has no other collective)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    whole = nn.Linear(4, 2 * world, bias=False)
    mine = copy.deepcopy(whole)
    mine.weight = nn.Parameter(distribute_tensor(mine.weight.detach(), mesh, [Shard(0)]))
    mask = torch.ones(2 * world, 4)
    mask[-1, 1:] = 0  # the last rank's last row keeps one live entry
    FAST.custom_from_mask(whole, "weight", mask)
    FAST.custom_from_mask(mine, "weight", distribute_tensor(mask, mesh, [Shard(0)]))
    with pytest.raises(ValueError, match="cannot prune 2 entries") as single:
        FAST.channelwise_l1_unstructured(whole, "weight", amount=2)
    with pytest.raises(ValueError, match="cannot prune 2 entries"):
        FAST.channelwise_l1_unstructured(mine, "weight", amount=2)
    assert single.type is ValueError
    assert torch.equal(mine.weight_mask.full_tensor(), mask)
    assert [type(h).__name__ for h in mine._forward_pre_hooks.values()] == ["CustomFromMask"]


def structured_reprune_of_1d(rank, world):
    """A structured re-prune of a 1-D DTensor (the reference prunes a (1, n)
    view there) is refused on every rank, nothing changed."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    mine = nn.Linear(3, 7)
    mine.bias = nn.Parameter(distribute_tensor(mine.bias.detach(), mesh, [Shard(0)]))
    FAST.l1_unstructured(mine, "bias", 0.25)
    before = mine.bias_mask.full_tensor()
    for call in (lambda: FAST.ln_structured(mine, "bias", 1, 2, 0), lambda: FAST.random_structured(mine, "bias", 1, 0)):
        with pytest.raises(NotImplementedError, match="1-D DTensor"):
            call()
        assert torch.equal(mine.bias_mask.full_tensor(), before)


DTENSOR = [strided_shard_masks, bad_pair_on_one_rank, local_failure_everywhere, structured_reprune_of_1d]


def test_rank_raises_mid_prune():
    results = run_ranks(2, run_checks, [rank_raises_mid_prune], pg_timeout=10)
    outcome(results, "rank_raises_mid_prune")


def fsdp_over_tp(rank, world):
    """FSDP2 over tensor parallelism on a (dp, tp) mesh: FSDP2 shards the
    tensor-parallel shards' rows again (a _StridedShard); global L1 and
    ln_structured masks equal the single-process ones, and training holds
    the zeros."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 7))
    model = copy.deepcopy(ref)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    assert "_StridedShard" in str(model[0].weight.placements), model[0].weight.placements
    pairs = [(model[0], "weight"), (model[2], "weight")]
    REF.global_unstructured([(ref[0], "weight"), (ref[2], "weight")], REF.L1Unstructured, amount=0.5)
    FAST.global_unstructured(pairs, FAST.L1Unstructured, amount=0.5)
    REF.ln_structured(ref[0], "weight", 0.3, 2, 0)
    FAST.ln_structured(model[0], "weight", 0.3, 2, 0)
    for (m, _), r in zip(pairs, (ref[0], ref[2])):
        assert torch.equal(m.weight_mask.full_tensor(), r.weight_mask)
        assert torch.equal(m.weight.full_tensor(), r.weight)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    assert_close(model(x), ref(x))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    for m, _ in pairs:
        assert (m.weight.to_local()[m.weight_mask.to_local() == 0] == 0).all()


def test_fsdp_over_tensor_parallel():
    outcome(run_ranks(4, run_checks, [fsdp_over_tp], pg_timeout=PG_TIMEOUT), "fsdp_over_tp")


# ----------------------------------------------------------------------------
# FSDP2 models
# ----------------------------------------------------------------------------

def pruned_pair(world):
    """The reference (torch, one process) and an FSDP2 model, both pruned
    with global L1 0.5 and a per-tensor round."""
    torch.manual_seed(0)
    ref = Tiny()
    model = wrapped(copy.deepcopy(ref), world)
    REF.global_unstructured(linears(ref), REF.L1Unstructured, amount=0.5)
    FAST.global_unstructured(linears(model), FAST.L1Unstructured, amount=0.5)
    REF.ln_structured(ref.blocks[0].up, "weight", 0.3, 2, 0)
    FAST.ln_structured(model.blocks[0].up, "weight", 0.3, 2, 0)
    return ref, model


def same_model(ref, model, **tol):
    """Same forward, then (both recomputed by it) the same masks and values."""
    assert_close(model(tokens(5)), ref(tokens(5)), **tol)
    model.reshard()
    for (r, _), (m, _) in zip(linears(ref), linears(model)):
        assert torch.equal(m.weight_mask.full_tensor().to(r.weight_mask.dtype), r.weight_mask)
        assert_close(m.weight.full_tensor(), r.weight.to(m.weight.dtype), **tol)


def train_both(ref, model, steps):
    """AdamW steps on both (optimizers made now); gradients must equal the
    reference's ``weight_orig`` gradients and pruned entries stay zero."""
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (ref, model)]
    for step in range(steps):
        for m, opt in zip((ref, model), opts):
            opt.zero_grad()
            loss(m, step).backward()
        for (r, _), (m, _) in zip(linears(ref), linears(model)):
            grad = m.weight.grad.full_tensor()
            assert (grad[r.weight_mask == 0] == 0).all()
            # (the reduce-scatter adds in another order: 1e-5 of the largest apart)
            expected = r.weight_orig.grad.to(grad.dtype)
            assert_close(grad, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
        for opt in opts:
            opt.step()
        assert_pruned_zero(model)
    model.reshard()


def write_ones(ref, model):
    """A write outside any optimizer, on every pruned parameter."""
    model.reshard()
    with torch.no_grad():
        for (r, _), (m, _) in zip(linears(ref), linears(model)):
            if hasattr(r, "weight_orig"):
                r.weight_orig.fill_(1.0)
                m.weight.to_local().fill_(1.0)


def masks_in_force(ref, model):
    """The model equals the reference, a write outside any optimizer is
    masked before the next forward, and two training steps hold the zeros."""
    same_model(ref, model)
    write_ones(ref, model)
    same_model(ref, model)
    model.reshard()
    train_both(ref, model, 2)


def fsdp_apply(rank, world):
    """``.to()``, ``.float()``, ``.double()`` keep the masks in force (mask
    converted with the parameter; an optimizer made before keeps working)."""
    ref, model = pruned_pair(world)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, model)]
    model.to("cpu")
    model.float()
    model.to(torch.float64)
    ref.to(torch.float64)
    for m, _ in linears(model):
        assert m.weight.dtype == m.weight_mask.dtype == torch.float64
    same_model(ref, model)
    for m, opt in zip((ref, model), opts):
        opt.zero_grad()
        loss(m, 0).backward()
        opt.step()
    assert_pruned_zero(model)
    masks_in_force(ref, model)


def fsdp_meta_to_empty_load(rank, world):
    """Build on meta, wrap, ``identity``, ``to_empty``, load a pruned state
    dict: the masks are in force (writes masked, training holds zeros)."""
    ref, model = pruned_pair(world)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.device("meta"):
        fresh = Tiny()
    fresh = wrapped(fresh, world)
    for m, name in linears(fresh):
        FAST.identity(m, name)
    fresh.to_empty(device="cpu")
    fresh.load_state_dict(state)
    masks_in_force(ref, fresh)


def fsdp_assign_load(rank, world):
    """``load_state_dict(assign=True)`` (new Parameter objects) and
    ``set_model_state_dict`` from rank 0's full state dict keep the masks
    enforced: unpruned values loaded are masked before the next forward, and
    gradients and optimizer steps are masked on the new parameters."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    ref, model = pruned_pair(world)
    write_ones(ref, model)  # the state dict now holds unpruned values
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    full = {k: v.full_tensor() for k, v in state.items()}
    torch.manual_seed(2)
    other = wrapped(Tiny(), world)
    for m, name in linears(other):
        FAST.identity(m, name)
    set_model_state_dict(other, full if rank == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    same_model(ref, other)

    torch.manual_seed(1)
    fresh = wrapped(Tiny(), world)
    for m, name in linears(fresh):
        FAST.identity(m, name)
    fresh.load_state_dict(state, assign=True)
    assert FAST.is_pruned(fresh)
    same_model(ref, fresh)
    train_both(ref, fresh, 2)


def fsdp_compile(rank, world):
    """A compiled pruned model masks writes made outside the optimizer before
    each all-gather, as the eager one does."""
    ref, model = pruned_pair(world)
    compiled = torch.compile(model, backend="aot_eager")
    assert_close(compiled(tokens(5)), ref(tokens(5)))
    write_ones(ref, model)
    assert_close(compiled(tokens(5)), ref(tokens(5)))


def fsdp_forward_method(rank, world):
    """A method registered with ``register_fsdp_forward_method`` gathers the
    root's parameters without module hooks: they are masked all the same."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    class WithGenerate(Tiny):
        def generate(self, t):
            return self.forward(t).argmax(-1), self.forward(t)

    torch.manual_seed(0)
    ref = WithGenerate()
    model = wrapped(copy.deepcopy(ref), world)
    register_fsdp_forward_method(model, "generate")
    REF.l1_unstructured(ref.head, "weight", 0.5)
    FAST.l1_unstructured(model.head, "weight", 0.5)
    write_ones(ref, model)
    assert_close(model.generate(tokens(5))[1], ref(tokens(5)))


def fsdp_hooks_reach(rank, world):
    """The optimizer step hook exists only while a parameter is held, does
    nothing for an optimizer that holds none, and the FSDP2 records are
    indexed once per model, not walked per pair."""
    import gc

    import fastprune._in_place as I
    import fastprune.fsdp as F
    from torch.optim.optimizer import _global_optimizer_post_hooks

    gc.collect()  # the other checks' models

    def ours():
        return [h for h in _global_optimizer_post_hooks.values() if h is I._after_step]

    ref, model = pruned_pair(world)
    assert len(ours()) == 1
    masked = []
    real = I.enforce
    I.enforce = lambda entries, force=False: (masked.append(len(entries)), real(entries, force))
    try:
        other = nn.Sequential(*(nn.Linear(4, 4) for _ in range(50)))
        opt = torch.optim.SGD(other.parameters(), lr=0.1)
        other(torch.ones(2, 4)).sum().backward()
        opt.step()
        assert masked == [], masked
    finally:
        I.enforce = real
    tables = []
    real_index = F._index

    def spy(state_type):
        table = real_index(state_type)
        if not tables or tables[-1] is not table:
            tables.append(table)
        return table

    F._index = spy
    try:
        FAST.global_unstructured(linears(model), FAST.L1Unstructured, amount=0.2)
    finally:
        F._index = real_index
    assert len(tables) == 1, len(tables)
    for m, name in linears(model):
        FAST.remove(m, name)
    assert ours() == [] and not I._HELD


# fsdp_hooks_reach first: it counts every held parameter of the process.
FSDP = [fsdp_hooks_reach, fsdp_apply, fsdp_meta_to_empty_load, fsdp_assign_load, fsdp_compile,
        fsdp_forward_method]



# ----------------------------------------------------------------------------
# One spawn per (group, world size), one test per check
# ----------------------------------------------------------------------------

GROUPS = {"partitioned": PARTITIONED, "dtensor": DTENSOR, "fsdp": FSDP}
_SPAWNED = {}


def results_of(group, world):
    """Every rank's outcome of every check of ``group``, spawned once."""
    if (group, world) not in _SPAWNED:
        _SPAWNED[group, world] = run_ranks(world, run_checks, GROUPS[group], pg_timeout=PG_TIMEOUT, timeout=300)
    return _SPAWNED[group, world]


@pytest.mark.parametrize("group,world,check", [(g, w, c.__name__) for g, checks in GROUPS.items()
                                               for w in WORLDS for c in checks])
def test_check(group, world, check):
    outcome(results_of(group, world), check)
