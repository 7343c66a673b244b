"""fastprune vs torch.nn.utils.prune, side by side on identical inputs.

For every workload: build the inputs once (tie-free weights, fixed seed), run
both libraries on copies, check that the masks are identical (a mismatch is
reported and counted, never skipped), then time what users live:

* interleaved (the headline): rounds of one reference call then one
  fastprune call, each on a fresh copy freed before the next call, as in a
  process that does other work between prunes; each side's median and worst;
* first call: each side's first prune in a fresh process of its own (imports
  done, model built), with its peak memory growth;
* warm best case: fastprune's calls back to back after a warm-up.

Floors: the two-pass bytes that must move at the copy bandwidth measured at
the start of the run, and that plus the page faults of the fresh memory a
first call must create (a mask and a pruned tensor per prune of each
parameter) at the fresh-page cost measured at the start.

    python benchmarks/bench.py              # default suite, a few minutes
    python benchmarks/bench.py --quick      # tiny sizes (used by the tests)
    python benchmarks/bench.py --workloads l1_unstructured iterative
    python benchmarks/bench.py --scale      # adds 1e9 parameters, fastprune only
"""
import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.utils.prune as ref_prune

import fastprune
import fastprune.prune as fast_prune

HERE = os.path.dirname(os.path.abspath(__file__))
SIDES = {"torch": ref_prune, "fastprune": fast_prune}


# ----------------------------------------------------------------- inputs

# Bit patterns of the smallest magnitude tie_free uses (2**-12), per dtype.
_FIRST_BITS = {torch.float32: (torch.int32, 0x39800000), torch.float64: (torch.int64, 0x3F30000000000000)}


def tie_free(shape, dtype=torch.float32, seed=0):
    """Distinct magnitudes in random order with random signs (no ties for topk).

    float32/float64: consecutive floats from 2**-12 up (distinct for any size
    that fits in memory). float16/bfloat16 have too few values for large
    tensors: beyond a few thousand entries they tie, and masks may then differ
    from the reference's by its tie choices.
    """
    g = torch.Generator().manual_seed(seed)
    n = int(torch.Size(shape).numel())
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.int8) * 2 - 1
    if dtype in _FIRST_BITS:
        itype, first = _FIRST_BITS[dtype]
        mags = (torch.randperm(n, generator=g, dtype=torch.int64) + first).to(itype).view(dtype)
    else:
        mags = ((torch.randperm(n, generator=g).to(torch.float64) + 1) / max(n, 1)).to(dtype)
    return (mags * signs).reshape(shape)


def holder(*shapes, dtype=torch.float32, seed=0):
    """A Module with parameters p0, p1, ... of the given shapes, tie-free across all of them."""
    m = nn.Module()
    total = sum(int(torch.Size(s).numel()) for s in shapes)
    flat = tie_free((total,), dtype, seed)
    offset = 0
    for i, s in enumerate(shapes):
        n = int(torch.Size(s).numel())
        m.register_parameter(f"p{i}", nn.Parameter(flat[offset:offset + n].reshape(s).clone()))
        offset += n
    return m


def gpt2_small_shapes():
    return [(50257, 768)] + [s for _ in range(12) for s in ((768, 2304), (768, 768), (768, 3072), (3072, 768))]


def resnet50_shapes():
    shapes = [(64, 3, 7, 7)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes, planes, 3, 3), (planes * 4, planes, 1, 1)]
            if b == 0:
                shapes.append((planes * 4, inplanes, 1, 1))
            inplanes = planes * 4
    return shapes + [(1000, 2048)]


# -------------------------------------------------------------- workloads
# Each workload: make(dtype, quick) -> state; run(prune, state) prunes it in place;
# masks(state) -> list of masks; numel/bytes for the floor. State is deep-copied per run.

class Workload:
    """make(dtype, quick) -> module; prepare(prune, module) runs untimed on each
    side's copy first; run(prune, module) is what is timed."""

    def __init__(self, name, make, run, floor_bytes, note="", prepare=None, agree=None, idiom=None, prunes=1,
                 patched=False):
        self.name, self.make, self.run, self.floor_bytes, self.note = name, make, run, floor_bytes, note
        self.prunes = prunes  # prunes of each parameter per run: each creates a mask and a pruned tensor
        self.patched = patched  # also time torch.nn.utils.prune's own functions under fastprune.patched()
        self.prepare = prepare or (lambda prune, m: None)
        self.agree = agree or masks_equal
        self.idiom = idiom  # the hand-rolled kthvalue-threshold alternative, where one applies

    def fresh(self, prune, state):
        m = copy.deepcopy(state)
        self.prepare(prune, m)
        return m


