"""Pruning in place with 1-bit masks (``fastprune.in_place("bits")``) at LLM scale.

(a) A LLaMA-2-7B-shaped model (32 blocks of 4 x 4096x4096 and 3 x 4096x11008
bf16 linear weights, 6.48e9 random values, 12.96 GB), pruned in place in the
process that built it:

* global L1 0.5 (``global_unstructured`` over every weight) and per-row 0.5
  (Wanda-shaped: ``channelwise_l1_unstructured(dim=0)``, every output row
  keeps its largest-|w| half), each on a freshly built model: time, peak RSS
  growth (``bench.peak_growth``), the masks' bytes, and the floor (the bytes a
  minimal exact select must move, at the copy bandwidth measured at the start);
* correctness, cheaply: the masks' layout, the pruned count, every pruned
  weight 0, and on a few sampled layers (their values saved before the prune)
  that no pruned |w| exceeds a kept one (per row for per-row);
* the reference layout (``torch.nn.utils.prune``) cannot run at this scale:
  its memory is given by arithmetic from torch's source, item by item, and the
  same arithmetic is checked against a measured reference prune of a small model;
* the per-layer sort baseline (``l1_unstructured`` of each layer on its own,
  torch vs fastprune in place) timed on one layer of each shape and
  extrapolated to the model (labelled so).

(b) A training step (forward, backward, AdamW step, zero_grad) of a smaller
float32 model, three variants from the same weights: unpruned, the reference
layout (torch global L1 0.5) and in place with bits (fastprune global L1 0.5),
interleaved round-robin; median and worst per variant, each phase's median,
and the ratio to unpruned; with CPU AdamW's default implementation (the
headline) and its fused one.

Results go to --out (default benchmarks/results/local, untracked) as
in_place.json / in_place.md (in_place_quick.* with --quick).

    python benchmarks/in_place_bench.py               # the 7B-shaped model (~15 GB of memory)
    python benchmarks/in_place_bench.py --blocks 2    # 2 of its 32 blocks
    python benchmarks/in_place_bench.py --quick       # tiny shapes (used by the tests)
"""
import argparse
import copy
import ctypes
import gc
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune as ref_prune

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import bench  # noqa: E402  (its measurement and formatting helpers)
import fastprune  # noqa: E402
import fastprune.prune as fast_prune  # noqa: E402

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
FULL = {"dim": 4096, "mlp": 11008, "blocks": 32, "dtype": torch.bfloat16}
QUICK = {"dim": 256, "mlp": 688, "blocks": 2, "dtype": torch.bfloat16}
TRAIN_FULL = {"dim": 1024, "mlp": 2752, "blocks": 4, "tokens": 1024, "rounds": 10, "warmup": 2}
TRAIN_QUICK = {"dim": 128, "mlp": 344, "blocks": 1, "tokens": 32, "rounds": 2, "warmup": 1}
AMOUNT = 0.5


# ------------------------------------------------------------------ model

def _linear(n_in, n_out, dtype):
    """An nn.Linear without bias whose weight (n_out x n_in) is allocated, not initialized."""
    return torch.nn.utils.skip_init(nn.Linear, n_in, n_out, bias=False, dtype=dtype)


class Block(nn.Module):
    """A LLaMA block's linear weights: q, k, v, o (dim x dim), gate and up
    (mlp x dim), down (dim x mlp). The forward (used by the training step
    only) chains them with SiLU gates and residuals; no attention mixing."""

    def __init__(self, dim, mlp, dtype):
        super().__init__()
        for name in ("q", "k", "v", "o"):
            setattr(self, name, _linear(dim, dim, dtype))
        self.gate, self.up, self.down = _linear(dim, mlp, dtype), _linear(dim, mlp, dtype), _linear(mlp, dim, dtype)

    def forward(self, h):
        h = h + self.o(F.silu(self.q(h)) * self.k(h) + self.v(h))
        return h + self.down(F.silu(self.gate(h)) * self.up(h))


