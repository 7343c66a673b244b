"""FSDP2: a small transformer wrapped with ``fully_shard`` (a unit per block
and the root; 10, 13 and 22 rows, so shards are uneven on 2 and 3 ranks) is
pruned after wrapping, trained with the masks held, checkpointed with
torch.distributed.checkpoint and reloaded (by the same and by another number
of ranks), then made permanent. The reference is torch.nn.utils.prune on the
same model in one process (each rank builds it). One spawn per world size
runs every check, since spawning costs seconds of imports."""
import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as REF
from torch.testing import assert_close

import fastprune.prune as FAST
from dist_util import run_ranks

VOCAB, DIM, HIDDEN, BLOCKS = 13, 10, 22, 3


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))
        self.up, self.down = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)

    def forward(self, x):
        h = self.norm1(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / DIM ** 0.5, dim=-1)
        x = x + self.o(att @ self.v(h))
        return x + self.down(torch.relu(self.up(self.norm2(x))))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def linears(model):
    return [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear)]


def tokens(seed):
    return torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(seed))


def loss(model, seed):
    return model(tokens(seed)).square().mean()


def wrapped(model, world, device="cpu"):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device, (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def assert_pruned_zero(model):
    """Every pruned entry of every local shard is exactly zero (no collective)."""
    for m, _ in linears(model):
        values, mask = m.weight.to_local(), m.weight_mask.to_local()
        assert (values[mask == 0] == 0).all(), m


def train(pairs, steps, check=None):
    """``steps`` optimizer steps of each (model, optimizer) pair on the same batches."""
    for step in steps:
        for model, opt in pairs:
            opt.zero_grad()
            loss(model, step).backward()
        if check:
            check()
        for _, opt in pairs:
            opt.step()


def prune_train_checkpoint(rank, world, save_dir, load_dir):
    from torch.distributed.tensor import DTensor
    import torch.distributed.checkpoint as dcp
    import fastprune.distributed as D

    torch.manual_seed(0)
    ref = Tiny()
    model = wrapped(copy.deepcopy(ref), world)
    unit_hooks = [len(u._forward_pre_hooks) for u in (model, *model.blocks)]
    # FSDP2: make the optimizer before the first forward (one made after a
    # forward without backward would hold the root's unsharded parameters).
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)

    # Errors leave the model as it was, on every rank.
    before = {k: full(v).clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="amount"):
        FAST.global_unstructured(linears(model), FAST.L1Unstructured, amount=1.5)
    assert not FAST.is_pruned(model)
    assert all(torch.equal(full(v), before[k]) for k, v in model.state_dict().items())

    # Global L1 0.5 after wrapping: the single-process masks, bit for bit.
    REF.global_unstructured(linears(ref), REF.L1Unstructured, amount=0.5)
    D.reset_traffic()
    FAST.global_unstructured(linears(model), FAST.L1Unstructured, amount=0.5)
    # What travelled: 3 histograms (fp32 keys: 3 digit passes of 16 KiB) and
    # small pickles (the call check; tie counts if the threshold is tied).
    sent = D.traffic()
    assert 3 * 16384 < sent["bytes"] < 4 * 16384 and sent["collectives"] >= 4, sent
    for (r, _), (m, _) in zip(linears(ref), linears(model)):
        assert isinstance(m.weight, DTensor) and isinstance(m.weight_mask, DTensor)
        assert m.weight_mask.placements == m.weight.placements and "weight_orig" not in m._parameters
        assert torch.equal(m.weight_mask.full_tensor(), r.weight_mask)
        assert torch.equal(m.weight.full_tensor(), r.weight)
    assert_close(model(tokens(99)), ref(tokens(99)))

    # FSDP2 left the root's parameters unsharded after that forward: refused.
    head = model.head
    with pytest.raises(RuntimeError, match="unsharded"):
        FAST.l1_unstructured(head, "weight", amount=0.1)
    with pytest.raises(RuntimeError, match="unsharded"):
        FAST.global_unstructured(linears(model), FAST.L1Unstructured, amount=0.1)
    assert list(head._buffers) == ["weight_mask"] and len(head._forward_pre_hooks) == 1
    assert all(len(m._forward_pre_hooks) == 1 for m, _ in linears(model))

    # Training: the reference's gradients (zero where pruned), zeros held.
    def same_grads():
        for (r, _), (m, _) in zip(linears(ref), linears(model)):
            grad = m.weight.grad.full_tensor()
            assert (grad[r.weight_mask == 0] == 0).all()
            assert_close(grad, r.weight_orig.grad)

    for step in range(5):
        train([(ref, ref_opt), (model, opt)], [step], check=same_grads)
        assert_pruned_zero(model)
    assert_close(model(tokens(99)), ref(tokens(99)), rtol=1e-4, atol=1e-5)
    model.reshard()

    # A second round (a PruningContainer) on the trained values, against the
    # reference on those values gathered into one process; the optimizer's
    # state then moves newly pruned entries, which must stay zero.
    gathered = Tiny()
    for (g, _), (m, _) in zip(linears(gathered), linears(model)):
        g.weight.data.copy_(m.weight.full_tensor())
        REF.custom_from_mask(g, "weight", m.weight_mask.full_tensor())
    REF.global_unstructured(linears(gathered), REF.L1Unstructured, amount=0.3)
    FAST.global_unstructured(linears(model), FAST.L1Unstructured, amount=0.3)
    for (g, _), (m, _) in zip(linears(gathered), linears(model)):
        assert torch.equal(m.weight_mask.full_tensor(), g.weight_mask)
    for step in range(5, 8):
        train([(model, opt)], [step])
        assert_pruned_zero(model)

    # Checkpoint: save, reload into freshly wrapped models (this rank count;
    # the other run's count when given).
    path = os.path.join(save_dir, "checkpoint")
    dcp.save({"model": model.state_dict()}, checkpoint_id=path)
    state = {k: full(v).clone() for k, v in model.state_dict().items()}
    expected = model(tokens(7)).detach()
    if rank == 0:
        torch.save((state, expected), os.path.join(save_dir, "expected.pt"))
    load_and_check(rank, world, path, state, expected)
    if load_dir is not None:
        load_other(rank, world, load_dir)

    # remove: ordinary FSDP2 parameters with the zeros in place, no hooks left.
    model.reshard()
    for m, name in linears(model):
        FAST.remove(m, name)
    assert not FAST.is_pruned(model)
    assert [len(u._forward_pre_hooks) for u in (model, *model.blocks)] == unit_hooks
    for m, _ in linears(model):
        assert isinstance(m.weight, DTensor) and isinstance(m.weight, nn.Parameter)
        assert not m._buffers and not getattr(m.weight, "_post_accumulate_grad_hooks", None)
        assert torch.equal(m.weight.full_tensor(), state[f"{fqn(model, m)}.weight"])
    assert sorted(model.state_dict()) == sorted(Tiny().state_dict())
    train([(model, opt)], [8])  # trains as an unpruned model
    return expected


