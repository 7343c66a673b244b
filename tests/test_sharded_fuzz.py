"""Differential fuzzing of sharded pruning against single-process fastprune.

Every example is drawn from one integer seed (``random.Random(seed)``, and
torch generators seeded from it), identically on every rank:

* a small model: 1-4 layers (Linear, now and then Conv1d or Conv2d; with or
  without bias) in groups of one or two, each layer float32, float64 or
  bfloat16, filled with values tie-free across the whole model
  (``conftest.fill_tie_free``; at most 256 values, so bfloat16 holds them
  exactly). Sizes go down to 1, so dims are often smaller than the world size
  (empty local shards) or not divisible by it (uneven shards);
* a layout: every parameter a DTensor (``distribute_tensor``) with placements
  of its own (``Shard(d)`` for any d, ``Replicate()``; on a (2, 2) mesh, pairs
  of those), or the model wrapped with FSDP2 ``fully_shard`` (a unit per layer
  or per group, then the root; HSDP on the (2, 2) mesh);
* 1-5 steps among: ``global_unstructured`` with L1Unstructured or
  RandomUnstructured over a subset of the parameters, ``l1_unstructured``,
  ``ln_structured`` (n in 1, 2, inf, -inf, 0; dim 0 or -1), ``random_structured``,
  ``random_unstructured``, ``l1_semi_structured`` (N:M),
  ``channelwise_l1_unstructured``, ``remove``, ``model.to(torch.float64)`` /
  ``.float()`` / ``.to("cpu")``, a state_dict round trip (into a fresh model
  prepared with ``identity``, or back into the same model after zeroing it),
  and the pruning hooks of a forward. Amounts are mostly valid, sometimes not
  (1.5, negative, counts above what is left).

Each step runs on the sharded model and, in the same process, on an unsharded
copy pruned with ``fastprune.prune`` (the reference: itself tested equal to
``torch.nn.utils.prune``), with the global RNG seeded alike before each side.
Then every rank gathers the sharded model (``full_tensor()``) and checks:

* both sides raised the same exception class, or neither did, and every rank
  the same; N:M and per-channel calls whose groups or slices would span
  shards, and structured re-prunes of 1-D DTensors (where the reference
  prunes a (1, n) view), raise NotImplementedError instead
  (docs/distributed.md); a failed call
  changed nothing;
* every ``<name>_mask``, ``<name>_orig``, cached ``<name>`` and parameter
  equals the reference's exactly (dtype, shape, values); for FSDP2, which
  prunes in place, the parameter equals the reference's ``orig * mask`` (and,
  as FSDP2 has no cached pruned tensor to go stale, the reference's is
  recomputed after a dtype change); masks are DTensors with their parameter's
  mesh and placements; the pruning hooks (classes, containers) and
  ``is_pruned`` are the reference's; deterministic methods draw as many
  random numbers as the reference;
* random_unstructured and global RandomUnstructured, which draw differently
  from one process by design: exactly ``round(amount * live)`` (or the int
  amount) of the live entries go and nothing else changes; the reference then
  takes the sharded masks, so the example goes on with exact comparisons.
  random_structured must equal the reference under rank 0's seed, now and
  then with the other ranks seeded differently;
* every rank gathered the same full tensors (replicas did not diverge).

The ranks stay in lockstep: they agree on each step's outcome (one
``all_gather_object``) before going on, and an example stops at its first
failing step, on every rank; the next examples still run. Collectives run on
process groups with a 60 s timeout and the spawn's wait is bounded, so a hang
fails, naming the step each rank had started. Every failure names the world
size, seed and step, with the example's layout and steps.

CI runs fixed seeds: 700 examples on 2 ranks and 400 on 3, one spawn per
world size (about 2 minutes on 2 cores). Long mode, with fresh random seeds
(printed), also on 4 ranks (1-D and (2, 2) meshes):

    FASTPRUNE_SHARDED_FUZZ_EXAMPLES=3000 python -m pytest -x -q -s tests/test_sharded_fuzz.py

Replay seeds from a failure on the world sizes in FASTPRUNE_SHARDED_FUZZ_WORLDS
(default: 2,3, and 4 in long mode):

    FASTPRUNE_SHARDED_FUZZ_SEEDS=2000009 FASTPRUNE_SHARDED_FUZZ_WORLDS=3 python -m pytest -q tests/test_sharded_fuzz.py
"""
import collections
import copy
import datetime
import hashlib
import logging
import math
import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import fastprune.prune as FAST
from conftest import fill_tie_free
from dist_util import run_ranks

