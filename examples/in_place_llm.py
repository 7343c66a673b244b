"""Prune an LLM on the machine that holds it: in place, with 1-bit masks
(CPU, runs as written; the tests run it). The model here is a scaled-down
LLaMA-shaped stack; benchmarks/in_place_bench.py runs the 7B shapes.

    python examples/in_place_llm.py
"""
import io

import torch
import torch.nn as nn

import fastprune
import fastprune.prune as prune


def llama_like(dim=256, mlp=688, blocks=2):
    """Per block the four attention projections and the three MLP ones, bf16."""
    layers = nn.ModuleList()
    for _ in range(blocks):
        for n_in, n_out in [(dim, dim)] * 4 + [(dim, mlp), (dim, mlp), (mlp, dim)]:
            layers.append(nn.Linear(n_in, n_out, bias=False, dtype=torch.bfloat16))
    return layers


torch.manual_seed(0)
model = llama_like()
weight = model[0].weight
with fastprune.in_place(mask="bits"):
    prune.global_unstructured([(m, "weight") for m in model], prune.L1Unstructured, amount=0.5)

assert model[0].weight is weight  # the same Parameter, holding the pruned values
keep = prune.mask_of(model[0], "weight")  # bool, the weight's shape
assert (weight[~keep] == 0).all()
print(model[0].weight_mask.dtype, tuple(model[0].weight_mask.shape))  # uint8, (256, 32): 1 bit a weight

# Sparse fine-tuning: gradients are masked, and every step re-masks, so the
# pruned entries stay exactly zero (no <name>_orig, no product per forward).
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
for _ in range(3):
    x = torch.randn(8, 256, dtype=torch.bfloat16)
    for layer in model[:4]:
        x = layer(x)
    x.float().pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
assert (model[0].weight[~keep] == 0).all()

# Save, and load into a model prepared with identity under the same layout.
buffer = io.BytesIO()
torch.save(model.state_dict(), buffer)
fresh = llama_like()
with fastprune.in_place(mask="bits"):
    for m in fresh:
        prune.identity(m, "weight")
fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
print(torch.equal(prune.mask_of(fresh[0], "weight"), keep))