def fqn(model, module):
    return next(name for name, m in model.named_modules() if m is module)


def load_and_check(rank, world, path, state, expected):
    """Load the checkpoint at ``path`` into a freshly wrapped model prepared
    with ``identity``; it must hold ``state`` (full tensors) and give ``expected``."""
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(rank + 100)  # other initial values on every rank
    fresh = wrapped(Tiny(), world)
    opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    for m, name in linears(fresh):
        FAST.identity(m, name)
    loaded = {"model": fresh.state_dict()}
    dcp.load(loaded, checkpoint_id=path)
    fresh.load_state_dict(loaded["model"])
    for k, v in fresh.state_dict().items():
        assert torch.equal(full(v), state[k]), k
    assert_close(fresh(tokens(7)), expected)
    train([(fresh, opt)], [1, 2])
    assert_pruned_zero(fresh)


def per_tensor_and_tied(rank, world):
    """Per-tensor methods equal the reference (N:M and per-channel: fastprune
    in one process); writes outside an optimizer are
    masked before the next forward; mixed precision keeps the zeros; a tied
    parameter is refused and a global prune that meets one changes nothing."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(1)
    ref = Tiny()
    model = wrapped(copy.deepcopy(ref), world)
    for lib, m in ((REF, ref), (FAST, model)):
        lib.l1_unstructured(m.blocks[0].up, "weight", amount=0.3)
        lib.ln_structured(m.blocks[1].down, "weight", amount=0.5, n=2, dim=0)
        lib.ln_structured(m.blocks[2].q, "weight", amount=3, n=1, dim=1)
        lib.l1_unstructured(m.blocks[0].up, "weight", amount=5)  # a container
    for m in (ref, model):  # fastprune-only methods: local to each Shard(0) shard
        FAST.l1_semi_structured(m.blocks[1].q, "weight", n=2, m=5)
        FAST.l1_semi_structured(m.blocks[2].down, "weight", n=1, m=2)
        FAST.channelwise_l1_unstructured(m.blocks[2].up, "weight", amount=0.5, dim=0)
        FAST.channelwise_l1_unstructured(m.blocks[2].up, "weight", amount=1, dim=0)  # a container
    for (r, _), (m, _) in zip(linears(ref), linears(model)):
        if hasattr(r, "weight_mask"):
            assert torch.equal(m.weight_mask.full_tensor(), r.weight_mask)
            assert torch.equal(m.weight.full_tensor(), r.weight)
    assert_close(model(tokens(3)), ref(tokens(3)))
    # A write outside the optimizer (here: ones over every pruned shard) is
    # masked before the next forward, as the reference masks weight_orig.
    model.reshard()
    with torch.no_grad():
        for (r, _), (m, _) in zip(linears(ref), linears(model)):
            if hasattr(r, "weight_mask"):
                r.weight_orig.fill_(1.0)
                m.weight.to_local().fill_(1.0)
    assert_close(model(tokens(3)), ref(tokens(3)))

    # Mixed precision: FSDP2 gathers bf16 copies of the pruned fp32 shards.
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mixed = Tiny()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mesh = init_device_mesh("cpu", (world,))
    for block in mixed.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(mixed, mesh=mesh, mp_policy=policy)
    opt = torch.optim.AdamW(mixed.parameters(), lr=1e-2)
    FAST.global_unstructured(linears(mixed), FAST.L1Unstructured, amount=0.5)

    def grads_zero_where_pruned():
        for m, _ in linears(mixed):
            assert (m.weight.grad.to_local()[m.weight_mask.to_local() == 0] == 0).all()

    train([(mixed, opt)], range(3), check=grads_zero_where_pruned)
    assert_pruned_zero(mixed)

    # Segments that would straddle shards are refused; nothing changes.
    from torch.distributed.tensor import Shard, distribute_tensor

    cols = nn.Linear(8, 4)
    cols.weight = nn.Parameter(distribute_tensor(cols.weight.detach(), mesh, [Shard(1)]))
    with pytest.raises(NotImplementedError, match="span several ranks"):
        FAST.l1_semi_structured(cols, "weight")
    with pytest.raises(NotImplementedError, match="span several ranks"):
        FAST.channelwise_l1_unstructured(cols, "weight", amount=0.5, dim=0)
    assert not FAST.is_pruned(cols) and list(cols._parameters) == ["weight", "bias"]

    tied = nn.Sequential(nn.Linear(4, 5), nn.Linear(4, 4), nn.Linear(4, 4))
    tied[2].weight = tied[1].weight
    fully_shard(tied, mesh=mesh)
    before = tied[0].weight.full_tensor()
    with pytest.raises(NotImplementedError, match="tied"):
        FAST.global_unstructured([(tied[0], "weight"), (tied[2], "weight")], FAST.L1Unstructured, amount=0.5)
    assert not FAST.is_pruned(tied) and torch.equal(tied[0].weight.full_tensor(), before)


def test_fsdp_prune_train_checkpoint_remove(tmp_path):
    two, three = tmp_path / "two", tmp_path / "three"
    two.mkdir()
    three.mkdir()
    out2 = run_ranks(2, prune_train_checkpoint, str(two), None)
    out3 = run_ranks(3, prune_train_checkpoint, str(three), str(two))
    for out in (out2, out3):
        assert all(torch.equal(o, out[0]) for o in out)  # every rank's output is the model's
    run_ranks(2, load_other, str(three))  # and back from 3 ranks to 2


def load_other(rank, world, load_dir):
    load_and_check(rank, world, os.path.join(load_dir, "checkpoint"),
                   *torch.load(os.path.join(load_dir, "expected.pt")))


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp_per_tensor_and_tied(world):
    run_ranks(world, per_tensor_and_tied)


def cuda_one_rank(rank, world):
    """FSDP2 on a CUDA mesh with NCCL (one rank: the GPU machine has one GPU):
    the CUDA select passes, the hooks on FSDP2's CUDA streams."""
    torch.cuda.set_device(0)
    torch.manual_seed(0)
    ref = Tiny()
    model = wrapped(copy.deepcopy(ref).cuda(), world, "cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    REF.global_unstructured(linears(ref), REF.L1Unstructured, amount=0.5)
    FAST.global_unstructured(linears(model), FAST.L1Unstructured, amount=0.5)
    for (r, _), (m, _) in zip(linears(ref), linears(model)):
        assert torch.equal(m.weight_mask.full_tensor().cpu(), r.weight_mask)
    assert_close(model(tokens(99).cuda()).cpu(), ref(tokens(99)))
    model.reshard()
    for step in range(3):
        opt.zero_grad()
        model(tokens(step).cuda()).square().mean().backward()
        opt.step()
        torch.cuda.synchronize()
        assert_pruned_zero(model)
    model.reshard()
    for m, name in linears(model):
        FAST.remove(m, name)
    assert not FAST.is_pruned(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fsdp_cuda_nccl():
    run_ranks(1, cuda_one_rank, backend="nccl")
