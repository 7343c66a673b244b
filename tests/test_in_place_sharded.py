"""Pruning in place with 1-bit or bool masks, sharded: DTensor parameters
and FSDP2 (``fully_shard``) models, against the reference layout unsharded
in one process.

* A fuzz that adds the in-place dimension to the sharded fuzzer
  (test_sharded_fuzz.py, whose example drawing, sides, steps and reference
  it reuses): every example also draws a mask format, and every step on the
  sharded model runs inside ``fastprune.in_place(fmt)``, so DTensor
  parameters (``Shard(d)`` for any d, uneven and empty shards,
  ``Replicate()``) and FSDP2 parameters are pruned in place. After every step
  each rank gathers (``full_tensor()``) and checks: ``mask_of`` equals the
  reference's mask, the parameter its ``orig * mask``, there is no
  ``<name>_orig``; the mask buffer is a DTensor placed like the parameter, of
  the format asked for, except where the last dim is cut into pieces that
  are not whole bytes (``shape[-1]`` not a multiple of 8 * pieces): bool
  there; a packed buffer's full tensor is the pure-torch packing of the
  mask (in_place_util); hooks, ``is_pruned``, errors and random-number
  draws are the reference's; the ranks gathered the same tensors.
* Fixed checks: the format rule on chosen shapes (Shard(1) with last dims a
  multiple of 8 * world or not, 1-D ``Shard(0)`` and ``_StridedShard``);
  FSDP2 trained with AdamW keeps the zeros with the reference's gradients,
  a second round whose optimizer state predates it keeps its zeros; a DCP
  (torch.distributed.checkpoint) round trip of an FSDP2 model pruned with
  bits, loaded by the same and by another number of ranks; FSDP2 outside
  ``in_place`` keeps a mask of the computed dtype.

One spawn per world size runs the fuzz and every check; each reports its
own outcome. Long mode, with fresh seeds (printed):

    FASTPRUNE_IN_PLACE_SHARDED_FUZZ_EXAMPLES=1000 python -m pytest -q -s tests/test_in_place_sharded.py

replay: ``FASTPRUNE_IN_PLACE_SHARDED_FUZZ_SEEDS=2000009`` (with
``FASTPRUNE_IN_PLACE_SHARDED_FUZZ_WORLDS=3``).
"""
import collections
import copy
import os
import random
import traceback

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as REF
from torch.testing import assert_close

import fastprune
import fastprune.prune as FAST
from dist_util import run_ranks
from in_place_util import pack_reference, stored_problems
from test_fsdp import Tiny, linears, loss, wrapped
from test_sharded_fuzz import (
    adopt_masks, attempt, describe, draw_example, effective, expected_error, full, gather, hook_problems, layout_summary,
    make_meshes, make_sides, placement_problems, pruning_chain, random_problems, refused, run_hooks, structure,
    view,
)
from test_sharded_survival import outcome, run_checks, strided

EXAMPLES = int(os.environ.get("FASTPRUNE_IN_PLACE_SHARDED_FUZZ_EXAMPLES", "0"))
SEEDS = [int(s) for s in os.environ.get("FASTPRUNE_IN_PLACE_SHARDED_FUZZ_SEEDS", "").split(",") if s.strip()]
WORLDS = [int(w) for w in os.environ.get("FASTPRUNE_IN_PLACE_SHARDED_FUZZ_WORLDS", "").split(",")
          if w.strip()] or [2, 3]
CI_EXAMPLES = {2: 80, 3: 40}
PG_TIMEOUT = 60


def seeds_for(world):
    if SEEDS:
        return list(SEEDS)
    if EXAMPLES:
        fresh = random.SystemRandom()
        return [fresh.getrandbits(32) for _ in range(EXAMPLES)]
    return [world * 1_000_000 + 500_000 + i for i in range(CI_EXAMPLES.get(world, 40))]


