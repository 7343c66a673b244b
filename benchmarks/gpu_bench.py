"""The benchmark's GPU workloads, one stage per call (tests/gpu/run.sh runs
each under its own time limit). Every stage adds its results to
OUT/bench.json and rewrites OUT/bench.md from it, so what finished before a
failure or a timeout is kept. Both name the card.

    python benchmarks/gpu_bench.py l1 --out DIR      # l1_unstructured, 1e9 fp32 elements
    python benchmarks/gpu_bench.py gpt2 --out DIR    # global L1 over a GPT-2-small-like layer set
    python benchmarks/gpu_bench.py scale --out DIR   # global L1 over 7e9 bf16 parameters, each side in a process
    python benchmarks/gpu_bench.py l1 --device cpu --tiny --out DIR   # tiny sizes on the CPU (the tests)

Speed is reported against the two-pass floor (bench.py's bytes per element)
at the copy bandwidth of the device, measured at the start of each stage.
Peak memory is the growth of torch.cuda's peak allocation over what was
allocated before the prune (on the CPU: not measured).
"""
import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import time

import torch

import fastprune

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


# ----------------------------------------------------------------- device

def card(device):
    """The device's name and what the tables say about it."""
    if device == "cpu":
        return {"name": "cpu", "capability": None, "memory_bytes": None}
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"name": props.name, "capability": f"{props.major}.{props.minor}", "memory_bytes": props.total_memory}


def sync(device):
    if device != "cpu":
        torch.cuda.synchronize()