def masks_equal(ref, fast):
    return len(ref) == len(fast) and all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(ref, fast))


def random_masks_agree(ref, fast):
    """Seeded random pruning (first prune, seed 0): the masks may differ only
    where the reference's choice was ambiguous, among equal draws at the cut.
    The draws are regenerated as the reference drew them (one per entry, in
    concatenation order, the parameters' dtype)."""
    if masks_equal(ref, fast):
        return True
    if len(ref) != len(fast) or any(a.dtype != b.dtype or a.shape != b.shape for a, b in zip(ref, fast)):
        return False
    r = torch.cat([m.reshape(-1) for m in ref])
    f = torch.cat([m.reshape(-1) for m in fast])
    if int((r == 0).sum()) != int((f == 0).sum()):
        return False
    torch.manual_seed(0)
    draws = torch.rand(r.numel(), dtype=ref[0].dtype)
    cut = draws[r == 0].min()  # the reference prunes the largest draws
    return bool((draws[r != f] == cut).all())


def kthvalue_idiom(amount):
    """What users hand-roll instead: one kthvalue threshold over all |weights|
    (masks only, no reparametrization; prunes more than k when values tie)."""
    def run(m):
        params = [p.detach() for p in m.parameters()]
        flat = torch.cat([p.abs().reshape(-1) for p in params]) if len(params) > 1 else params[0].abs().reshape(-1)
        k = round(amount * flat.numel())
        thr = torch.kthvalue(flat, k).values
        return [(p.abs() > thr).to(p.dtype) for p in params]
    return run


def _single(shape_full, shape_quick):
    return lambda dtype, quick: holder(shape_quick if quick else shape_full, dtype=dtype)


def _masks(m):
    return [b for n, b in m.named_buffers() if n.endswith("_mask")]


def _bytes(m, mask_reads_per_elem, score_reads_per_elem):
    """Two-pass floor: score_reads * v + mask_reads * m bytes per element."""
    total = 0
    for p in m.parameters():
        total += p.numel() * (score_reads_per_elem * p.element_size() + mask_reads_per_elem * p.element_size())
    return total


def _iterative(rounds):
    def run(prune, m):
        for _ in range(rounds):
            prune.l1_unstructured(m, "p0", amount=0.2)
    return run


def _global(method, shapes_fn, quick_shapes):
    def make(dtype, quick):
        return holder(*(quick_shapes if quick else shapes_fn()), dtype=dtype)

    def run(prune, m):
        params = [(m, n) for n, _ in list(m.named_parameters())]
        prune.global_unstructured(params, pruning_method=getattr(prune, method), amount=0.5)
    return make, run


WORKLOADS = {}


def _add(w):
    WORKLOADS[w.name] = w


_add(Workload("l1_unstructured", _single((4096, 4096), (64, 64)),
              lambda prune, m: prune.l1_unstructured(m, "p0", amount=0.5),
              lambda m: _bytes(m, 3, 2), "amount 0.5, Linear 4096x4096", idiom=kthvalue_idiom(0.5),
              patched=True))
_add(Workload("iterative", _single((4096, 4096), (64, 64)), _iterative(1),
              lambda m: _bytes(m, 3, 2), "one more round of 0.2 after 0.5",
              prepare=lambda prune, m: prune.l1_unstructured(m, "p0", amount=0.5)))
_add(Workload("iterative_x5", _single((4096, 4096), (64, 64)), _iterative(5),
              lambda m: 5 * _bytes(m, 3, 2), "five rounds of 0.2", prunes=5))
_add(Workload("random_unstructured", _single((4096, 4096), (64, 64)),
              lambda prune, m: (torch.manual_seed(0), prune.random_unstructured(m, "p0", amount=0.5)),
              lambda m: _bytes(m, 3, 2), "amount 0.5, 4096x4096, seeded", agree=random_masks_agree))