EXAMPLES = int(os.environ.get("FASTPRUNE_SHARDED_FUZZ_EXAMPLES", "0"))
SEEDS = [int(s) for s in os.environ.get("FASTPRUNE_SHARDED_FUZZ_SEEDS", "").split(",") if s.strip()]
WORLDS = [int(w) for w in os.environ.get("FASTPRUNE_SHARDED_FUZZ_WORLDS", "").split(",") if w.strip()] or (
    [2, 3, 4] if EXAMPLES else [2, 3])
CI_EXAMPLES = {2: 700, 3: 400}  # per world size: the whole file in about 2 minutes on 2 cores
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
INF = float("inf")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
MAX_VALUES = 256  # every integer up to 256 is exact in bfloat16: tie-free values stay exact


def seeds_for(world):
    """The seeds a world size runs: replayed ones, fresh ones in long mode, else CI's fixed ones."""
    if SEEDS:
        return list(SEEDS)
    if EXAMPLES:
        fresh = random.SystemRandom()
        return [fresh.getrandbits(32) for _ in range(EXAMPLES)]
    return [world * 1_000_000 + i for i in range(CI_EXAMPLES.get(world, 40))]


# ----------------------------------------------------------------------------
# Drawing an example
# ----------------------------------------------------------------------------

def draw_layer(rng, budget):
    """A layer spec with at most `budget` values, or None if none fits."""
    for _ in range(20):
        kind = rng.choices(["Linear", "Conv1d", "Conv2d"], [6, 1, 1])[0]
        if kind == "Linear":
            args = (rng.randint(1, 7), rng.randint(1, 7))  # in, out
            shape = (args[1], args[0])
        else:
            k = rng.randint(1, 3 if kind == "Conv1d" else 2)
            args = (rng.randint(1, 3), rng.randint(1, 4), k)  # in, out, kernel
            shape = (args[1], args[0]) + (k,) * (1 if kind == "Conv1d" else 2)
        bias = rng.random() < 0.4
        if math.prod(shape) + (shape[0] if bias else 0) <= budget:
            return {"kind": kind, "args": args, "bias": bias, "shape": shape,
                    "dtype": rng.choice(sorted(DTYPES))}
    return None


def draw_groups(rng):
    """1-4 layers in groups of one or two (the FSDP2 units of "per group")."""
    layers, budget = [], MAX_VALUES
    for _ in range(rng.randint(1, 4)):
        layer = draw_layer(rng, budget)
        if layer is None:
            break
        layers.append(layer)
        budget -= math.prod(layer["shape"]) + (layer["shape"][0] if layer["bias"] else 0)
    groups = []
    while layers:
        size = min(len(layers), rng.randint(1, 2))
        groups.append(layers[:size])
        layers = layers[size:]
    return groups


def targets_of(groups):
    """{(module path, parameter name): shape} of every parameter, in model order."""
    out = {}
    for g, group in enumerate(groups):
        for i, layer in enumerate(group):
            out[(f"{g}.{i}", "weight")] = layer["shape"]
            if layer["bias"]:
                out[(f"{g}.{i}", "bias")] = layer["shape"][:1]
    return out


def draw_placement(rng, ndim):
    from torch.distributed.tensor import Replicate, Shard

    return rng.choice([Replicate()] + [Shard(d) for d in range(ndim)])


def draw_layout(rng, world, targets):
    """DTensor placements per parameter, or FSDP2 units; the mesh."""
    mesh = "2d" if world == 4 and rng.random() < 0.5 else "1d"
    if rng.random() < 0.35:
        return {"kind": "fsdp", "mesh": mesh, "units": rng.choice(["layer", "group", "mixed"]),
                "mixed": [rng.random() < 0.5 for _ in range(8)]}
    dims = 2 if mesh == "2d" else 1
    placements = {t: tuple(draw_placement(rng, len(shape)) for _ in range(dims)) for t, shape in targets.items()}
    return {"kind": "dtensor", "mesh": mesh, "placements": placements}


def draw_amount(rng, units):
    """A fraction or a count of `units`; about one in eight invalid."""
    if rng.random() < 0.12:
        return rng.choice([1.5, -0.25, -1, units + rng.randint(1, 3)])
    return rng.choice([rng.random(), 0.0, 0.25, 0.5, 1.0, rng.randint(0, units), rng.randint(0, units)])


