"""Prune DTensor parameters: a global L1 prune and a second structured round,
with only histograms and counts between the ranks.

    torchrun --nproc-per-node 2 examples/dtensor_prune.py
"""
import torch, torch.nn as nn, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
import fastprune.prune as prune

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
torch.manual_seed(0)
layers = [nn.Linear(64, 64) for _ in range(3)]
for layer in layers:
    layer.weight = nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Shard(0)]))
prune.global_unstructured([(m, "weight") for m in layers], prune.L1Unstructured, amount=0.5)
prune.ln_structured(layers[1], "weight", amount=0.25, n=2, dim=0)  # a second round: whole rows
print(dist.get_rank(), layers[0].weight_mask.placements, layers[0].weight_mask.to_local().shape)
dist.barrier()  # every rank done before the group goes
dist.destroy_process_group()
