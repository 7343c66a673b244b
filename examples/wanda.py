"""Wanda on a small transformer: per-row masks from |W| * ||X|| (CPU, runs as
written; the tests run it).

    python examples/wanda.py
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
import fastprune.prune as prune


class Block(nn.Module):
    def __init__(self, d=64, heads=4, hidden=256):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab=100, d=64, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


torch.manual_seed(0)
model = TinyLM().eval()
calibration = [torch.randint(0, 100, (4, 32)) for _ in range(8)]  # a few batches of token ids

# 1. Input statistics: the mean squared value of every input feature of every Linear.
layers = [m for m in model.blocks.modules() if isinstance(m, nn.Linear)]
sq_sum = {m: torch.zeros(m.in_features) for m in layers}
tokens = {m: 0 for m in layers}


def collect(module, inputs):
    x = inputs[0].detach().reshape(-1, module.in_features).float()
    sq_sum[module] += x.pow(2).sum(0)
    tokens[module] += x.shape[0]


hooks = [m.register_forward_pre_hook(collect) for m in layers]
with torch.no_grad():
    for batch in calibration:
        model(batch)
for h in hooks:
    h.remove()

# 2. Wanda: score |W_ij| * ||X_j||, prune half of every output row (dim=0).
for m in layers:
    scores = m.weight.detach().abs() * (sq_sum[m] / tokens[m]).sqrt()
    prune.channelwise_l1_unstructured(m, "weight", amount=0.5, importance_scores=scores)

print({name: f"{float((m.weight == 0).float().mean()):.2f}" for name, m in model.blocks.named_modules()
       if isinstance(m, nn.Linear)})
print(model(calibration[0]).shape)  # the pruned model runs as before