def expected_format(param, fmt):
    """The issue's rule: a packed mask where it can be placed like the
    parameter, else bool: not when the last dim is cut by a ``_StridedShard``,
    or by ``Shard`` into pieces whose size is not a whole number of bytes."""
    if fmt == "bool":
        return "bool"
    pieces = 1
    for mesh_dim, p in enumerate(param.placements):
        cut = getattr(p, "dim", None)  # Shard, and _StridedShard (no Shard subclass)
        if isinstance(cut, int) and cut % param.dim() == param.dim() - 1:
            if type(p).__name__ != "Shard":
                return "bool"
            pieces *= param.device_mesh.size(mesh_dim)
    return "bits" if pieces == 1 or param.shape[-1] % (8 * pieces) == 0 else "bool"


# ----------------------------------------------------------------------------
# The fuzz: test_sharded_fuzz's examples, the sharded side in place
# ----------------------------------------------------------------------------

def in_place_view(model, example, fmt):
    """{target: {"param", "mask" (mask_of), "buffer", "format", "orig"}: full
    tensors, the keys present}, hooks and is_pruned. Collective, in the same
    order on every rank."""
    tensors = {}
    for target in example["targets"]:
        path, name = target
        module = model.get_submodule(path)
        entry = {key: full(t) for key, t in (("param", module._parameters.get(name)),
                                             ("orig", module._parameters.get(name + "_orig")),
                                             ("buffer", module._buffers.get(name + "_mask"))) if t is not None}
        if "buffer" in entry:
            entry["mask"] = full(FAST.mask_of(module, name))
            entry["format"] = expected_format(module._parameters[name], fmt)
        tensors[target] = entry
    hooks = {path: pruning_chain(model.get_submodule(path)) for path, _ in example["targets"]}
    return {"tensors": tensors, "hooks": hooks, "pruned": FAST.is_pruned(model)}


def compare(ref, sh):
    """Differences between the in-place view ``sh`` and the reference's view."""
    problems = []
    for target, r in ref["tensors"].items():
        s = sh["tensors"][target]
        if "orig" in s or "param" not in s or ("buffer" in s) != ("mask" in r):
            problems.append(f"{target}: in place holds {sorted(s)}, reference {sorted(r)}")
            continue
        if "mask" in r:
            mask = r["mask"] != 0
            if s["mask"].dtype != torch.bool or not torch.equal(s["mask"], mask):
                problems.append(f"{target}: mask_of {s['mask']}\nvs reference {mask}")
            problems += [f"{target}: {p}" for p in stored_problems(s["buffer"], mask, s["format"])]
        expected = effective(r)
        if s["param"].dtype != expected.dtype or not torch.equal(s["param"], expected):
            problems.append(f"{target}: values {s['param']}\nvs reference {expected}")
    return problems + hook_problems(ref, sh)


def same_view(a, b):
    return a["hooks"] == b["hooks"] and all(
        a["tensors"][t].keys() == b["tensors"][t].keys() and all(
            torch.equal(v, b["tensors"][t][k]) if isinstance(v, torch.Tensor) else v == b["tensors"][t][k]
            for k, v in a["tensors"][t].items()) for t in a["tensors"])


def digest(v):
    return [(t, k, x.dtype, tuple(x.shape), x.to(torch.float64).sum().item(), x.to(torch.float64).abs().sum().item())
            for t, e in sorted(v["tensors"].items()) for k, x in sorted(e.items()) if isinstance(x, torch.Tensor)]


