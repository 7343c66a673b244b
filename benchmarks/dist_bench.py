"""Global L1 prune of a GPT-2-small-like model sharded over N local gloo
processes: fastprune's exact cross-rank select against what users do today
(all-gather every parameter, then torch.nn.utils.prune.global_unstructured on
each rank). Per rank: time, peak RSS, bytes this rank put into collectives.

With --fsdp, the same model as nn.Modules wrapped with FSDP2 ``fully_shard``
(one unit per block, plus the root): ``fastprune.prune.global_unstructured``
on the wrapped model (in place, local shards) against ``full_tensor()`` of
every weight + torch prune + writing the own rows back; then the cost the held
masks add to a training step (forward, backward, SGD step).

    python benchmarks/dist_bench.py [--world 2 4] [--layers 12] [--fsdp [--steps 5]]
"""
import argparse
import hashlib
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, "tests")
from dist_util import run_ranks  # noqa: E402


def gpt2_like(layers):
    g = torch.Generator().manual_seed(0)
    mods = [nn.Embedding(50257, 768)]
    for _ in range(layers):
        mods += [nn.Linear(768, 2304, bias=False), nn.Linear(768, 768, bias=False),
                 nn.Linear(768, 3072, bias=False), nn.Linear(3072, 768, bias=False)]
    with torch.no_grad():
        for m in mods:
            m.weight.normal_(generator=g)
    return mods


def rank_main(rank, world, layers, which):
    import fastprune.distributed as D
    import fastprune.prune as FAST
    import torch.nn.utils.prune as REF

    mods = gpt2_like(layers)
    mine = mods[rank::world]  # this rank's share (round robin)
    del mods
    dist.barrier()
    D.reset_traffic()
    t0 = time.perf_counter()
    if which == "fastprune":
        D.global_unstructured([(m, "weight") for m in mine], FAST.L1Unstructured, amount=0.5)
        sent = D.traffic()["bytes"]
    else:  # gather every parameter on every rank, prune there, keep the own masks
        shapes = [gpt2_like_shapes(layers)[r::world] for r in range(world)]
        flat = torch.cat([m.weight.detach().reshape(-1) for m in mine])
        parts = [torch.empty(sum(s.numel() for s in shp)) for shp in shapes]
        _gather_uneven(parts, flat)
        sent = flat.numel() * 4 * (world - 1)
        full = []
        for r in range(world):
            start = 0
            for shp in shapes[r]:
                full.append(nn.Linear(1, 1, bias=False))
                full[-1].weight = nn.Parameter(parts[r][start:start + shp.numel()].view(shp))
                start += shp.numel()
        REF.global_unstructured([(m, "weight") for m in full], REF.L1Unstructured, amount=0.5)
    elapsed = time.perf_counter() - t0
    return {"time_s": elapsed, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "sent_mb": sent / 2 ** 20}


def gpt2_like_shapes(layers):
    return [torch.Size((50257, 768))] + [torch.Size(s) for _ in range(layers)
                                         for s in ((2304, 768), (768, 768), (3072, 768), (768, 3072))]


def _gather_uneven(parts, flat):
    # gloo's all_gather wants equal sizes: pad to the largest, then trim.
    n = max(p.numel() for p in parts)
    padded = [torch.empty(n) for _ in parts]
    dist.all_gather(padded, torch.nn.functional.pad(flat, (0, n - flat.numel())))
    for p, q in zip(parts, padded):
        p.copy_(q[:p.numel()])


class Block(nn.Module):
    """A GPT-2-small block's weights (qkv, attention out, MLP in and out);
    the forward is a cheap residual pass without attention: it only has to train."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(768, 2304, bias=False)
        self.attn_out = nn.Linear(768, 768, bias=False)
        self.fc = nn.Linear(768, 3072, bias=False)
        self.fc_out = nn.Linear(3072, 768, bias=False)

    def forward(self, x):
        x = x + self.attn_out(self.qkv(x)[..., -768:])
        return x + self.fc_out(torch.relu(self.fc(x)))


class GPT2Like(nn.Module):
    """Token embedding and ``layers`` blocks, the same weights on every rank."""

    def __init__(self, layers):
        super().__init__()
        self.wte = nn.Embedding(50257, 768)
        self.blocks = nn.ModuleList(Block() for _ in range(layers))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(std=0.02, generator=g)

    def forward(self, tokens):
        x = self.wte(tokens)
        for block in self.blocks:
            x = block(x)
        return x


def fsdp_rank_main(rank, world, layers, which, steps=5):
    """One rank of the FSDP2 workload ``which``: "fastprune" or "gather"
    (time, peak RSS of the process and its rise during the prune, bytes sent,
    and a digest of the local masks and pruned local values), or "train"
    (see :func:`_train_cost`). fastprune's bytes are ``traffic()``: its
    histogram all-reduces and the object gather that checks that the ranks
    made the same call."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    import fastprune.distributed as D
    import fastprune.prune as FAST

    mesh = init_device_mesh("cpu", (world,))
    model = GPT2Like(layers)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    pairs = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    if which == "train":
        return _train_cost(model, pairs, steps)
    dist.barrier()
    rss_before = _reset_peak_rss()
    D.reset_traffic()
    t0 = time.perf_counter()
    if which == "fastprune":
        FAST.global_unstructured(pairs, FAST.L1Unstructured, amount=0.5)
        masks = [m.weight_mask.to_local() for m, _ in pairs]
        sent = D.traffic()["bytes"]
    else:
        masks, sent = _gather_then_prune(pairs, world)
    elapsed = time.perf_counter() - t0
    rise = _proc_status_kb("VmHWM") - rss_before
    digest = hashlib.sha256()
    for mask, (m, _) in zip(masks, pairs):
        for t in (mask, m.weight.to_local().detach()):
            digest.update(str(t.dtype).encode() + t.contiguous().numpy().tobytes())
    return {"time_s": elapsed, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "rss_rise_gb": rise / 2 ** 20, "sent_mb": sent / 2 ** 20, "digest": digest.hexdigest()}