class Model(nn.Module):
    def __init__(self, dim, mlp, blocks, dtype, std=0.02, seed=0):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, mlp, dtype) for _ in range(blocks))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # one layer at a time, in its own dtype: no float copy of the model
            for lin in self.linears():
                lin.weight.normal_(0.0, std(lin) if callable(std) else std, generator=g)

    def linears(self):
        return [getattr(b, p) for b in self.blocks for p in PROJECTIONS]

    def forward(self, h):
        for b in self.blocks:
            h = b(h)
        return h


def _trim():
    """Free what Python and the heap hold, so the next RSS baseline is clean."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss():
    return bench._status_kib("VmRSS") * 1024


def build(cfg, blocks, seed=0):
    """The model, built in place (no copy); returns it and the build's seconds."""
    t0 = time.perf_counter()
    model = Model(cfg["dim"], cfg["mlp"], blocks, cfg["dtype"], seed=seed)
    return model, time.perf_counter() - t0


def sample_layers(model):
    """Layers whose original values the checks and the per-layer baseline use:
    q, gate and down of the middle block (one of each weight shape)."""
    b = len(model.blocks) // 2
    return [(f"blocks.{b}.{p}", getattr(model.blocks[b], p)) for p in ("q", "gate", "down")]


# ------------------------------------------------------------ checks