def device_copy_bandwidth(device, nbytes):
    """Bytes read plus written per second by the best of five device-to-device
    copies of `nbytes`."""
    x = torch.ones(nbytes // 4, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def peak_growth(device, fn):
    """Bytes by which fn() raises torch.cuda's peak allocation above what was
    allocated before it; None on the CPU."""
    if device == "cpu":
        fn()
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated() - before


# -------------------------------------------------------------- workloads

def l1_1e9(device, tiny):
    """bench.py's l1_unstructured workload at 1e9 fp32 elements, drawn on the
    device (bench.tie_free draws on the CPU: minutes at this size). Normal
    values have equal magnitudes at this size, so the masks are compared up to
    the reference's arbitrary choice among the entries at the cut. Without the
    kthvalue idiom (torch.kthvalue on CUDA runs one block per slice)."""
    w = copy.copy(bench.WORKLOADS["l1_unstructured"])
    n = 10 ** 5 if tiny else 10 ** 9
    w.name, w.note, w.idiom = "l1_unstructured_1e9", f"amount 0.5, {n:.0e} fp32 elements, normal values", None
    drawn = {}

    def make(dtype, quick):
        g = torch.Generator(device=device).manual_seed(0)
        m = torch.nn.Module()
        m.register_parameter("p0", torch.nn.Parameter(torch.randn(n, generator=g, device=device, dtype=dtype)))
        drawn["scores"] = m.p0.detach()
        return m

    def agree(ref, fast):
        """The same number pruned, and the masks differ only among entries
        whose magnitude equals the largest pruned one."""
        (r,), (f,) = ref, fast
        if r.dtype != f.dtype or int((r == 0).sum()) != int((f == 0).sum()):
            return False
        mags = drawn["scores"].abs()
        return bool((mags[r != f] == mags[r == 0].max()).all())

    w.make, w.agree = make, agree
    return w


def run_row(w, device, tiny, bandwidth, repeats):
    """bench.run_workload on the device, with each side's peak torch.cuda
    growth measured on its first (untimed, correctness) run."""
    w = copy.copy(w)
    run, peaks = w.run, {}

    def run_measured(prune, m):
        if prune in peaks:
            return run(prune, m)
        peaks[prune] = peak_growth(device, lambda: run(prune, m))

    w.run = run_measured
    row = bench.run_workload(w, torch.float32, device, tiny, repeats, bandwidth, peak=False)
    for side, prune in bench.SIDES.items():
        row[f"{side}_peak_bytes"] = peaks[prune]
    return row


def llama_like_shapes(hidden=4096, ffn=11008, vocab=64000, layers=32):
    """Embedding, per layer q, k, v, o and the three MLP matrices, output head:
    7,000,293,376 parameters with the defaults."""
    per_layer = [(hidden, hidden)] * 4 + [(ffn, hidden), (ffn, hidden), (hidden, ffn)]
    return [(vocab, hidden)] + per_layer * layers + [(vocab, hidden)]


SCALE_SHAPES = {False: llama_like_shapes(), True: llama_like_shapes(64, 172, 1000, 2)}


SCALE_SIDES = ("fastprune in place", "fastprune", "torch")


def scale_side(side, device, tiny):
    """One side's global L1 prune (amount 0.5) of the llama-like parameters in
    bf16, in this process: what happened, the time, the peak torch.cuda
    allocation and its growth over the weights. "fastprune in place" prunes
    inside ``fastprune.in_place("bits")``."""
    in_place = side == "fastprune in place"
    prune = bench.SIDES["fastprune" if in_place else side]
    shapes = SCALE_SHAPES[tiny]
    g = torch.Generator(device=device).manual_seed(0)
    m = torch.nn.Module()
    for i, s in enumerate(shapes):
        m.register_parameter(f"p{i}", torch.nn.Parameter(
            torch.randn(s, generator=g, device=device, dtype=torch.bfloat16)))
    numel = sum(p.numel() for p in m.parameters())
    result = {"side": side, "numel": numel, "tensors": len(shapes),
              "weight_bytes": sum(p.numel() * p.element_size() for p in m.parameters())}
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), (fastprune.in_place("bits") if in_place else contextlib.nullcontext()):
            result["peak_growth_bytes"] = peak_growth(device, lambda: prune.global_unstructured(
                [(m, f"p{i}") for i in range(len(shapes))], pruning_method=prune.L1Unstructured, amount=0.5))
        result["seconds"] = time.perf_counter() - t0
        pruned = sum(int((~fastprune.prune.mask_of(m, f"p{i}")).sum()) for i in range(len(shapes)))
        result.update(outcome="ok", pruned=pruned, exact=pruned == round(0.5 * numel))
    except Exception as e:  # the reference fails at this size: record how
        result["seconds"] = time.perf_counter() - t0
        result.update(outcome="error", error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
    if device != "cpu":
        result["peak_bytes"] = torch.cuda.max_memory_allocated()
    return result


def scale(device, tiny, budget_s):
    """Each side in a process of its own (fastprune first), the reference
    under what is left of `budget_s`; a side that runs out of time or dies is
    recorded as such."""
    out = {}
    start = time.perf_counter()
    for side in SCALE_SIDES:
        left = max(budget_s - (time.perf_counter() - start), 1.0)
        cmd = [sys.executable, os.path.abspath(__file__), "--child-scale", side, device, str(int(tiny))]
        print(f"- scale, {side} (limit {left:.0f} s) ...", flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
            if proc.returncode == 0:
                out[side] = json.loads(proc.stdout.strip().splitlines()[-1])
            else:
                tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                out[side] = {"side": side, "outcome": f"process died (exit {proc.returncode}): {tail[:300]}"}
        except subprocess.TimeoutExpired:
            out[side] = {"side": side, "outcome": f"timeout: stopped after {left:.0f} s"}
        print(f"  {out[side]}", flush=True)
    return out


# ------------------------------------------------------------------ report

def scale_markdown(scale_result):
    lines = ["| global L1 0.5, bf16 | parameters | tensors | outcome | time | peak torch.cuda | growth over the weights |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for side, r in scale_result.items():
        outcome = r["outcome"]
        if outcome == "ok":
            outcome = "ok, exactly k pruned" if r["exact"] else f"ok, but {r['pruned']:,} pruned (not k)"
        elif outcome == "error":
            outcome = r["error"].replace("|", "\\|")
        seconds = f"{r['seconds']:.2f} s" if "seconds" in r else "-"
        lines.append(f"| {side} | {r.get('numel', 0):,} | {r.get('tensors', '-')} | {outcome} | {seconds} | "
                     f"{bench.fmt_bytes(r.get('peak_bytes'))} | {bench.fmt_bytes(r.get('peak_growth_bytes'))} |")
    return "\n".join(lines)


def write_results(out, stage, device, bandwidth, result):
    """Adds `result` under `stage` to out/bench.json (kept across stages) and
    rewrites out/bench.md from all of it."""
    path = os.path.join(out, "bench.json")
    data = {"rows": {}, "scale": None}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    info = bench.machine()
    c = card(device)
    data.update(card=c, machine=info, device=device, copy_bandwidth=bandwidth, build_info=fastprune.build_info())
    if stage == "scale":
        data["scale"] = result
    else:
        data["rows"][stage] = result
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    # bench.markdown names the machine by info["cpu"]: the card first, then the host.
    named = dict(info, cpu=f"{c['name']} (host: {info['cpu']})")
    parts = [f"# fastprune on {c['name']}", "",
             "Peak columns: growth of torch.cuda's peak allocation over what was allocated before the prune.", ""]
    if data["rows"]:
        parts += [bench.markdown(list(data["rows"].values()), named, data["copy_bandwidth"]), ""]
    if data["scale"]:
        parts += [scale_markdown(data["scale"]), ""]
    text = "\n".join(parts)
    with open(os.path.join(out, "bench.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child-scale"]:
        side, device, tiny = argv[1:]
        print(json.dumps(scale_side(side, device, bool(int(tiny)))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["l1", "gpt2", "scale"])
    ap.add_argument("--out", default="gpu-results")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes, one repeat (the tests run this on the CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=60.0, help="scale: time for both sides together")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA GPU (use --device cpu --tiny to try the stages on the CPU)")
    repeats = 1 if args.tiny else args.repeats
    bandwidth = device_copy_bandwidth(args.device, 1 << 24 if args.tiny else 1 << 31)
    print(f"gpu_bench {args.stage}: {card(args.device)['name']}, copy bandwidth {bandwidth / 1e9:,.1f} GB/s",
          flush=True)
    if args.stage == "scale":
        result = scale(args.device, args.tiny, args.budget_s)
        ok = all(r["outcome"] != "ok" or r["exact"] for r in result.values()) and \
            result["fastprune"]["outcome"] == "ok"
    else:
        w = l1_1e9(args.device, args.tiny) if args.stage == "l1" else bench.WORKLOADS["global_l1_gpt2"]
        result = run_row(w, args.device, args.tiny, bandwidth, repeats)
        print(f"  torch {result['torch_s'] * 1e3:,.1f} ms, fastprune {result['fastprune_s'] * 1e3:,.1f} ms, "
              f"{result['speedup']:,.1f}x, {result['fraction_of_floor']:.0%} of floor, masks agree: "
              f"{result['masks_agree']}", flush=True)
        ok = result["masks_agree"]
    print()
    print(write_results(args.out, args.stage, args.device, bandwidth, result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