_add(Workload("ln_structured", _single((512, 512, 3, 3), (16, 16, 3, 3)),
              lambda prune, m: (prune.ln_structured(m, "p0", amount=0.3, n=2, dim=0),
                                prune.ln_structured(m, "p0", amount=0.3, n=2, dim=1)),
              lambda m: 2 * _bytes(m, 3, 2), "n=2, dim 0 then dim 1, Conv2d(512,512,3)", prunes=2))
_add(Workload("random_structured", _single((512, 512, 3, 3), (16, 16, 3, 3)),
              lambda prune, m: (torch.manual_seed(0), prune.random_structured(m, "p0", amount=0.3, dim=0)),
              lambda m: _bytes(m, 3, 0), "amount 0.3, dim 0, Conv2d(512,512,3), seeded"))
for _method, _label in (("L1Unstructured", "l1"), ("RandomUnstructured", "random")):
    for _model, _shapes, _quick in (("resnet50", resnet50_shapes, [(8, 3, 3, 3), (16, 8, 1, 1), (10, 16)]),
                                    ("gpt2", gpt2_small_shapes, [(500, 8), (8, 24), (24, 8)])):
        _make, _run = _global(_method, _shapes, _quick)
        if _method == "RandomUnstructured":
            _run = (lambda r: lambda prune, m: (torch.manual_seed(0), r(prune, m)))(_run)
        _add(Workload(f"global_{_label}_{_model}", _make, _run, lambda m: _bytes(m, 3, 2),
                      f"global_unstructured {_method} 0.5 over a {_model}-like layer set",
                      agree=random_masks_agree if _method == "RandomUnstructured" else None,
                      idiom=kthvalue_idiom(0.5) if _method == "L1Unstructured" else None))


# LLM recipes on a LLaMA-7B MLP weight (11008 x 4096), each in fp32 and bf16
# whatever --dtype says: fastprune's per-row and 2:4 methods (the "fastprune"
# side) against what LLM pruning code does today (the "torch" side). Both
# sides rank the same precomputed scores |W| (the module's `scores` buffer;
# Wanda's |W| * ||X|| costs the same). "_mask" workloads time the mask alone
# (compute_mask against the baseline's mask), "_call" ones the whole prune,
# the product included (the prune API against the baseline's mask then
# `W[mask] = 0`). Masks are compared before timing (`pruned_masks_agree`).

def _llm_weight(dtype, distinct_groups_of=None):
    """make(): a Module with parameter p0 (tie-free for the baseline: every
    magnitude distinct, or for bf16 at least distinct inside each group of
    `distinct_groups_of`, where topk's choice would otherwise be arbitrary)
    and buffer `scores` = |p0|."""
    def make(_dtype, quick):
        shape = (64, 256) if quick else (11008, 4096)
        if distinct_groups_of and dtype not in _FIRST_BITS:
            g = torch.Generator().manual_seed(0)
            groups = shape[0] * shape[1] // distinct_groups_of
            ranks = torch.rand(groups, distinct_groups_of, generator=g).argsort(1) + 1  # 1..m per group
            scale = torch.rand(groups, 1, generator=g) + 0.1
            signs = torch.randint(0, 2, ranks.shape, generator=g) * 2 - 1
            w = (scale.to(dtype) * ranks.to(dtype) * signs.to(dtype)).reshape(shape)
        else:
            w = tie_free(shape, dtype if dtype in _FIRST_BITS else torch.float32).to(dtype)
        m = nn.Module()
        m.register_parameter("p0", nn.Parameter(w))
        m.register_buffer("scores", w.detach().abs())
        return m
    return make


def wanda_row_mask(scores, amount):
    """Wanda's unstructured mask (locuslab/wanda lib/prune.py): a stable sort
    of every row, the first int(cols * amount) indices scattered as pruned."""
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    order = torch.sort(scores, dim=-1, stable=True)[1]
    pruned.scatter_(1, order[:, :int(scores.shape[1] * amount)], True)
    return pruned


def topk_loop_nm_mask(scores, n, m):
    """Wanda's N:M mask: a Python loop over column groups, topk per group."""
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    for i in range(0, scores.shape[1], m):
        tmp = scores[:, i:i + m].float()
        pruned.scatter_(1, i + torch.topk(tmp, m - n, dim=1, largest=False)[1], True)
    return pruned


def batched_topk_nm_mask(scores, n, m):
    """N:M in one topk over all groups (apex ASP's view(-1, 4) grouping)."""
    groups = scores.reshape(-1, m)
    idx = torch.topk(groups, m - n, dim=1, largest=False)[1]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(1, idx, True).view(scores.shape)