def check_step(ref, sh, step, before, rank, group, fmt):
    """Makes ``step`` (None: the build) on both sides, the sharded one in
    place; returns the sharded view and every rank's problems."""
    ref_error = sh_error = None
    problems = []
    if step is not None:
        refusal = refused(step, sh.model)
        saved = copy.deepcopy(ref.model) if refusal else None
        ref_error, ref_draws = attempt(ref, step, step["seed"])
        other = step.get("other_seeds") and rank > 0  # rank 0's generator decides alone
        with fastprune.in_place(fmt):
            sh_error, sh_draws = attempt(sh, step, step["seed"] + 7919 * rank if other else step["seed"])
        expected = expected_error(step, ref_error, sh.model)
        if refusal and ref_error is None:
            ref.model = saved
        if step["kind"] == "convert":  # in place keeps no cached tensor: neither may the reference
            run_hooks(ref.model)
        if (sh_error and sh_error[0]) != expected:
            problems.append(f"sharded call raised {sh_error}, expected {expected} (reference: {ref_error})")
        random_kind = step["kind"] in ("random_unstructured", "global_random")
        if not random_kind and not other and not refusal and not torch.equal(ref_draws, sh_draws):
            problems.append("the sharded call drew a different amount of random numbers")
    shapes = gather((sh_error and sh_error[0], structure(sh.model, sh.example)), group)
    if any(s != shapes[0] for s in shapes):
        return None, [problems + [f"the ranks differ after the call (error, layout): {shapes}"]]
    after = in_place_view(sh.model, sh.example, fmt)
    problems += placement_problems(sh.model, sh.example)
    if sh_error is not None and before is not None and not same_view(before, after):
        problems.append("the failed call changed the model")
    if step is not None and step["kind"] in ("random_unstructured", "global_random") and not (sh_error or ref_error):
        problems += random_problems(step, before, after)
        adopt_masks(ref.model, step, after)
    problems += compare(view(ref.model, ref.example), after)
    outcomes = gather((problems, digest(after)), group)
    if any(d != outcomes[0][1] for _, d in outcomes):
        outcomes = [(p + ["the ranks gathered different full tensors"], d) for p, d in outcomes]
    return after, [p for p, _ in outcomes]


def run_example(seed, world, rank, meshes, stats):
    example = draw_example(seed, world)
    fmt = random.Random(seed).choice(["bits", "bool"])
    ref, sh = make_sides(example, meshes)
    stats[f"layout {sh.layout} {fmt}"] += 1
    before = None
    for i, step in enumerate([None] + example["steps"]):
        stats["step " + (step["kind"] if step else "build")] += 1
        try:
            before, problems = check_step(ref, sh, step, before, rank, meshes["group"], fmt)
        except Exception:
            raise RuntimeError(f"world {world}, seed {seed}, step {i}:\n{traceback.format_exc()}") from None
        if any(problems):
            what = "the build" if step is None else f"step {i} ({describe(step)})"
            text = "\n  ".join(f"rank {r}: " + "\n    ".join(p) for r, p in enumerate(problems) if p)
            return (f"world {world}, seed {seed}, {fmt}, {what}; layout {layout_summary(example)}; "
                    f"steps {[describe(s) for s in example['steps']]}:\n  {text}")
        for entry in before["tensors"].values():
            if "format" in entry:
                stats[f"mask {entry['format']}" + (" (fallback)" if entry["format"] != fmt else "")] += 1
    return None


def fuzz(rank, world, seeds):
    import logging

    import fastprune.distributed  # noqa: F401  (as test_sharded_fuzz: DTensor/FSDP2 support loaded)

    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    meshes = make_meshes(world)
    failures, stats = [], collections.Counter()
    for seed in seeds:
        try:
            failure = run_example(seed, world, rank, meshes, stats)
        except Exception as e:  # the ranks may be out of step now: stop (a peer times out in its collective)
            failures.append(str(e))
            break
        if failure:
            failures.append(failure)
    return {"failures": failures, "stats": dict(stats)}


# ----------------------------------------------------------------------------
# Fixed checks
# ----------------------------------------------------------------------------

