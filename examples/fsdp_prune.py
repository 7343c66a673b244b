"""Prune a model already wrapped with FSDP2 (fully_shard), train it with the
zeros held, checkpoint it, load it into a fresh model and make it permanent.

    torchrun --nproc-per-node 2 examples/fsdp_prune.py   (CPU + gloo; on GPUs: "cuda" and nccl)
"""
import torch, torch.nn as nn, torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
import fastprune.prune as prune

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))

def build():
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Sequential(nn.Linear(64, 250), nn.ReLU(), nn.Linear(250, 64))
                            for _ in range(4)))
    for block in model:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)

def linears(model):
    return [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear)]

model = build()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # before the first forward, as FSDP2 wants
prune.global_unstructured(linears(model), prune.L1Unstructured, amount=0.5)
for step in range(3):
    opt.zero_grad()
    model(torch.randn(8, 64)).square().mean().backward()
    opt.step()  # pruned entries stay exactly zero
dcp.save(model.state_dict(), checkpoint_id="pruned-checkpoint")  # weights and sharded masks

fresh = build()  # e.g. a later job, any number of ranks
for m, name in linears(fresh):
    prune.identity(m, name)  # creates the mask buffers the checkpoint fills
dcp.load(fresh.state_dict(), checkpoint_id="pruned-checkpoint")

for m, name in linears(fresh):
    prune.remove(m, name)  # permanent: plain FSDP2 parameters, zeros in place
weights = [m.weight.full_tensor() for m, _ in linears(fresh)]
print(dist.get_rank(), type(fresh[0][0].weight).__name__,  # rank, DTensor, 0.5 of the weights zero
      sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights))
dist.barrier()  # every rank done before the group goes
dist.destroy_process_group()
