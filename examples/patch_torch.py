"""Make torch.nn.utils.prune itself compute with fastprune, for code you do not
control (a framework's pruning callback, a paper's script).

    python examples/patch_torch.py
"""
import torch
import torch.nn.utils.prune as prune     # e.g. imported by a framework, long before
import fastprune

fastprune.patch()                        # from here on, torch.nn.utils.prune computes with fastprune
model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10))
prune.l1_unstructured(model[0], "weight", amount=0.5)      # fastprune's kernels
fastprune.unpatch()                      # torch.nn.utils.prune is exactly as it was

with fastprune.patched():                # the same for one block (nests; undone on exceptions too)
    prune.global_unstructured([(model[0], "weight"), (model[2], "weight")],
                              pruning_method=prune.L1Unstructured, amount=0.3)