def pruned_masks_agree(ref, fast):
    """The baseline's boolean "pruned" mask against fastprune's 0/1 mask."""
    return (len(ref) == len(fast) == 1 and ref[0].shape == fast[0].shape
            and torch.equal(~ref[0], fast[0] != 0))


def _llm_run(method, prune_call, baseline, call):
    """run(prune, m): on the fastprune side `method.compute_mask` (with the
    default mask a first prune passes) or `prune_call(m)`; on the other,
    `baseline(scores)` (then W[mask] = 0 for a call). Each stores its mask
    as the buffer p0_mask (the baseline's: True where pruned)."""
    def run(prune, m):
        if prune is fast_prune:
            if call:
                return prune_call(m)
            ones = torch.ones((), dtype=m.p0.dtype).expand(m.p0.shape)
            return m.register_buffer("p0_mask", method.compute_mask(m.scores, default_mask=ones))
        pruned = baseline(m.scores)
        if call:
            with torch.no_grad():
                m.p0[pruned] = 0
        m.register_buffer("p0_mask", pruned)
    return run


_LLM_WORKLOADS = (
    ("wanda_rows", fast_prune.ChannelwiseL1Unstructured(0.5),
     lambda m: fast_prune.channelwise_l1_unstructured(m, "p0", amount=0.5, importance_scores=m.scores),
     lambda s: wanda_row_mask(s, 0.5), None, "channelwise_l1_unstructured 0.5 vs Wanda's sort + scatter"),
    ("nm24_loop", fast_prune.L1SemiStructured(2, 4),
     lambda m: fast_prune.l1_semi_structured(m, "p0", importance_scores=m.scores),
     lambda s: topk_loop_nm_mask(s, 2, 4), 4, "l1_semi_structured 2:4 vs Wanda's per-group topk loop"),
    ("nm24_topk", fast_prune.L1SemiStructured(2, 4),
     lambda m: fast_prune.l1_semi_structured(m, "p0", importance_scores=m.scores),
     lambda s: batched_topk_nm_mask(s, 2, 4), 4, "l1_semi_structured 2:4 vs one batched topk over view(-1, 4)"),
)
for _name, _method, _prune_call, _baseline, _groups, _note in _LLM_WORKLOADS:
    for _dt, _dname in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for _call in (False, True):
            # floor: scores read + mask written; a call also reads W and the mask and writes W * mask
            _add(Workload(
                f"{_name}_{_dname}_{'call' if _call else 'mask'}", _llm_weight(_dt, _groups),
                _llm_run(_method, _prune_call, _baseline, _call),
                (lambda m: _bytes(m, 3, 2)) if _call else (lambda m: _bytes(m, 1, 1)),
                f"{_note}, 11008x4096 {_dname}, {'prune call incl. product' if _call else 'mask only'}",
                agree=pruned_masks_agree))

# ------------------------------------------------------------------ timing

def measure_copy_bandwidth(nbytes=1 << 28):
    x = torch.empty(nbytes // 4)
    x.fill_(1.0)
    y = torch.empty_like(x)
    y.copy_(x)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        y.copy_(x)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / min(times)  # read + write


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_fresh_page_cost(nbytes=1 << 28):
    """Seconds per byte that fresh memory costs on top of writing warm memory:
    the page faults a new large tensor takes on its first write (glibc gives
    blocks this large back to the OS when freed, so each is new). Medians of
    5 fresh and 5 warm writes, interleaved."""
    n = nbytes // 4
    warm = torch.empty(n)
    warm.fill_(0)
    fresh_t, warm_t = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        warm.fill_(1)
        warm_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        x = torch.empty(n)
        x.fill_(1)
        fresh_t.append(time.perf_counter() - t0)
        del x
    return max(statistics.median(fresh_t) - statistics.median(warm_t), 0.0) / nbytes


def _timed(w, prune, state, run=None):
    """Seconds of one call of the workload on a fresh copy of `state` (device-synchronized)."""
    m = w.fresh(prune, state)
    _sync()
    t0 = time.perf_counter()
    (run or (lambda m: w.run(prune, m)))(m)
    _sync()
    return time.perf_counter() - t0


def time_side(w, prune, state, repeats, budget_s=20.0, run=None):
    """The warm best case: median of `repeats` calls back to back after one
    warm-up (fewer, at least 3, when `repeats` would exceed `budget_s`)."""
    first = _timed(w, prune, state, run)  # the warm-up
    repeats = max(min(repeats, int(budget_s / max(first, 1e-9))), min(repeats, 3))
    return statistics.median(_timed(w, prune, state, run) for _ in range(repeats))


def _patched_run(w):
    """The workload through torch.nn.utils.prune's own functions, with fastprune patched in."""
    def run(m):
        with fastprune.patched():
            w.run(ref_prune, m)
    return run


def time_interleaved(w, state, rounds):
    """What a user's process lives: `rounds` rounds of one call of each side
    in turn (the reference, then fastprune, then for `w.patched` the reference's
    functions under fastprune.patched()), each on a fresh copy that is freed
    before the next call, so every call follows the other library's work.
    Returns {side: [seconds per round]}."""
    sides = dict(SIDES, **({"patched": ref_prune} if w.patched else {}))
    times = {side: [] for side in sides}
    for _ in range(rounds):
        for side, prune in sides.items():
            times[side].append(_timed(w, prune, state, _patched_run(w) if side == "patched" else None))
    return times


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":"))