def layout_ok(lin, param):
    """In place with bits: the same Parameter, a packed uint8 mask, no _orig."""
    w, mask = lin._parameters.get("weight"), lin._buffers.get("weight_mask")
    shape = tuple(w.shape)
    return (w is param and "weight_orig" not in lin._parameters and mask is not None
            and mask.dtype == torch.uint8 and tuple(mask.shape) == (*shape[:-1], (shape[-1] + 7) // 8))


_BITS_SET = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def popcount(bits):
    """Set bits of a uint8 tensor: a histogram of its byte values (plain torch ops)."""
    return int(torch.bincount(bits.reshape(-1), minlength=256) @ _BITS_SET)


def unpack_bits(bits, n):
    """The bool mask a packed uint8 mask holds (plain torch ops, independent
    of fastprune's kernels): bit j of byte b is entry 8 b + j of its row."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((bits.unsqueeze(-1) >> shifts) & 1).bool().flatten(-2)[..., :n]


def check_pruned(model, params, samples, per_row):
    """Every layer, a layer at a time: layout; pruned count (the bits' zeros);
    pruned weights all 0 (the weights' nonzeros packed with
    ``fastprune.ops.pack_mask``, and-ed with the cleared bits). Sampled layers,
    with the bits unpacked by plain torch ops and their values saved before
    the prune: the kept values unchanged, and max pruned |w| <= min kept |w|
    (over the sampled layers together for a global prune, which implies it
    per row; per row for per-row)."""
    total = pruned = pruned_nonzero = zeros = 0
    layout = True
    rows_expected = 0
    for lin, param in zip(model.linears(), params):
        layout = layout and layout_ok(lin, param)
        w, bits = lin.weight.detach(), lin.weight_mask
        nonzero = fastprune.ops.pack_mask(w)
        total += w.numel()
        pruned += w.numel() - popcount(bits)
        pruned_nonzero += popcount(nonzero & ~bits)
        zeros += w.numel() - popcount(nonzero)
        rows_expected += w.shape[0] * round(AMOUNT * w.shape[1])
        del nonzero
    expected = rows_expected if per_row else round(AMOUNT * total)
    worst_pruned, best_kept, rows_ok, values_ok = -1.0, float("inf"), True, True
    for lin, orig in samples:
        a = orig.abs().float()
        keep = unpack_bits(lin.weight_mask, orig.shape[-1])
        p = a.masked_fill(keep, -1.0).amax(dim=1)  # per row: largest pruned |w|, smallest kept |w|
        k = a.masked_fill(~keep, float("inf")).amin(dim=1)
        rows_ok = rows_ok and bool((p <= k).all())
        worst_pruned, best_kept = max(worst_pruned, float(p.max())), min(best_kept, float(k.min()))
        values_ok = values_ok and torch.equal(lin.weight.detach(), orig * keep)  # kept values untouched
        values_ok = values_ok and torch.equal(fast_prune.mask_of(lin, "weight"), keep)  # the public reader agrees
    order_ok = rows_ok if per_row else worst_pruned <= best_kept
    out = {"numel": total, "pruned": pruned, "expected_pruned": expected, "pruned_nonzero": pruned_nonzero,
           "zero_weights": zeros, "layout_ok": layout, "count_ok": pruned == expected,
           "pruned_are_zero": pruned_nonzero == 0, "sample_order_ok": order_ok, "sample_values_ok": values_ok,
           "sample_max_pruned_abs": worst_pruned, "sample_min_kept_abs": best_kept}
    out["ok"] = out["layout_ok"] and out["count_ok"] and out["pruned_are_zero"] and order_ok and values_ok
    return out


# ----------------------------------------------------------- (a) pruning

def floor_bytes(model, per_row):
    """The bytes a minimal exact select moves. Global: one read of the weights
    (a histogram of |w|: bf16 has 2**15 magnitudes, so one pass finds the exact
    threshold), then one read and one write of the weights (compare, zero the
    pruned) and the bits written. Per row: a row fits in cache, so one read and
    one write of the weights and the bits written."""
    w = sum(l.weight.numel() * l.weight.element_size() for l in model.linears())
    bits = sum((l.weight.shape[-1] + 7) // 8 * (l.weight.numel() // l.weight.shape[-1]) for l in model.linears())
    return (2 if per_row else 3) * w + bits


FLOOR_TEXT = {False: "1 read (histogram) + 1 read and 1 write of the weights + the bits written",
              True: "1 read and 1 write of the weights + the bits written (a row is selected in cache)"}


def prune_in_place(model, per_row, bandwidth):
    """Prune the model in place with bits, timed, with its peak RSS growth."""
    linears = model.linears()
    params = [l.weight for l in linears]
    samples = [(lin, lin.weight.detach().clone()) for _, lin in sample_layers(model)]
    took = {}

    def run():
        t0 = time.perf_counter()
        with fastprune.in_place("bits"):
            if per_row:
                for lin in linears:
                    fast_prune.channelwise_l1_unstructured(lin, "weight", amount=AMOUNT, dim=0)
            else:
                fast_prune.global_unstructured([(lin, "weight") for lin in linears],
                                               fast_prune.L1Unstructured, amount=AMOUNT)
        took["s"] = time.perf_counter() - t0

    _trim()
    growth = bench.peak_growth(run)
    masks = sum(l.weight_mask.nbytes for l in linears)
    floor = floor_bytes(model, per_row)
    row = {"method": "per-row (channelwise_l1_unstructured dim=0) 0.5" if per_row
           else "global_unstructured L1Unstructured 0.5",
           "time_s": took["s"], "peak_growth_bytes": growth, "mask_bytes": masks,
           "growth_over_masks": growth / masks, "floor_bytes": floor, "floor_counts": FLOOR_TEXT[per_row],
           "floor_s": floor / bandwidth}
    row["time_over_floor"] = row["time_s"] / row["floor_s"]
    row["fraction_of_floor"] = row["floor_s"] / row["time_s"]
    t0 = time.perf_counter()
    row["checks"] = check_pruned(model, params, samples, per_row)
    row["check_s"] = time.perf_counter() - t0
    return row, samples


def reference_bytes_per_entry(elem, amount=AMOUNT):
    """torch.nn.utils.prune.global_unstructured(L1Unstructured) on entries of
    ``elem`` bytes, by reading its source (torch 2.x): bytes per weight, on
    top of the model, at the peak (inside the topk) and once done."""
    peak = {
        "scores: parameters_to_vector (torch.cat) of the weights": elem,
        "default_mask: parameters_to_vector of ones_like per weight": elem,
        "PruningContainer._combine_masks: slc = (mask == 1), bool": 1,
        "t[slc] and mask[slc]: the live entries gathered (all of them)": 2 * elem,
        "L1Unstructured.compute_mask: mask.clone() and torch.abs(t)": 2 * elem,
        "torch.topk output: values and int64 indices of k entries": amount * (elem + 8),
        "ATen CPU topk workspace: a (float, int64) pair per entry": 16,
    }
    steady = {
        "<name>_mask buffers (default_mask * hook mask, the weight's dtype)": elem,
        "<name> = <name>_orig * <name>_mask (recomputed every forward)": elem,
        "final_mask (the concatenated default_mask, kept alive by every hook's CustomFromMask.mask view)": elem,
    }
    return peak, steady


def reference_arithmetic(model):
    n = sum(l.weight.numel() for l in model.linears())
    elem = model.linears()[0].weight.element_size()
    peak, steady = reference_bytes_per_entry(elem)
    return {"numel": n, "weight_bytes": n * elem,
            "peak_items_bytes": {k: v * n for k, v in peak.items()},
            "steady_items_bytes": {k: v * n for k, v in steady.items()},
            "peak_growth_bytes": sum(peak.values()) * n,
            "steady_growth_bytes": sum(steady.values()) * n,
            "layout_bytes": 3 * n * elem,  # <name>_orig + <name>_mask + <name>
            "steady_total_bytes": (elem + sum(steady.values())) * n}


def reference_calibration(numel, dtype):
    """The arithmetic against a measured reference global L1 prune of a small
    model (4 tensors, ``numel`` entries in all): peak and steady growth per entry."""
    m = nn.Module()
    g = torch.Generator().manual_seed(1)
    for i in range(4):
        m.register_parameter(f"p{i}", nn.Parameter(torch.empty(numel // 4, dtype=dtype).normal_(generator=g)))
    _trim()
    before = _rss()
    took = {}

    def run():
        t0 = time.perf_counter()
        ref_prune.global_unstructured([(m, f"p{i}") for i in range(4)], ref_prune.L1Unstructured, amount=AMOUNT)
        took["s"] = time.perf_counter() - t0
    peak = bench.peak_growth(run)
    _trim()
    steady = _rss() - before
    per_peak, per_steady = reference_bytes_per_entry(torch.empty((), dtype=dtype).element_size())
    return {"numel": numel, "time_s": took["s"], "measured_peak_per_entry": peak / numel,
            "measured_steady_per_entry": steady / numel, "arithmetic_peak_per_entry": sum(per_peak.values()),
            "arithmetic_steady_per_entry": sum(per_steady.values())}


def per_layer_baseline(model, samples, repeats):
    """torch's l1_unstructured and fastprune's in place, each layer on its own,
    on copies of the sampled layers (interleaved, after a warm-up); the model
    total extrapolated from the sampled shapes (each layer of the model has one
    of them)."""
    def one(side, orig):
        lin = nn.Module()
        lin.register_parameter("weight", nn.Parameter(orig.clone()))
        t0 = time.perf_counter()
        if side == "torch":
            ref_prune.l1_unstructured(lin, "weight", amount=AMOUNT)
        else:
            with fastprune.in_place("bits"):
                fast_prune.l1_unstructured(lin, "weight", amount=AMOUNT)
        took = time.perf_counter() - t0
        del lin
        return took

    rows = []
    for (name, _), (_, orig) in zip(sample_layers(model), samples):
        times = {"torch": [], "fastprune": []}
        for side in times:
            one(side, orig)  # warm-up
        for _ in range(repeats):
            for side in times:
                times[side].append(one(side, orig))
        rows.append({"layer": name, "shape": list(orig.shape), **{f"{s}_s": statistics.median(t)
                                                                    for s, t in times.items()}})
    by_shape = {tuple(r["shape"]): r for r in rows}
    counts = {}
    for lin in model.linears():
        counts[tuple(lin.weight.shape)] = counts.get(tuple(lin.weight.shape), 0) + 1
    out = {"samples": rows, "layers": sum(counts.values())}
    for side in ("torch", "fastprune"):
        out[f"{side}_extrapolated_s"] = sum(n * by_shape[s][f"{side}_s"] for s, n in counts.items())
    return out


# ------------------------------------------------------- (b) training step

OPTIMIZERS = {  # name: AdamW keyword arguments (the headline is the default one)
    "adamw": {},
    # CPU AdamW's default (for-loop and foreach) implementations slow down on
    # exact zeros in exp_avg_sq (a pruned entry's, in both pruned layouts):
    # the fused one does not, and shows the layouts' own cost.
    "adamw_fused": {"fused": True},
}
PHASES = ("forward_s", "backward_s", "step_s", "zero_grad_s")


def training_set(cfg, adamw, seed=0):
    """Three variants of one float32 model: unpruned, the reference layout, in
    place with bits; each with an AdamW (``adamw`` keywords) built after the
    prune. Interleaved round-robin steps, each phase timed; then the in-place
    model's pruned weights must still be 0."""
    torch.manual_seed(seed)
    base = Model(cfg["dim"], cfg["mlp"], cfg["blocks"], torch.float32,
                 std=lambda lin: 0.5 / lin.weight.shape[1] ** 0.5, seed=seed)
    x = torch.randn(cfg["tokens"], cfg["dim"])
    target = torch.randn(cfg["tokens"], cfg["dim"])
    variants = {"unpruned": copy.deepcopy(base), "reference": copy.deepcopy(base), "in_place_bits": copy.deepcopy(base)}
    del base
    ref = variants["reference"]
    ref_prune.global_unstructured([(l, "weight") for l in ref.linears()], ref_prune.L1Unstructured, amount=AMOUNT)
    fast = variants["in_place_bits"]
    with fastprune.in_place("bits"):
        fast_prune.global_unstructured([(l, "weight") for l in fast.linears()], fast_prune.L1Unstructured,
                                       amount=AMOUNT)
    agree = all(torch.equal(r.weight_mask != 0, fast_prune.mask_of(f, "weight"))
                for r, f in zip(ref.linears(), fast.linears()))
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1, **adamw)
                  for k, m in variants.items()}

    def step(name):
        model, opt = variants[name], optimizers[name]
        t = [time.perf_counter()]
        loss = F.mse_loss(model(x), target)
        t.append(time.perf_counter())
        loss.backward()  # (in place: the gradient hooks mask the gradients)
        t.append(time.perf_counter())
        opt.step()  # (in place: the values are masked again after it)
        t.append(time.perf_counter())
        opt.zero_grad()
        t.append(time.perf_counter())
        return [b - a for a, b in zip(t, t[1:])]

    for _ in range(cfg["warmup"]):
        for name in variants:
            step(name)
    phases = {name: [] for name in variants}
    for _ in range(cfg["rounds"]):
        for name in variants:
            phases[name].append(step(name))
    still_pruned = sum(popcount(fastprune.ops.pack_mask(l.weight.detach()) & ~l.weight_mask)
                       for l in fast.linears()) == 0
    # the reference's effective weight (orig * mask: its cached <name> predates the last step)
    diff = max(float((r.weight_orig.detach() * r.weight_mask - f.weight.detach()).abs().max())
               for r, f in zip(ref.linears(), fast.linears()))
    out = {"adamw": dict(lr=1e-3, weight_decay=0.1, **adamw), "masks_agree": agree,
           "in_place_still_pruned": still_pruned, "max_abs_diff_reference_vs_in_place": diff,
           "variants": {}}
    for name, rounds in phases.items():
        times = [sum(p) for p in rounds]
        out["variants"][name] = {"times_s": times, "median_s": statistics.median(times), "worst_s": max(times),
                                 **{k: statistics.median(p[i] for p in rounds) for i, k in enumerate(PHASES)}}
    for v in out["variants"].values():
        v["ratio_to_unpruned"] = v["median_s"] / out["variants"]["unpruned"]["median_s"]
    return out


def training(cfg):
    """:func:`training_set` with each optimizer of :data:`OPTIMIZERS`, one set
    of models at a time."""
    params = cfg["blocks"] * (4 * cfg["dim"] ** 2 + 3 * cfg["dim"] * cfg["mlp"])
    out = {"config": dict(cfg, dtype="float32", params=params,
                          step="forward (linear chain with SiLU gates and residuals), MSE loss, backward, "
                               "AdamW(lr=1e-3, weight_decay=0.1).step(), zero_grad()"),
           "optimizers": {}}
    for name, kwargs in OPTIMIZERS.items():
        out["optimizers"][name] = training_set(cfg, kwargs)
        _trim()
    sets = out["optimizers"].values()
    out["masks_agree"] = all(t["masks_agree"] for t in sets)
    out["in_place_still_pruned"] = all(t["in_place_still_pruned"] for t in sets)
    out["variants"] = out["optimizers"]["adamw"]["variants"]  # the headline: default AdamW
    return out


# ----------------------------------------------------------------- report

def gb(b):
    """Decimal units (the targets' 0.81 GB of bits is 6.48e9 / 8 bytes)."""
    if b is None:
        return "-"
    return f"{b / 1e9:,.2f} GB" if abs(b) >= 1e9 else f"{b / 1e6:,.1f} MB"


def _s(seconds):
    return f"{seconds:,.2f} s" if seconds >= 1 else bench._ms(seconds)


def markdown(r):
    info, m = r["machine"], r["model"]
    lines = [f"Machine: {info['cpu']}, {info['cores']} cores, {info['threads']} threads, torch {info['torch']}, "
             f"{info['date']}; copy bandwidth {r['copy_bandwidth'] / 1e9:.1f} GB/s.", "",
             f"Model: {m['blocks']} blocks x (4 x {m['dim']}x{m['dim']} + 2 x {m['mlp']}x{m['dim']} + "
             f"{m['dim']}x{m['mlp']}) {m['dtype']} linear weights, random: {m['numel']:,} weights, "
             f"{gb(m['weight_bytes'])}; built in {_s(m['build_s'])} in the process that prunes it "
             f"(RSS {gb(m['rss_after_build'])}); the per-row prune ran on a second one, built once the first "
             f"was freed (RSS {gb(r['per_row']['rss_before_build'])} before it).", "",
             "| prune (in place, bits) | time | floor | time / floor | fraction of floor | peak RSS growth | "
             "masks (bits) | growth / masks | checks |",
             "|---|---:|---:|---:|---:|---:|---:|---:|:-:|"]
    for key in ("global_l1", "per_row"):
        p = r[key]
        lines.append(f"| {p['method']} | {_s(p['time_s'])} | {_s(p['floor_s'])} | {bench._x(p['time_over_floor'])} | "
                     f"{bench._pct(p['fraction_of_floor'])} | {gb(p['peak_growth_bytes'])} | {gb(p['mask_bytes'])} | "
                     f"{p['growth_over_masks']:.2f}x | {'ok' if p['checks']['ok'] else '**FAILED**'} |")
    ref = r["reference"]
    lines.append("| reference layout, torch global_unstructured L1 0.5 (arithmetic: cannot run here) | - | - | - | - | "
                 f"{gb(ref['peak_growth_bytes'])} (then {gb(ref['steady_growth_bytes'])} held) | "
                 f"{gb(ref['weight_bytes'])} (weight dtype) | "
                 f"{ref['peak_growth_bytes'] / ref['weight_bytes']:.0f}x | - |")
    lines += ["", "Floors count: " + "; ".join(f"{r[k]['method']}: {r[k]['floor_counts']} "
                                              f"({gb(r[k]['floor_bytes'])})" for k in ("global_l1", "per_row")) + "."]
    for key in ("global_l1", "per_row"):
        c = r[key]["checks"]
        lines.append(f"- {r[key]['method']} checks: pruned {c['pruned']:,} (expected {c['expected_pruned']:,}), "
                     f"pruned but nonzero {c['pruned_nonzero']:,}, zero weights {c['zero_weights']:,}, "
                     f"layout {'ok' if c['layout_ok'] else 'WRONG'}, sampled layers' order "
                     f"{'ok' if c['sample_order_ok'] else 'WRONG'} (max pruned |w| {c['sample_max_pruned_abs']:.4g}, "
                     f"min kept |w| {c['sample_min_kept_abs']:.4g}), sampled kept values "
                     f"{'unchanged' if c['sample_values_ok'] else 'CHANGED'}; checks took {_s(r[key]['check_s'])}.")
    lines += ["", f"Reference layout by arithmetic ({ref['numel']:,} weights of {gb(ref['weight_bytes'])}; "
                  f"`<name>_orig` + `<name>_mask` + `<name>` = {gb(ref['layout_bytes'])}, "
                  f"{gb(ref['steady_total_bytes'])} held in all once done):", "",
              "| torch.nn.utils.prune.global_unstructured holds, beyond the model | bytes |", "|---|---:|"]
    lines += [f"| at the peak (inside topk): {k} | {gb(v)} |" for k, v in ref["peak_items_bytes"].items()]
    lines += [f"| once done: {k} | {gb(v)} |" for k, v in ref["steady_items_bytes"].items()]
    cal = ref["calibration"]
    lines += ["", f"The arithmetic checked on a small reference prune ({cal['numel']:,} {m['dtype']} entries, "
                  f"{_s(cal['time_s'])}): peak growth measured {cal['measured_peak_per_entry']:.1f} B/entry vs "
                  f"{cal['arithmetic_peak_per_entry']:.1f} by arithmetic; held once done "
                  f"{cal['measured_steady_per_entry']:.1f} vs {cal['arithmetic_steady_per_entry']:.1f}.", "",
              "Per-layer sort baseline (each layer pruned on its own, l1_unstructured 0.5, on copies of sampled "
              "layers; median of interleaved calls):", "",
              "| layer | shape | torch.nn.utils.prune | fastprune in place (bits) | speed-up |",
              "|---|---|---:|---:|---:|"]
    pl = r["per_layer"]
    for s in pl["samples"]:
        lines.append(f"| {s['layer']} | {'x'.join(map(str, s['shape']))} | {_s(s['torch_s'])} | "
                     f"{_s(s['fastprune_s'])} | {bench._x(s['torch_s'] / s['fastprune_s'])} |")
    lines.append(f"| all {pl['layers']} layers, **extrapolated** from the samples | | "
                 f"{_s(pl['torch_extrapolated_s'])} | {_s(pl['fastprune_extrapolated_s'])} | "
                 f"{bench._x(pl['torch_extrapolated_s'] / pl['fastprune_extrapolated_s'])} |")
    t = r["train"]
    c = t["config"]
    lines += ["", f"Training step: {c['blocks']} blocks, dim {c['dim']}, MLP {c['mlp']}, {c['params']:,} weights, "
                  f"{c['dtype']}, {c['tokens']} tokens; {c['step']}; {c['warmup']} warm-up and {c['rounds']} "
                  "interleaved rounds, per optimizer (medians; phases: forward incl. loss, backward incl. "
                  "in place's gradient masking, step incl. in place's re-masking).", "",
              "| optimizer | variant | step median | worst | vs unpruned | forward | backward | optimizer.step |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for opt, o in t["optimizers"].items():
        for name, v in o["variants"].items():
            lines.append(f"| {opt} | {name} | {_s(v['median_s'])} | {_s(v['worst_s'])} | "
                         f"{v['ratio_to_unpruned']:.3f}x | {_s(v['forward_s'])} | {_s(v['backward_s'])} | "
                         f"{_s(v['step_s'])} |")
    lines.append("")
    for opt, o in t["optimizers"].items():
        lines.append(f"- {opt}: masks of the reference and in place agree: {'yes' if o['masks_agree'] else '**NO**'}; "
                     f"in-place pruned weights still 0 after the steps: "
                     f"{'yes' if o['in_place_still_pruned'] else '**NO**'}; max |reference orig*mask - in place| "
                     f"after the same steps: {o['max_abs_diff_reference_vs_in_place']:.3g}.")
    lines += ["",
              "Targets (reported, not asserted):", ""]
    lines += [f"- {x['target']}: {x['measured']} ({'met' if x['met'] else '**not met**'})" for x in r["targets"]]
    return "\n".join(lines)


def targets(r):
    g = r["global_l1"]
    rows = [
        {"target": "peak memory growth of the global L1 prune <= 1.25x its masks' bytes",
         "measured": f"{g['growth_over_masks']:.2f}x ({gb(g['peak_growth_bytes'])} for {gb(g['mask_bytes'])})",
         "met": g["growth_over_masks"] <= 1.25},
        {"target": "global L1 time within 4x of its floor",
         "measured": f"{g['time_over_floor']:.1f}x ({_s(g['time_s'])} vs {_s(g['floor_s'])})",
         "met": g["time_over_floor"] <= 4},
    ]
    for opt, o in r["train"]["optimizers"].items():
        v = o["variants"]
        ratio = v["in_place_bits"]["ratio_to_unpruned"]
        rows.append({"target": f"in-place training step within 10% of the unpruned one ({opt})",
                     "measured": f"{ratio:.3f}x ({_s(v['in_place_bits']['median_s'])} vs "
                                 f"{_s(v['unpruned']['median_s'])}; reference layout "
                                 f"{v['reference']['ratio_to_unpruned']:.3f}x)",
                     "met": ratio <= 1.1})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (2 blocks of 256/688), few repeats")
    ap.add_argument("--blocks", type=int, default=None, help="blocks of the pruned model (default 32; quick 2)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved calls of the per-layer baseline")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved training-step rounds (default 10)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "local"),
                    help="where results go (default: untracked)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = dict(QUICK if args.quick else FULL)
    cfg["blocks"] = args.blocks or cfg["blocks"]
    tcfg = dict(TRAIN_QUICK if args.quick else TRAIN_FULL)
    tcfg["rounds"] = args.rounds or tcfg["rounds"]
    repeats = 1 if args.quick else args.repeats
    info = bench.machine()
    bandwidth = bench.measure_copy_bandwidth(1 << 24 if args.quick else 1 << 28)
    print(f"fastprune in-place benchmark: {info['cpu']}, {info['threads']} threads, torch {info['torch']}, "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    r = {"machine": info, "quick": args.quick, "copy_bandwidth": bandwidth}

    # (a1) global L1, in the process that built the model
    _trim()
    model, build_s = build(cfg, cfg["blocks"])
    n = sum(l.weight.numel() for l in model.linears())
    r["model"] = {"blocks": cfg["blocks"], "dim": cfg["dim"], "mlp": cfg["mlp"],
                  "dtype": str(cfg["dtype"]).split(".")[1],
                  "numel": n, "weight_bytes": n * model.linears()[0].weight.element_size(), "build_s": build_s,
                  "rss_after_build": _rss()}
    print(f"- model: {n:,} weights ({gb(r['model']['weight_bytes'])}) built in {_s(build_s)}", flush=True)
    r["reference"] = reference_arithmetic(model)
    r["global_l1"], samples = prune_in_place(model, per_row=False, bandwidth=bandwidth)
    g = r["global_l1"]
    print(f"- global L1 {AMOUNT}: {_s(g['time_s'])} ({g['time_over_floor']:.1f}x the floor {_s(g['floor_s'])}), "
          f"peak growth {gb(g['peak_growth_bytes'])} = {g['growth_over_masks']:.2f}x the masks' "
          f"{gb(g['mask_bytes'])}; checks {'ok' if g['checks']['ok'] else 'FAILED'}", flush=True)
    r["per_layer"] = per_layer_baseline(model, samples, repeats)
    print(f"- per-layer l1_unstructured, extrapolated to {r['per_layer']['layers']} layers: torch "
          f"{_s(r['per_layer']['torch_extrapolated_s'])}, fastprune in place "
          f"{_s(r['per_layer']['fastprune_extrapolated_s'])}", flush=True)
    del model, samples

    # (a2) per row, on a freshly built model (the first one freed before)
    _trim()
    rss_freed = _rss()  # the first model, its masks and samples freed
    model, _ = build(cfg, cfg["blocks"])
    r["per_row"], samples = prune_in_place(model, per_row=True, bandwidth=bandwidth)
    p = r["per_row"]
    p["rss_before_build"] = rss_freed
    print(f"- per-row {AMOUNT}: {_s(p['time_s'])} ({p['time_over_floor']:.1f}x the floor {_s(p['floor_s'])}), "
          f"peak growth {gb(p['peak_growth_bytes'])} = {p['growth_over_masks']:.2f}x the masks'; "
          f"checks {'ok' if p['checks']['ok'] else 'FAILED'}", flush=True)
    del model, samples
    _trim()

    # the reference's arithmetic against a measured small reference prune
    r["reference"]["calibration"] = reference_calibration(1 << 18 if args.quick else 1 << 24, cfg["dtype"])
    _trim()

    # (b) training step
    r["train"] = training(tcfg)
    _trim()
    r["targets"] = targets(r)
    table = markdown(r)
    print()
    print(table)
    os.makedirs(args.out, exist_ok=True)
    stem = "in_place_quick" if args.quick else "in_place"
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
        json.dump(r, f, indent=1)
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write(table + "\n")
    failed = [k for k in ("global_l1", "per_row") if not r[k]["checks"]["ok"]]
    if not (r["train"]["masks_agree"] and r["train"]["in_place_still_pruned"]):
        failed.append("train")
    if failed:
        print(f"\ncorrectness checks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