STEP_WEIGHTS = {"global_l1": 4, "l1": 3, "ln": 4, "random_structured": 2, "random_unstructured": 2,
                "global_random": 2, "nm": 2, "channelwise": 2, "remove": 2, "convert": 1, "state_dict": 1,
                "forward": 1}


def draw_step(rng, targets, pruned):
    """One step on a model whose parameters have the shapes `targets`;
    `pruned`: the targets earlier steps may have pruned."""
    kind = rng.choices(list(STEP_WEIGHTS), list(STEP_WEIGHTS.values()))[0]
    names = list(targets)
    step = {"kind": kind, "seed": rng.randrange(2 ** 31)}
    if kind in ("global_l1", "global_random"):
        step["pairs"] = rng.sample(names, rng.randint(1, len(names)))
        step["amount"] = draw_amount(rng, sum(math.prod(targets[t]) for t in step["pairs"]))
        step["other_seeds"] = kind == "global_random" and rng.random() < 0.3
        pruned.update(step["pairs"])
        return step
    if kind == "convert":
        step["how"] = rng.choice(["float64", "float", "cpu"])
        return step
    if kind == "state_dict":
        step["fresh"] = rng.random() < 0.6
        return step
    if kind == "forward":
        return step
    if kind == "remove":
        step["target"] = rng.choice(sorted(pruned)) if pruned and rng.random() < 0.9 else rng.choice(names)
        return step
    multi = [t for t in names if len(targets[t]) > 1]
    structured = kind in ("ln", "random_structured")
    step["target"] = rng.choice(multi) if structured and multi and rng.random() < 0.9 else rng.choice(names)
    shape = targets[step["target"]]
    ndim = len(shape)
    pruned.add(step["target"])
    if structured:
        step["dim"] = rng.choice([0, -1, 0, -1, rng.randrange(ndim)])
        step["amount"] = draw_amount(rng, shape[step["dim"]])
        if kind == "ln":
            step["n"] = rng.choice([1, 2, INF, -INF, 0])
        step["other_seeds"] = kind == "random_structured" and rng.random() < 0.3
    elif kind == "nm":
        step["dim"] = -1 if rng.random() < 0.8 else 0
        size = shape[step["dim"]]
        fitting = [m for m in (2, 3, 4) if size % m == 0]
        step["m"] = rng.choice(fitting) if fitting and rng.random() < 0.85 else rng.choice([2, 3, 4])
        step["n"] = rng.randrange(step["m"])
    elif kind == "channelwise":
        step["dim"] = 0 if rng.random() < 0.8 else -1
        step["amount"] = draw_amount(rng, math.prod(shape) // shape[step["dim"]])
    else:  # l1, random_unstructured
        step["amount"] = draw_amount(rng, math.prod(shape))
        step["other_seeds"] = kind == "random_unstructured" and rng.random() < 0.3
    return step


def draw_example(seed, world):
    rng = random.Random(seed)
    groups = draw_groups(rng)
    targets = targets_of(groups)
    layout = draw_layout(rng, world, targets)
    pruned = set()
    steps = [draw_step(rng, targets, pruned) for _ in range(rng.randint(1, 5))]
    return {"seed": seed, "groups": groups, "targets": targets, "layout": layout, "steps": steps}


def describe(step):
    return ", ".join(f"{k}={v}" for k, v in step.items() if k != "seed")


# ----------------------------------------------------------------------------
# Building the two sides
# ----------------------------------------------------------------------------

LAYER_CLASSES = {"Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d}


def build_plain(groups, dtypes=None):
    """The unsharded model of `groups` (layer dtypes from the specs, or from
    `dtypes`: {path: dtype}); its initial values are meaningless."""
    with torch.random.fork_rng(devices=[]):  # default inits must not move the global RNG
        model = nn.Sequential(*(nn.Sequential(*(
            LAYER_CLASSES[layer["kind"]](*layer["args"], bias=layer["bias"]) for layer in group))
            for group in groups))
    for g, group in enumerate(groups):
        for i, layer in enumerate(group):
            path = f"{g}.{i}"
            model.get_submodule(path).to(dtypes[path] if dtypes else DTYPES[layer["dtype"]])
    return model


def distribute(model, mesh, placements):
    """Every parameter of `model` made a DTensor parameter with its placements."""
    from torch.distributed.tensor import distribute_tensor

    for (path, name), where in placements.items():
        module = model.get_submodule(path)
        setattr(module, name, nn.Parameter(distribute_tensor(getattr(module, name).detach(), mesh, list(where))))
    return model


def wrap_fsdp(model, mesh, layout):
    """FSDP2 units: per layer, per group, or a mix; then the root."""
    from torch.distributed.fsdp import fully_shard

    for g, group in enumerate(model):
        per_layer = layout["units"] == "layer" or (layout["units"] == "mixed" and layout["mixed"][g % 8])
        if per_layer:
            for layer in group:
                fully_shard(layer, mesh=mesh)
        elif layout["units"] != "mixed" or g % 2 == 0:  # "mixed": some groups stay in the root's unit
            fully_shard(group, mesh=mesh)
    return fully_shard(model, mesh=mesh)


class Side:
    """One of the two models of an example and how to rebuild it."""

    def __init__(self, example, mesh, model, sharded):
        self.example, self.mesh, self.model = example, mesh, model
        self.layout = example["layout"]["kind"] if sharded else "plain"

    def fresh(self):
        """A new model shaped like the current one (dtypes, placements, FSDP2
        units), not pruned, with meaningless values."""
        dtypes = {path: current(self.model, (path, "weight")).dtype for path, _ in self.example["targets"]}
        model = build_plain(self.example["groups"], dtypes)
        if self.layout == "dtensor":
            placements = {t: tuple(current(self.model, t).placements) for t in self.example["targets"]}
            return distribute(model, self.mesh, placements)
        if self.layout == "fsdp":
            return wrap_fsdp(model, self.mesh, self.example["layout"])
        return model


def current(model, target):
    """The tensor a prune of `target` starts from: ``<name>_orig`` or the parameter."""
    path, name = target
    module = model.get_submodule(path)
    orig = module._parameters.get(name + "_orig")
    return module._parameters[name] if orig is None else orig


def make_sides(example, meshes):
    reference = fill_tie_free(build_plain(example["groups"]), example["seed"])
    layout = example["layout"]
    mesh = meshes[layout["mesh"]]
    sharded = copy.deepcopy(reference)
    if layout["kind"] == "dtensor":
        distribute(sharded, mesh, layout["placements"])
    else:
        wrap_fsdp(sharded, mesh, layout)
    return Side(example, None, reference, False), Side(example, mesh, sharded, True)


def make_meshes(world):
    """1-D mesh over every rank (and (2, 2) on 4 ranks) on process groups
    whose collectives time out: a hang fails instead of stalling."""
    from torch.distributed.device_mesh import DeviceMesh

    ranks = list(range(world))
    everyone = dist.new_group(ranks, timeout=COLLECTIVE_TIMEOUT)
    meshes = {"1d": DeviceMesh.from_group(everyone, "cpu"), "group": everyone}
    if world == 4:
        grid = torch.arange(4).view(2, 2)
        mine = []
        for lines in (grid.t(), grid):  # mesh dim 0: the columns; dim 1: the rows
            for line in lines.tolist():
                group = dist.new_group(line, timeout=COLLECTIVE_TIMEOUT)
                if dist.get_rank() in line:
                    mine.append(group)
        meshes["2d"] = DeviceMesh.from_group(mine, "cpu", mesh=grid, mesh_dim_names=("outer", "inner"))
    return meshes


# ----------------------------------------------------------------------------
# Making a step
# ----------------------------------------------------------------------------

def run_hooks(model):
    """What a forward does first: every pruning hook recomputes its tensor."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, FAST.BasePruningMethod):
                hook(module, ())


def round_trip(side, fresh):
    """Save the state dict; load it into a fresh model prepared with
    ``identity`` on the pruned parameters, or back into the same model after
    zeroing every parameter and buffer."""
    model = side.model
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if fresh:
        new = side.fresh()
        for path, name in side.example["targets"]:
            if hasattr(model.get_submodule(path), name + "_mask"):
                FAST.identity(new.get_submodule(path), name)
        new.load_state_dict(state)
        side.model = model = new
    else:
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                local(t).zero_()
        model.load_state_dict(state)
    run_hooks(model)


def local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def make_step(side, step):
    """Makes `step` on one side (the same fastprune call on both)."""
    model = side.model
    kind = step["kind"]
    if kind in ("global_l1", "global_random"):
        method = FAST.L1Unstructured if kind == "global_l1" else FAST.RandomUnstructured
        pairs = [(model.get_submodule(path), name) for path, name in step["pairs"]]
        return FAST.global_unstructured(pairs, method, amount=step["amount"])
    if kind == "convert":
        return {"float64": lambda: model.to(torch.float64), "float": model.float,
                "cpu": lambda: model.to("cpu")}[step["how"]]()
    if kind == "state_dict":
        return round_trip(side, step["fresh"])
    if kind == "forward":
        return run_hooks(model)
    path, name = step["target"]
    module = model.get_submodule(path)
    if kind == "remove":
        return FAST.remove(module, name)
    if kind == "l1":
        return FAST.l1_unstructured(module, name, step["amount"])
    if kind == "random_unstructured":
        return FAST.random_unstructured(module, name, step["amount"])
    if kind == "ln":
        return FAST.ln_structured(module, name, step["amount"], step["n"], step["dim"])
    if kind == "random_structured":
        return FAST.random_structured(module, name, step["amount"], step["dim"])
    if kind == "nm":
        return FAST.l1_semi_structured(module, name, n=step["n"], m=step["m"], dim=step["dim"])
    if kind == "channelwise":
        return FAST.channelwise_l1_unstructured(module, name, step["amount"], dim=step["dim"])
    raise AssertionError(kind)


def attempt(side, step, seed):
    """(exception class name, message) of the call, or None; and the next
    two numbers of the global RNG after it."""
    torch.manual_seed(seed)
    try:
        make_step(side, step)
        error = None
    except Exception as e:  # noqa: BLE001  (compared with the other side)
        error = (type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
    return error, torch.rand(2)


def segments_local(model, step):
    """Whether the N:M groups / per-channel slices of `step` lie within one
    shard (docs/distributed.md): else the sharded call must raise
    NotImplementedError."""
    from torch.distributed.tensor import DTensor

    t = current(model, step["target"])
    if not isinstance(t, DTensor) or not -t.dim() <= step["dim"] < t.dim():
        return True
    dim = step["dim"] % t.dim()
    sharded = {p.dim % t.dim() for p in t.placements if p.is_shard()}
    return dim not in sharded if step["kind"] == "nm" else sharded <= {dim}


def structured_on_pruned_1d(model, step):
    """Whether `step` is a structured re-prune of a 1-D DTensor: the
    reference prunes a (1, n) view there (a quirk of its boolean indexing),
    which fastprune refuses for DTensors with NotImplementedError."""
    from torch.distributed.tensor import DTensor

    if step["kind"] not in ("ln", "random_structured"):
        return False
    path, name = step["target"]
    module = model.get_submodule(path)
    return isinstance(current(model, step["target"]), DTensor) and current(model, step["target"]).dim() <= 1 \
        and any(getattr(h, "_tensor_name", None) == name for h in module._forward_pre_hooks.values())


# What the method's constructor rejects, before any tensor is looked at.
AMOUNT_CHECKS = ("Invalid type for amount", "should either be a float in the range")


def refused(step, sharded_model):
    """Whether fastprune must refuse `step` on the sharded model."""
    refusal = step["kind"] in ("nm", "channelwise") and not segments_local(sharded_model, step)
    return refusal or structured_on_pruned_1d(sharded_model, step)


def expected_error(step, ref_error, sharded_model):
    """The exception class the sharded call must raise (None: none)."""
    if step["kind"] in ("nm", "channelwise") and not segments_local(sharded_model, step):
        # Argument checks come first; the locality check before the kernel runs.
        if ref_error is None or ref_error[1].startswith("segmented_mask"):
            return "NotImplementedError"
    if structured_on_pruned_1d(sharded_model, step):
        if ref_error is None or not any(c in ref_error[1] for c in AMOUNT_CHECKS):
            return "NotImplementedError"
    return None if ref_error is None else ref_error[0]


# ----------------------------------------------------------------------------
# What the two sides hold
# ----------------------------------------------------------------------------

def structure(model, example):
    """A picklable summary of what the gathering below walks (names, types,
    shapes, dtypes, placements): equal on every rank, or gathering would hang."""
    out = []
    for path, _ in example["targets"]:
        module = model.get_submodule(path)
        tensors = list(module._parameters.items()) + list(module._buffers.items()) + sorted(
            (n, v) for n, v in vars(module).items() if isinstance(v, torch.Tensor))
        out.append((path, [(n, type(t).__name__, tuple(t.shape), str(t.dtype), str(getattr(t, "placements", "")))
                           for n, t in tensors if t is not None]))
    return out


def full(t):
    from torch.distributed.tensor import DTensor

    t = t.full_tensor() if isinstance(t, DTensor) else t
    return t.detach().clone()


def view(model, example):
    """{target: {"mask", "orig", "cached", "param": full tensor}} (the keys
    present) and the pruning hooks of every layer. Collective on a sharded
    model, in the same order on every rank."""
    tensors = {}
    for target in example["targets"]:
        path, name = target
        module = model.get_submodule(path)
        entry = {}
        for key, t in (("mask", module._buffers.get(name + "_mask")),
                       ("orig", module._parameters.get(name + "_orig")),
                       ("param", module._parameters.get(name)),
                       ("cached", module.__dict__.get(name))):
            if t is not None:
                entry[key] = full(t)
        tensors[target] = entry
    hooks = {path: pruning_chain(model.get_submodule(path)) for path, _ in example["targets"]}
    return {"tensors": tensors, "hooks": hooks, "pruned": FAST.is_pruned(model)}


def pruning_chain(module):
    out = []
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, FAST.BasePruningMethod):
            members = tuple(type(m).__name__ for m in getattr(hook, "_pruning_methods", ()))
            out.append((type(hook).__name__, hook._tensor_name, members))
    return out


def effective(entry):
    """What a forward uses: ``orig * mask`` when pruned the reference's way, else the parameter."""
    if "orig" in entry:
        return entry["orig"] * entry["mask"].to(entry["orig"].dtype)
    return entry["param"]


def same_tensor(a, b):
    if a.dtype != b.dtype or a.shape != b.shape:
        return f"{a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
    if not torch.equal(a, b):
        return f"values differ at {torch.nonzero(a != b).tolist()[:6]}:\n{a}\nvs (reference)\n{b}"
    return None


def compare(ref, sh, layout):
    """Differences between the sharded view `sh` and the reference's `ref`."""
    problems = []
    for target, r in ref["tensors"].items():
        s = sh["tensors"][target]
        if layout == "fsdp":  # pruned in place: no orig, no cached tensor
            if set(s) != ({"mask", "param"} if "mask" in r else {"param"}):
                problems.append(f"{target}: FSDP2 holds {sorted(s)}, reference {sorted(r)}")
                continue
            pairs = [("mask", s.get("mask"), r.get("mask")), ("param", s["param"], effective(r))]
        else:
            if set(s) != set(r):
                problems.append(f"{target}: sharded holds {sorted(s)}, reference {sorted(r)}")
                continue
            pairs = [(k, s[k], r[k]) for k in r]
        for key, a, b in pairs:
            if a is None and b is None:
                continue
            diff = same_tensor(a, b)
            if diff:
                problems.append(f"{target} {key}: {diff}")
    return problems + hook_problems(ref, sh)


def hook_problems(ref, sh):
    """Differences in the pruning hooks and is_pruned of two views."""
    problems = []
    if sh["hooks"] != ref["hooks"]:
        problems.append(f"pruning hooks {sh['hooks']} vs reference {ref['hooks']}")
    if sh["pruned"] != ref["pruned"]:
        problems.append(f"is_pruned {sh['pruned']} vs reference {ref['pruned']}")
    return problems


def placement_problems(model, example):
    """Masks must be DTensors with their parameter's mesh and placements (local check)."""
    from torch.distributed.tensor import DTensor

    problems = []
    for path, name in example["targets"]:
        module = model.get_submodule(path)
        mask = module._buffers.get(name + "_mask")
        param = current(model, (path, name))
        if not isinstance(param, DTensor):
            problems.append(f"{(path, name)}: the parameter is a {type(param).__name__}")
        elif mask is not None and (not isinstance(mask, DTensor) or mask.placements != param.placements
                                   or mask.device_mesh != param.device_mesh):
            problems.append(f"{(path, name)}: mask {type(mask).__name__} {getattr(mask, 'placements', '')} "
                            f"for a parameter with {param.placements}")
    return problems


def digest(v):
    """A hash of a view's tensors, to compare across ranks."""
    h = hashlib.sha256()
    for target in sorted(v["tensors"]):
        for key, t in sorted(v["tensors"][target].items()):
            h.update(f"{target}{key}{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.to(torch.float64).numpy().tobytes())  # exact for every dtype here
    return h.hexdigest()


# ----------------------------------------------------------------------------
# Random unstructured: invariants, then the reference takes the sharded masks
# ----------------------------------------------------------------------------

def random_problems(step, before, after):
    """Exactly k of the live entries pruned, nothing else changed."""
    pairs = step["pairs"] if "pairs" in step else [step["target"]]
    live_total, pruned_total, problems = 0, 0, []
    for target in pairs:
        old = before["tensors"][target].get("mask")
        new = after["tensors"][target]["mask"]
        live = torch.ones(new.shape, dtype=torch.bool) if old is None else old == 1
        if old is not None and not torch.equal(new[~live], old[~live]):
            problems.append(f"{target}: entries that were not live changed")
        if not bool(((new[live] == 0) | (new[live] == 1)).all()):
            problems.append(f"{target}: mask values other than 0 and 1")
        live_total += int(live.sum())
        pruned_total += int((new[live] == 0).sum())
    amount = step["amount"]
    k = amount if isinstance(amount, int) else round(amount * live_total)
    if pruned_total != k:
        problems.append(f"pruned {pruned_total} of {live_total} live entries, expected {k}")
    return problems


def adopt_masks(reference, step, after):
    """The reference takes the sharded side's masks of `step`'s targets."""
    for path, name in step["pairs"] if "pairs" in step else [step["target"]]:
        module = reference.get_submodule(path)
        with torch.no_grad():
            module.get_buffer(name + "_mask").copy_(after["tensors"][(path, name)]["mask"])
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, FAST.BasePruningMethod) and hook._tensor_name == name:
                hook(module, ())


# ----------------------------------------------------------------------------
# One example, in lockstep over the ranks
# ----------------------------------------------------------------------------

def gather(obj, group):
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def make_both(ref, sh, step, rank):
    """Makes `step` on the reference, then on the sharded model, the global
    RNG seeded alike before each; returns (the reference's error, the sharded
    error, problems found so far)."""
    refusal = refused(step, sh.model)
    saved = copy.deepcopy(ref.model) if refusal else None
    ref_error, ref_draws = attempt(ref, step, step["seed"])
    other = step.get("other_seeds") and rank > 0  # rank 0's generator must decide alone
    sh_error, sh_draws = attempt(sh, step, step["seed"] + 7919 * rank if other else step["seed"])
    expected = expected_error(step, ref_error, sh.model)
    if refusal and ref_error is None:  # the sharded call must refuse: the reference is put back
        ref.model = saved
    if step["kind"] == "convert" and sh.layout == "fsdp":
        # FSDP2 keeps no cached pruned tensor that could go stale: the
        # reference's must not either, or its next prune ranks that cached
        # tensor in the old dtype and its mask takes that dtype.
        run_hooks(ref.model)
    problems = []
    if (sh_error and sh_error[0]) != expected:
        problems.append(f"sharded call raised {sh_error}, expected {expected} (reference: {ref_error})")
    random = step["kind"] in ("random_unstructured", "global_random")
    if not random and not other and not refusal and not torch.equal(ref_draws, sh_draws):
        problems.append("the sharded call drew a different amount of random numbers")
    return ref_error, sh_error, problems


def check_step(ref, sh, step, before, rank, group):
    """Makes `step` (None: the build) on both sides and checks it; returns the
    sharded view after it and every rank's problems (all empty: passed)."""
    ref_error = sh_error = None
    problems = []
    if step is not None:
        ref_error, sh_error, problems = make_both(ref, sh, step, rank)
    shapes = gather((sh_error and sh_error[0], structure(sh.model, sh.example)), group)
    if any(s != shapes[0] for s in shapes):  # gathering would hang or mismatch
        return None, [problems + [f"the ranks differ after the call (error, layout): {shapes}"]]
    after = view(sh.model, sh.example)  # collectives
    problems += placement_problems(sh.model, sh.example)
    if sh_error is not None and before is not None:
        diff = compare(before, after, "dtensor")
        if diff:
            problems.append(f"the failed call changed the model: {diff}")
    if step is not None and step["kind"] in ("random_unstructured", "global_random") and not (
            sh_error or ref_error):
        problems += random_problems(step, before, after)
        adopt_masks(ref.model, step, after)
    problems += compare(view(ref.model, ref.example), after, sh.layout)
    outcomes = gather((problems, digest(after)), group)
    if len({d for _, d in outcomes}) > 1:
        outcomes = [(p + ["the ranks gathered different full tensors"], d) for p, d in outcomes]
    return after, [p for p, _ in outcomes]


def run_example(seed, world, rank, meshes, stats, note):
    """Every step of one example; returns None or a failure report."""
    example = draw_example(seed, world)
    ref, sh = make_sides(example, meshes)
    count_layout(sh, stats)
    before = None
    for i, step in enumerate([None] + example["steps"]):
        stats["step " + (step["kind"] if step else "build")] += 1
        note(f"world {world}, seed {seed}, step {i}")
        try:
            before, problems = check_step(ref, sh, step, before, rank, meshes["group"])
        except Exception as e:
            raise RuntimeError(f"world {world}, seed {seed}, step {i}: {e!r}") from e
        if any(problems):
            what = "the build" if step is None else f"step {i} ({describe(step)})"
            by_text = collections.defaultdict(list)  # ranks with the same problems reported once
            for r, p in enumerate(problems):
                if p:
                    by_text["\n    ".join(p)].append(r)
            report = "\n".join(f"  ranks {ranks}: {text}" for text, ranks in by_text.items())
            return (f"world {world}, seed {seed}, {what}; layout {layout_summary(example)}; "
                    f"steps {[describe(s) for s in example['steps']]}:\n{report}")
    return None


def layout_summary(example):
    layout = example["layout"]
    shapes = {t: s for t, s in example["targets"].items()}
    dtypes = [layer["dtype"] for group in example["groups"] for layer in group]
    if layout["kind"] == "fsdp":
        return f"FSDP2 {layout['mesh']} units per {layout['units']}, shapes {shapes}, dtypes {dtypes}"
    return f"DTensor {layout['mesh']} {layout['placements']}, shapes {shapes}, dtypes {dtypes}"


def count_layout(sh, stats):
    """Coverage counters: layouts, empty and uneven local shards."""
    stats["layout " + sh.layout] += 1
    stats["mesh " + sh.example["layout"]["mesh"]] += 1
    for target in sh.example["targets"]:
        t = current(sh.model, target)
        if t.to_local().numel() == 0:
            stats["empty local shard"] += 1
        for d, p in enumerate(t.placements):
            if p.is_shard() and t.shape[p.dim] % t.device_mesh.size(d):
                stats["uneven shard"] += 1


def fuzz_ranks(rank, world, seeds, progress_dir):
    """Runs on every rank: every example, in lockstep; the failures and
    coverage counters. Each step started is noted in a file of
    `progress_dir`, to name the step a hang stopped at."""
    import fastprune.distributed  # noqa: F401  (DTensor/FSDP2 support)

    # DTensor's advice to flatten 2-D meshes, once per full_tensor(): noise here.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)

    def note(text):
        with open(os.path.join(progress_dir, f"rank{rank}"), "w") as f:
            f.write(text)

    meshes = make_meshes(world)
    failures, stats = [], collections.Counter()
    for seed in seeds:
        failure = run_example(seed, world, rank, meshes, stats, note)
        if failure:
            failures.append(failure)
    return {"failures": failures, "stats": dict(stats)}


@pytest.mark.parametrize("world", WORLDS)
def test_sharded_pruning_matches_single_process(world, tmp_path):
    seeds = seeds_for(world)
    if EXAMPLES or SEEDS:
        print(f"world {world}: seeds {seeds}")
    try:
        results = run_ranks(world, fuzz_ranks, seeds, str(tmp_path), timeout=120 + 0.5 * world * len(seeds))
    except AssertionError as e:
        started = [f.read_text() for f in sorted(tmp_path.glob("rank*"))]
        raise AssertionError(f"{e}\nlast step started on each rank: {started}") from None
    stats = collections.Counter(results[0]["stats"])
    stats["empty local shard"] = sum(r["stats"].get("empty local shard", 0) for r in results)  # over ranks
    print(f"world {world}: {len(seeds)} examples; {dict(sorted(stats.items()))}")
    failures = results[0]["failures"]
    assert not failures, f"{len(failures)} of {len(seeds)} examples failed:\n\n" + "\n\n".join(failures)
    if not SEEDS and len(seeds) >= 200:  # coverage: every step kind, both layouts, both shard oddities
        wanted = ["step " + k for k in STEP_WEIGHTS] + ["layout dtensor", "layout fsdp", "empty local shard",
                                                          "uneven shard"]
        assert all(stats[w] for w in wanted), {w: stats[w] for w in wanted}