def peak_growth(fn):
    """Bytes by which fn() raises the resident-set peak above the RSS before it.
    Returns freed heap memory to the system and resets the kernel's high-water
    mark first (Linux: malloc_trim, clear_refs 5)."""
    import ctypes
    import gc
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap memory out of the baseline RSS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def first_call(name, side, dtype, quick):
    """One side's first call of a workload in a fresh process (imports done,
    model built, nothing pruned before): {"first_s": its time,
    "peak_bytes": the peak memory growth during it}."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, side, str(dtype).split(".")[1], str(int(quick))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(name, side, dtype, quick):
    w, prune = WORKLOADS[name], SIDES[side]
    m = w.fresh(prune, w.make(getattr(torch, dtype), bool(int(quick))))
    took = {}

    def run():
        t0 = time.perf_counter()
        w.run(prune, m)
        took["s"] = time.perf_counter() - t0
    peak = peak_growth(run)
    print(json.dumps({"first_s": took["s"], "peak_bytes": peak}))


def run_workload(w, dtype, device, quick, repeats, bandwidth, peak, fresh_cost=0.0):
    """One workload, both sides: masks compared first; then `repeats`
    interleaved rounds (the headline: each side's median, and its worst), the
    warm best case of back-to-back calls, and, with `peak`, each side's first
    call in a fresh process with its peak memory. Floors: bytes that must move
    at the copy bandwidth, and that plus fresh pages for every mask and pruned
    tensor a prune creates (what a first call cannot avoid)."""
    state = w.make(dtype, quick).to(device)
    done = {}
    for side, prune in SIDES.items():
        m = w.fresh(prune, state)
        w.run(prune, m)
        done[side] = _masks(m)
    ok = w.agree(done["torch"], done["fastprune"])
    if w.patched:  # the patched path must give fastprune's masks
        m = w.fresh(ref_prune, state)
        _patched_run(w)(m)
        ok = ok and masks_equal(done["fastprune"], _masks(m))
    del done, m  # the checks' modules: a user's process would not keep them alive during the rounds
    row = {"workload": w.name, "note": w.note, "numel": sum(p.numel() for p in state.parameters()),
           "masks_agree": ok}
    for side, times in time_interleaved(w, state, repeats).items():
        row[f"{side}_times_s"] = times
        row[f"{side}_s"] = statistics.median(times)
        row[f"{side}_worst_s"] = max(times)
    row["fastprune_best_s"] = time_side(w, fast_prune, state, repeats)
    for side in SIDES:
        first = first_call(w.name, side, dtype, quick) if peak else {}
        row[f"{side}_first_s"] = first.get("first_s")
        row[f"{side}_peak_bytes"] = first.get("peak_bytes")
    row["kthvalue_s"] = time_side(w, None, state, repeats, run=w.idiom) if w.idiom else None
    row["speedup"] = row["torch_s"] / row["fastprune_s"]
    row["speedup_best"] = row["torch_s"] / row["fastprune_best_s"]
    row["speedup_first"] = row["torch_first_s"] / row["fastprune_first_s"] if peak else None
    row["floor_s"] = w.floor_bytes(state) / bandwidth
    row["fraction_of_floor"] = row["floor_s"] / row["fastprune_s"]
    created = w.prunes * 2 * sum(p.numel() * p.element_size() for p in state.parameters())
    row["fresh_floor_s"] = row["floor_s"] + created * fresh_cost
    row["fraction_of_fresh_floor"] = row["fresh_floor_s"] / row["fastprune_first_s"] if peak else None
    return row


def sweep(dtype, quick, repeats):
    sizes = [10**4, 10**5, 10**6] if quick else [10**4, 10**5, 10**6, 10**7, 10**8]
    rows = []
    for n in sizes:
        state = holder((n,), dtype=dtype)
        row = {"numel": n}
        for side, prune in SIDES.items():
            row[f"{side}_s"] = time_side(WORKLOADS["l1_unstructured"], prune, state, 1 if n >= 10**8 else repeats)
        rows.append(row)
        print(f"  sweep n={n:.0e}: torch {row['torch_s']*1e3:9.2f} ms  fastprune {row['fastprune_s']*1e3:9.2f} ms",
              flush=True)
    return rows


def scale_run(dtype, total=10**9):
    """Global L1 pruning of `total` parameters, fastprune only (the reference cannot fit)."""
    shapes = [(total // 16,)] * 16
    m = nn.Module()
    g = torch.Generator().manual_seed(0)
    for i, s in enumerate(shapes):
        m.register_parameter(f"p{i}", nn.Parameter(torch.randn(s, generator=g, dtype=dtype)))
    t = {}

    def run():
        t0 = time.perf_counter()
        with torch.no_grad():
            fast_prune.global_unstructured([(m, f"p{i}") for i in range(len(shapes))],
                                           pruning_method=fast_prune.L1Unstructured, amount=0.5)
        t["s"] = time.perf_counter() - t0
    growth = peak_growth(run)
    pruned = sum(int((b == 0).sum()) for b in _masks(m))
    return {"numel": total, "fastprune_s": t["s"], "pruned": pruned, "exact": pruned == total // 2,
            "peak_growth_bytes": growth,
            "torch": "skipped: the reference concatenates every parameter and mask and sorts "
                     "with int64 indices, ~12x the weights' bytes, which does not fit in this machine's memory"}


# ------------------------------------------------------------------ report

def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat()}


def fmt_bytes(b):
    return "-" if b is None else f"{b / 2**20:,.0f} MiB"


def _ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:,.1f} ms"


def _x(ratio):
    return "-" if ratio is None else f"{ratio:,.1f}x"


def _pct(fraction):
    return "-" if fraction is None else f"{fraction:.0%}"


def markdown(rows, info, bandwidth, fresh_cost=None):
    """Two tables: time (the headline is the interleaved median), then the
    floors and peak memory."""
    fresh = "" if fresh_cost is None else f"; fresh memory {fresh_cost * 2**26 * 1e3:.1f} ms per 64 MiB"
    lines = [f"Machine: {info['cpu']}, {info['cores']} cores, {info['threads']} threads, torch {info['torch']}, "
             f"{info['date']}; copy bandwidth {bandwidth / 1e9:.1f} GB/s{fresh}.", "",
             "| workload | elements | torch.nn.utils.prune | fastprune | speed-up | fastprune worst | "
             "fastprune warm best | first call: torch | first call: fastprune | speed-up, first call |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['numel']:,} | {_ms(r['torch_s'])} | {_ms(r['fastprune_s'])} | "
                     f"**{_x(r['speedup'])}** | {_ms(r.get('fastprune_worst_s'))} | "
                     f"{_ms(r.get('fastprune_best_s'))} ({_x(r.get('speedup_best'))}) | "
                     f"{_ms(r.get('torch_first_s'))} | {_ms(r.get('fastprune_first_s'))} | "
                     f"{_x(r.get('speedup_first'))} |")
    lines += [f"\n{r['workload']} through `torch.nn.utils.prune` under `fastprune.patched()`: "
              f"{_ms(r['patched_s'])} median, {_ms(r['patched_worst_s'])} worst (direct import: "
              f"{_ms(r['fastprune_s'])}, {_ms(r['fastprune_worst_s'])})." for r in rows if "patched_s" in r]
    lines += ["", "| workload | copy floor | of floor | floor + fresh pages | of it, first call | kthvalue idiom | "
              "peak torch | peak fastprune | masks agree |",
              "|---|---:|---:|---:|---:|---:|---:|---:|:-:|"]
    for r in rows:
        lines.append(f"| {r['workload']} | {_ms(r['floor_s'])} | {_pct(r['fraction_of_floor'])} | "
                     f"{_ms(r.get('fresh_floor_s'))} | {_pct(r.get('fraction_of_fresh_floor'))} | "
                     f"{_ms(r['kthvalue_s'])} | {fmt_bytes(r['torch_peak_bytes'])} | "
                     f"{fmt_bytes(r['fastprune_peak_bytes'])} | {'yes' if r['masks_agree'] else '**NO**'} |")
    return "\n".join(lines)


def plot(rows, sweep_rows, path):
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    a.barh([r["workload"] for r in rows], [r["speedup"] for r in rows])
    a.set_xscale("log")
    a.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    a.axvline(1, color="gray", lw=0.8)
    a.set_xlabel("speed-up over torch.nn.utils.prune (log)")
    a.invert_yaxis()
    if sweep_rows:
        n = [r["numel"] for r in sweep_rows]
        for side in SIDES:
            b.loglog(n, [r[f"{side}_s"] for r in sweep_rows], "o-", label=side)
        b.set_xlabel("elements")
        b.set_ylabel("l1_unstructured time (s)")
        b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return _child(*argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat, no first-call subprocesses")
    ap.add_argument("--workloads", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--dtype", default="float32", choices=["float16", "bfloat16", "float32", "float64"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: inputs on the GPU, timings synchronized; first calls and peak memory are CPU-only")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds, and warm repeats")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--scale", action="store_true", help="also prune 1e9 parameters with fastprune alone")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "local"),
                    help="where results go (default: untracked; benchmarks/results updates the committed ones)")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    repeats = 1 if args.quick else args.repeats
    info = machine()
    bandwidth = measure_copy_bandwidth(1 << 24 if args.quick else 1 << 28)
    fresh_cost = measure_fresh_page_cost(1 << 24 if args.quick else 1 << 28)
    print(f"fastprune benchmark: {info['cpu']}, {info['threads']} threads, torch {info['torch']}, "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, fresh memory {fresh_cost * 2**26 * 1e3:.1f} ms per 64 MiB",
          flush=True)
    rows = []
    for name in args.workloads:
        print(f"- {name} ...", end="", flush=True)
        row = run_workload(WORKLOADS[name], dtype, args.device, args.quick, repeats, bandwidth,
                           peak=not args.quick and args.device == "cpu", fresh_cost=fresh_cost)
        rows.append(row)
        print(f" torch {_ms(row['torch_s'])}, fastprune {_ms(row['fastprune_s'])} (worst "
              f"{_ms(row['fastprune_worst_s'])}, warm {_ms(row['fastprune_best_s'])}), {_x(row['speedup'])}; "
              f"first call {_ms(row['torch_first_s'])} vs {_ms(row['fastprune_first_s'])}"
              + ("" if row["masks_agree"] else "  ** MASKS DIFFER **"), flush=True)
    sweep_rows = [] if args.no_sweep else sweep(dtype, args.quick, repeats)
    scale = scale_run(dtype) if args.scale else None
    table = markdown(rows, info, bandwidth, fresh_cost)
    print()
    print(table)
    if scale:
        print(f"\nscale: {scale['numel']:,} parameters in {scale['fastprune_s']:.1f} s, peak growth "
              f"{fmt_bytes(scale['peak_growth_bytes'])}, exactly k pruned: {scale['exact']}; torch {scale['torch']}")
    os.makedirs(args.out, exist_ok=True)
    stem = "quick" if args.quick else "latest"
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
        json.dump({"machine": info, "device": args.device, "dtype": args.dtype, "copy_bandwidth": bandwidth,
                   "fresh_page_cost_s_per_byte": fresh_cost, "rows": rows, "sweep": sweep_rows, "scale": scale}, f, indent=1)
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write(table + "\n")
    plot(rows, sweep_rows, os.path.join(args.out, f"{stem}.png"))
    mismatches = sum(not r["masks_agree"] for r in rows)
    if mismatches:
        print(f"\n{mismatches} workload(s) with masks that differ from torch.nn.utils.prune", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
