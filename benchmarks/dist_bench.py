"""Global L1 prune of a GPT-2-small-like model sharded over N local gloo
processes: fastprune's exact cross-rank select against what users do today
(all-gather every parameter, then torch.nn.utils.prune.global_unstructured on
each rank). Per rank: time, peak RSS, bytes this rank put into collectives.

    python benchmarks/dist_bench.py [--world 2 4] [--layers 12]
"""
import argparse
import resource
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--layers", type=int, default=12)
    args = ap.parse_args()
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
