"""The drop-in: swap one import, nothing changes but speed and memory.

    python examples/quickstart.py
"""
import torch
import fastprune.prune as prune          # was: import torch.nn.utils.prune as prune

model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10))
prune.l1_unstructured(model[0], "weight", amount=0.5)        # weight_orig + weight_mask + hook
prune.l1_unstructured(model[0], "weight", amount=0.2)        # iterative: 20% of what is left
prune.global_unstructured([(model[0], "weight"), (model[2], "weight")],
                          pruning_method=prune.L1Unstructured, amount=0.3)
print(prune.is_pruned(model), float((model[0].weight == 0).float().mean()))
prune.remove(model[0], "weight")                             # make it permanent