def _gather_then_prune(pairs, world):
    """What FSDP2 users do today: all-gather every weight (``full_tensor``),
    prune the full ones with torch, write the own block of each back into the
    local shard and keep the own block of its mask. Bytes sent: each rank's
    shards, to each of the world - 1 others."""
    import torch.nn.utils.prune as REF
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    full = [nn.Linear(1, 1, bias=False) for _ in pairs]
    with torch.no_grad():
        for f, (m, _) in zip(full, pairs):
            f.weight = nn.Parameter(m.weight.full_tensor())
    REF.global_unstructured([(f, "weight") for f in full], REF.L1Unstructured, amount=0.5)
    masks, sent = [], 0
    with torch.no_grad():
        for f, (m, _) in zip(full, pairs):
            p = m.weight
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            block = tuple(slice(o, o + n) for o, n in zip(offset, shape))
            p.to_local().copy_(f.weight[block])
            masks.append(f.weight_mask[block].clone())
            sent += p.to_local().numel() * p.element_size() * (world - 1)
    return masks, sent


def _train_cost(model, pairs, steps):
    """Median training step (2 x 16 tokens, SGD) before and after
    fastprune's prune, and whether the pruned entries stayed zero (values and
    gradients) through the pruned steps."""
    import fastprune.prune as FAST

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)  # before any forward (see FSDP2)
    tokens = torch.randint(50257, (2, 16), generator=torch.Generator().manual_seed(1))

    def median_step():
        times = []
        for _ in range(steps + 1):  # the first one warms up
            dist.barrier()
            t0 = time.perf_counter()
            optimizer.zero_grad()
            model(tokens).square().mean().backward()
            optimizer.step()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    unpruned = median_step()
    FAST.global_unstructured(pairs, FAST.L1Unstructured, amount=0.5)
    pruned = median_step()
    held = all(not t.to_local()[m.weight_mask.to_local() == 0].any()
               for m, _ in pairs for t in (m.weight.detach(), m.weight.grad))
    return {"unpruned_s": unpruned, "pruned_s": pruned, "held": held}


def _proc_status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak_rss():
    """Reset VmHWM (the peak RSS) to the current RSS; return that, in kB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status_kb("VmRSS")


def fsdp_main(args):
    """The FSDP2 workload: the prune by each method ("identical": every rank's
    local masks and pruned local values are bitwise those of fastprune's run),
    then the training step."""
    print(f"GPT-2-small-like ({args.layers} blocks) under FSDP2 fully_shard, global L1 0.5, gloo on loopback, "
          "per rank (max over ranks)")
    print(f"{'ranks':>5} {'method':<28} {'time s':>8} {'peak RSS GB':>12} {'RSS rise GB':>12} {'sent MB':>10} "
          f"{'vs fastprune':>13}")
    for world in args.world:
        digests = None
        for which, label in (("fastprune", "fastprune.prune (in place)"), ("gather", "full_tensor + torch prune")):
            res = run_ranks(world, fsdp_rank_main, args.layers, which, timeout=1800)
            t = max(r["time_s"] for r in res)
            m = max(r["peak_rss_gb"] for r in res)
            rise = max(r["rss_rise_gb"] for r in res)
            s = max(r["sent_mb"] for r in res)
            same = "" if digests is None else ("identical" if digests == [r["digest"] for r in res] else "DIFFER")
            digests = [r["digest"] for r in res]
            print(f"{world:>5} {label:<28} {t:8.2f} {m:12.2f} {rise:12.2f} {s:10.2f} {same:>13}", flush=True)
    print(f"\nTraining step (2 x 16 tokens, forward + backward + SGD), median of {args.steps}, "
          "per rank (max over ranks)")
    print(f"{'ranks':>5} {'unpruned s':>11} {'pruned s':>9} {'diff s':>8} {'masks held':>11}")
    for world in args.world:
        res = run_ranks(world, fsdp_rank_main, args.layers, "train", args.steps, timeout=1800)
        before = max(r["unpruned_s"] for r in res)
        after = max(r["pruned_s"] for r in res)
        held = "yes" if all(r["held"] for r in res) else "NO"
        print(f"{world:>5} {before:11.3f} {after:9.3f} {after - before:+8.3f} {held:>11}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--fsdp", action="store_true", help="the model wrapped with FSDP2 fully_shard")
    ap.add_argument("--steps", type=int, default=5, help="--fsdp: timed training steps per side")
    args = ap.parse_args()
    if args.fsdp:
        fsdp_main(args)
        return
    print(f"GPT-2-small-like ({args.layers} blocks), global L1 0.5, gloo on loopback, per rank (max over ranks)")
    print(f"{'ranks':>5} {'method':<28} {'time s':>8} {'peak RSS GB':>12} {'sent MB':>10}")
    for world in args.world:
        for which, label in (("fastprune", "fastprune.distributed"), ("gather", "all-gather + torch prune")):
            res = run_ranks(world, rank_main, args.layers, which, timeout=1800)
            t = max(r["time_s"] for r in res)
            m = max(r["peak_rss_gb"] for r in res)
            s = max(r["sent_mb"] for r in res)
            print(f"{world:>5} {label:<28} {t:8.2f} {m:12.2f} {s:10.2f}", flush=True)


if __name__ == "__main__":
    main()