def format_rule(rank, world):
    """Chosen shapes and placements: the format the rule gives (written out
    per world size), masks and values equal to one process's reference
    layout, the packed buffer placed like the parameter; a training step
    keeps the zeros."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    cases = [  # shape, placement, expected format on 2 ranks, on 3
        ((5, 16), Shard(1), "bits", "bool"),
        ((5, 24), Shard(1), "bool", "bits"),
        ((5, 13), Shard(1), "bool", "bool"),
        ((7, 13), Shard(0), "bits", "bits"),
        ((3, 9), Replicate(), "bits", "bits"),
        ((48,), Shard(0), "bits", "bits"),
        ((16,), Shard(0), "bits", "bool"),
        ((48,), "strided", "bool", "bool"),
        ((6, 16), "strided", "bits", "bits"),
    ]
    for i, (shape, placement, two, three) in enumerate(cases):
        g = torch.Generator().manual_seed(i)
        whole = nn.Module()
        whole.w = nn.Parameter(torch.randn(shape, generator=g))
        mine = nn.Module()
        if placement == "strided":
            mine.w = nn.Parameter(strided(whole.w.detach(), mesh, 2))
        else:
            mine.w = nn.Parameter(distribute_tensor(whole.w.detach(), mesh, [placement]))
        param = mine.w
        calls = [lambda m: FAST.l1_unstructured(m, "w", amount=0.3)]
        if len(shape) > 1:
            calls.append(lambda m: FAST.ln_structured(m, "w", amount=1, n=2, dim=0))
        for call in calls:
            call(whole)
            with fastprune.in_place("bits"):
                call(mine)
            buffer = mine.w_mask
            assert isinstance(buffer, DTensor) and buffer.placements == param.placements, (shape, placement)
            fmt = two if world == 2 else three
            assert expected_format(param, "bits") == fmt, (shape, placement)
            mask = whole.w_mask != 0
            assert stored_problems(buffer.full_tensor(), mask, fmt) == [], (shape, placement)
            mask_of = FAST.mask_of(mine, "w")
            assert isinstance(mask_of, DTensor) and mask_of.placements == param.placements, (shape, placement)
            assert mask_of.dtype == torch.bool and torch.equal(mask_of.full_tensor(), mask), (shape, placement)
            assert mine.w is param and torch.equal(param.full_tensor(), whole.w), (shape, placement)
        opt = torch.optim.SGD([param], lr=0.1, weight_decay=0.1)
        (param * param).sum().backward()
        opt.step()
        kept = FAST.mask_of(mine, "w").to_local()
        assert (param.to_local()[~kept] == 0).all() and (param.to_local()[kept] != 0).all(), (shape, placement)
        # Writes outside an optimizer, through the local shard or the
        # DTensor, are masked before the next forward (its pruning hooks).
        for write in (lambda: param.to_local().fill_(1.0), lambda: param.fill_(2.0)):
            with torch.no_grad():
                write()
            run_hooks(mine)
            assert (param.to_local()[~kept] == 0).all() and (param.to_local()[kept] != 0).all(), (shape, placement)


def pruned_fsdp_pair(world, fmt="bits"):
    """Tiny and an FSDP2 copy, globally pruned (Linear weights and two biases:
    1-D, so sharded along their last dim), the copy in place; AdamW (weight
    decay) built before the prune on both."""
    torch.manual_seed(0)
    ref = Tiny()
    model = wrapped(copy.deepcopy(ref), world)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (ref, model)]

    def targets(m):
        return linears(m) + [(m.blocks[0].up, "bias"), (m.head, "bias")]

    REF.global_unstructured(targets(ref), REF.L1Unstructured, amount=0.5)
    with fastprune.in_place(fmt):
        FAST.global_unstructured(targets(model), FAST.L1Unstructured, amount=0.5)
    return ref, model, opts, targets


def assert_fsdp_matches(ref, model, targets, fmt):
    from torch.distributed.tensor import DTensor

    for (r, name), (m, _) in zip(targets(ref), targets(model)):
        param, buffer = m._parameters[name], m._buffers[name + "_mask"]
        assert isinstance(buffer, DTensor) and buffer.placements == param.placements
        assert name + "_orig" not in m._parameters
        mask = r._buffers[name + "_mask"] != 0
        assert stored_problems(buffer.full_tensor(), mask, expected_format(param, fmt)) == [], (m, name)
        assert torch.equal(FAST.mask_of(m, name).full_tensor(), mask), (m, name)
        assert torch.equal(param.full_tensor(), r._parameters[name + "_orig"] * r._buffers[name + "_mask"])


def assert_local_zeros(model, targets):
    for m, name in targets(model):
        values, kept = getattr(m, name).to_local(), FAST.mask_of(m, name).to_local()
        assert (values[~kept] == 0).all(), (m, name)


def fsdp_training(rank, world):
    ref, model, opts, targets = pruned_fsdp_pair(world)
    params = [getattr(m, name) for m, name in targets(model)]
    assert_fsdp_matches(ref, model, targets, "bits")
    formats = {expected_format(getattr(m, name), "bits") for m, name in targets(model)}
    assert formats == {"bits", "bool"}, formats  # the biases (10 and 13 entries) fall back to bool
    for step in range(4):
        for m, opt in zip((ref, model), opts):
            opt.zero_grad()
            loss(m, step).backward()
        for (r, name), (m, _) in zip(targets(ref), targets(model)):
            assert_close(getattr(m, name).grad.full_tensor(), r._parameters[name + "_orig"].grad)
        for opt in opts:
            opt.step()
        assert_local_zeros(model, targets)
    assert [getattr(m, name) for m, name in targets(model)] == params
    assert_close(model(torch.arange(12).view(2, 6) % 13), ref(torch.arange(12).view(2, 6) % 13), rtol=1e-4,
                 atol=1e-5)
    # A second round: its new zeros have momentum from the steps before.
    model.reshard()
    with fastprune.in_place("bits"):
        FAST.l1_unstructured(model.blocks[1].up, "weight", amount=0.4)
        FAST.ln_structured(model.blocks[2].down, "weight", amount=2, n=1, dim=0)
    for step in range(4, 7):
        opts[1].zero_grad()
        loss(model, step).backward()
        opts[1].step()
        assert_local_zeros(model, targets)
    # A write outside the optimizer is masked before the next all-gather.
    with torch.no_grad():
        for m, name in targets(model):
            getattr(m, name).to_local().fill_(1.0)
    model(torch.arange(12).view(2, 6) % 13)
    model.reshard()
    assert_local_zeros(model, targets)
    for m, name in targets(model):
        values, kept = getattr(m, name).to_local(), FAST.mask_of(m, name).to_local()
        assert (values[kept] == 1).all(), (m, name)


def dcp_round_trip(rank, world, base):
    """Save a model pruned in place with bits (DCP, per world size), load it
    into a fresh model prepared with ``identity`` in ``in_place("bits")``: the
    same tensors (packed masks placed like the parameters), the same
    outputs, zeros kept in training. World 3 also loads world 2's."""
    import torch.distributed.checkpoint as dcp

    ref, model, opts, targets = pruned_fsdp_pair(world)
    for step in range(2):
        opts[1].zero_grad()
        loss(model, step).backward()
        opts[1].step()
    path = os.path.join(base, f"world{world}")
    dcp.save({"model": model.state_dict()}, checkpoint_id=path)
    state = {k: full(v).clone() for k, v in model.state_dict().items()}
    expected = model(torch.arange(12).view(2, 6) % 13).detach()
    if rank == 0:
        torch.save((state, expected), os.path.join(base, f"expected{world}.pt"))
    load_into_fresh(world, path, state, expected, targets)
    if world == 3:
        load_into_fresh(world, os.path.join(base, "world2"), *torch.load(os.path.join(base, "expected2.pt")),
                        targets)


def load_into_fresh(world, path, state, expected, targets):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor

    torch.manual_seed(5)
    fresh = wrapped(Tiny(), world)
    opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1)
    with fastprune.in_place("bits"):
        for m, name in targets(fresh):
            FAST.identity(m, name)
    loaded = {"model": fresh.state_dict()}
    dcp.load(loaded, checkpoint_id=path)
    fresh.load_state_dict(loaded["model"])
    for k, v in fresh.state_dict().items():
        assert v.dtype == state[k].dtype and torch.equal(full(v), state[k]), k
    for m, name in targets(fresh):
        buffer = m._buffers[name + "_mask"]
        assert isinstance(buffer, DTensor) and buffer.placements == getattr(m, name).placements
        assert buffer.dtype == (torch.uint8 if expected_format(getattr(m, name), "bits") == "bits" else torch.bool)
        assert torch.equal(buffer.full_tensor(), pack_reference(FAST.mask_of(m, name).full_tensor())) or \
            buffer.dtype == torch.bool
    assert_close(fresh(torch.arange(12).view(2, 6) % 13), expected)
    for step in range(2):
        opt.zero_grad()
        loss(fresh, step).backward()
        opt.step()
        assert_local_zeros(fresh, targets)


def fsdp_outside_keeps_dense_mask(rank, world):
    """FSDP2 parameters are pruned in place outside ``in_place`` too, with a
    mask of the computed dtype; ``in_place("bool")`` gives bool."""
    torch.manual_seed(0)
    model = wrapped(Tiny(), world)
    FAST.l1_unstructured(model.head, "weight", amount=0.5)
    with fastprune.in_place("bool"):
        FAST.l1_unstructured(model.blocks[0].q, "weight", amount=0.5)
    assert "weight_orig" not in model.head._parameters and model.head.weight_mask.dtype == torch.float32
    assert model.blocks[0].q.weight_mask.dtype == torch.bool
    for m in (model.head, model.blocks[0].q):
        kept = FAST.mask_of(m, "weight").full_tensor()
        assert int((~kept).sum()) == m.weight.numel() // 2
        assert torch.equal(m.weight.full_tensor() != 0, kept)


CHECKS = [format_rule, fsdp_training, fsdp_outside_keeps_dense_mask]


# ----------------------------------------------------------------------------
# One spawn per world size
# ----------------------------------------------------------------------------

def everything(rank, world, seeds, base):
    def dcp(r, w):
        dcp_round_trip(r, w, base)

    dcp.__name__ = "dcp_round_trip"
    checks = run_checks(rank, world, CHECKS + [dcp])
    return {"checks": checks, "fuzz": fuzz(rank, world, seeds)}


_SPAWNED = {}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return str(tmp_path_factory.mktemp("in_place_dcp"))


def results_of(world, base):
    if world not in _SPAWNED:
        if world == 3 and 2 in WORLDS:
            results_of(2, base)  # world 3 loads world 2's checkpoint
        seeds = seeds_for(world)
        if EXAMPLES or SEEDS:
            print(f"world {world}: seeds {seeds}")
        _SPAWNED[world] = run_ranks(world, everything, seeds, base, pg_timeout=PG_TIMEOUT,
                                    timeout=120 + 0.5 * world * len(seeds))
    return _SPAWNED[world]


@pytest.mark.parametrize("world", WORLDS)
def test_fuzz_in_place_sharded(world, base):
    results = results_of(world, base)
    fuzz_results = [r["fuzz"] for r in results]
    stats = collections.Counter(fuzz_results[0]["stats"])
    print(f"world {world}: {dict(sorted(stats.items()))}")
    failures = list(dict.fromkeys(f for r in fuzz_results for f in r["failures"]))  # (ranks report alike)
    assert not failures, f"{len(failures)} examples failed:\n\n" + "\n\n".join(failures[:5])
    if not SEEDS and not EXAMPLES:  # coverage of the CI seeds
        wanted = ["layout dtensor bits", "layout dtensor bool", "layout fsdp bits", "layout fsdp bool",
                  "mask bits", "mask bool", "mask bool (fallback)"]
        assert all(stats[w] for w in wanted), {w: stats[w] for w in wanted}


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("check", [c.__name__ for c in CHECKS] + ["dcp_round_trip"])
def test_check(world, check, base):
    outcome([r["checks"] for r in results_of(world, base)], check)
