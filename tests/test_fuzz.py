"""Differential fuzzing of fastprune.prune against torch.nn.utils.prune (issue #6).

Hypothesis builds a small model (Linear, Conv1d/2d/3d, Embedding, LSTM, nested
Sequential; float32, float64, float16 or bfloat16 per layer), deep-copies it,
and runs one random sequence of calls on both copies: every pruning function
(or ``Cls.apply``) on one parameter, ``global_unstructured`` over a subset of
the parameters, ``remove``, and, in between, an in-place change of a parameter
without a forward (stale default scores) or the forward pre-hooks of a forward
pass. The reference prunes one copy and fastprune the other, with the global
RNG seeded identically before each call. Amounts, dims, norms, importance
scores and custom masks are mostly valid and now and then not, so the error
paths are fuzzed too. After every call both libraries must have raised the
same exception class and message, or both returned what they return, drawn as
many random numbers, and left the two copies in the same observable state
(``assert_same_pruned_state``). A failed call must leave fastprune's copy
exactly as it was (docs/behaviour.md §Errors).

Ties. Parameters and importance scores are tie-free, also across parameters
(global pruning). Ties still arise, e.g. among the zeros that ``remove``
leaves, between L0 norms, or between half-precision random draws; where the
reference's choice is then left to ``torch.topk`` (equal keys at the cut),
fastprune's mask may differ from the reference's only among the tied units and
must prune as many of them (docs/behaviour.md §Ties); the reference copy then takes
fastprune's choice, one the reference could have made, and the example goes on
with exact comparisons. Every unambiguous call is compared exactly.

Reference bugs that fastprune fixes (tested in test_fixed_bugs.py) are kept
out: every tensor is contiguous, ``global_unstructured`` gets a list or tuple
and no importance scores of the wrong shape, and pruned models are never
deep-copied. When a failed call changed the reference's copy (a failed
re-prune drops the hook; a failed first prune moves the parameter to the end),
the example stops there.

CI runs 500 derandomized examples. Long mode, with fresh random examples:

    FASTPRUNE_FUZZ_EXAMPLES=10000 python -m pytest -x -q tests/test_fuzz.py
"""
import copy
import functools
import math
import os

import numpy as np
import torch
import torch.nn as nn
from hypothesis import Phase, event, given, settings
from hypothesis import strategies as st

from conftest import (
    _EXACT_INTS, FLOAT_DTYPES, LIBS, REF, assert_same_pruned_state, assert_same_snapshot, normalize_message,
    snapshot, tie_free,
)

INF = float("inf")
EXAMPLES = int(os.environ.get("FASTPRUNE_FUZZ_EXAMPLES", "0"))


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------

# Layer class and size strategies for its positional arguments (sizes small
# enough for each example to be fast and for half precision to stay tie-free).
LAYERS = {
    "Linear": (nn.Linear, [st.integers(1, 4), st.integers(1, 4)]),
    "Conv1d": (nn.Conv1d, [st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)]),
    "Conv2d": (nn.Conv2d, [st.integers(1, 3), st.integers(1, 3), st.integers(1, 2)]),
    "Conv3d": (nn.Conv3d, [st.integers(1, 2), st.integers(1, 3), st.integers(1, 2)]),
    "Embedding": (nn.Embedding, [st.integers(2, 5), st.integers(1, 4)]),
    "LSTM": (nn.LSTM, [st.integers(1, 3), st.integers(1, 2)]),
}

layer_specs = st.sampled_from(sorted(LAYERS)).flatmap(
    lambda name: st.tuples(st.just(name), st.tuples(*LAYERS[name][1]), st.booleans()))
model_specs = st.one_of(layer_specs, st.lists(
    st.one_of(layer_specs, st.lists(layer_specs, min_size=1, max_size=2).map(lambda c: ("Sequential", c))),
    min_size=1, max_size=3).map(lambda c: ("Sequential", c)))


def build(spec):
    """The float32 model a spec describes: (layer, sizes, bias) or ("Sequential", [specs])."""
    if spec[0] == "Sequential":
        return nn.Sequential(*map(build, spec[1]))
    name, sizes, bias = spec
    cls = LAYERS[name][0]
    return cls(*sizes) if cls is nn.Embedding else cls(*sizes, bias=bias)


def fill(model, targets, seed):
    """Writes tie-free values into the parameters (as conftest.fill_tie_free)
    and returns, per target, as many further values of the same ladder as
    importance scores: distinct from each other and from every parameter
    value, so global pruning mixing scores and parameters has no ties."""
    tensors = [model.get_submodule(path).get_parameter(name) for path, name in targets]
    sizes = [t.numel() for t in tensors]
    values = tie_free((2 * sum(sizes),), torch.float64, seed).split(sizes * 2)
    with torch.no_grad():
        for t, v in zip(tensors, values):
            t.copy_(v.view(t.shape))
    return {target: v.view(t.shape) for target, t, v in zip(targets, tensors, values[len(sizes):])}


# ----------------------------------------------------------------------------
# Calls
# ----------------------------------------------------------------------------

def mostly(common, rare, one_in=8):
    """`common`, and `rare` about once in `one_in` draws (shrinking towards `common`)."""
    return st.integers(1, one_in).flatmap(lambda i: rare if i == one_in else common)


def amounts(units):
    """Amounts for a tensor of `units` entries or channels: fractions and counts
    (fewer units may be left unpruned, so counts can still be too large), and
    now and then invalid ones and the odd ones the reference accepts."""
    valid = st.one_of(st.floats(0, 1), st.sampled_from([0.5, 0.25, 1.0]), st.integers(0, units))
    odd = st.sampled_from([units + 1, -1, -0.25, 1.5, "0.5", True, np.float64(0.4), np.int64(1)])
    return mostly(valid, odd)


NORMS = [1, 2, INF, -INF, 0, 3, 0.5, "fro"]  # 'fro' fails on tensors of 3 or more dims
SCORE_DTYPES = ["param", "float32", "float64"]  # "param": the parameter's dtype
MASK_LEVELS = {"bool": [False, True], "int64": [0, 1, 2], "param": [0, 0.5, 1], "float64": [0.0, 1.0],
               "wrong shape": [0, 1]}
CLASSES = {"identity": "Identity", "random_unstructured": "RandomUnstructured",
           "l1_unstructured": "L1Unstructured", "random_structured": "RandomStructured",
           "ln_structured": "LnStructured", "custom_from_mask": "CustomFromMask"}
KINDS = list(CLASSES) + ["global_unstructured", "remove", "touch", "forward"]


@st.composite
def calls(draw, shapes):
    """One call on a model whose parameters (path, name) have `shapes`."""
    kind = draw(st.sampled_from(KINDS))
    targets = list(shapes)
    if kind == "forward":
        return {"kind": kind}
    if kind == "global_unstructured":
        pairs = draw(st.lists(st.sampled_from(targets), min_size=1, unique=True))
        scored = draw(st.lists(st.sampled_from(pairs), unique=True))
        return {"kind": kind, "pairs": pairs,
                "method": draw(mostly(st.sampled_from(["L1Unstructured", "RandomUnstructured"]),
                                      st.just("RandomStructured"))),
                "amount": draw(amounts(sum(math.prod(shapes[t]) for t in pairs))),
                "scores": {t: draw(st.sampled_from(SCORE_DTYPES)) for t in scored}}
    structured = kind in ("random_structured", "ln_structured")
    multi_dim = [t for t in targets if len(shapes[t]) > 1]
    pick = mostly(st.sampled_from(multi_dim), st.sampled_from(targets)) if structured and multi_dim else \
        st.sampled_from(targets)
    call = {"kind": kind, "target": draw(pick)}
    shape = shapes[call["target"]]
    if kind in ("remove", "touch"):
        return call
    call["via"] = draw(st.sampled_from(["function", "apply"]))
    units = math.prod(shape)
    if structured:
        ndim = len(shape)
        call["dim"] = draw(mostly(st.integers(-ndim, ndim - 1), st.sampled_from([ndim, -ndim - 1])))
        units = shape[call["dim"]] if -ndim <= call["dim"] < ndim else max(shape)
    if kind not in ("identity", "custom_from_mask"):
        call["amount"] = draw(amounts(units))
    if kind == "ln_structured":
        call["n"] = draw(mostly(st.sampled_from(NORMS), st.just("nuc")))
    if kind in ("l1_unstructured", "ln_structured"):
        call["scores"] = draw(st.one_of(st.none(), mostly(st.sampled_from(SCORE_DTYPES), st.just("wrong shape"))))
    if kind == "custom_from_mask":
        levels = mostly(st.sampled_from(["bool", "int64", "param", "float64"]), st.just("wrong shape"))
        call["mask"] = draw(st.tuples(levels, st.integers(0, 2 ** 16)))
    return call


def current(model, target):
    """``module.<name>``: the parameter, or the cached pruned tensor."""
    path, name = target
    return getattr(model.get_submodule(path), name)


def importance(model, pool, target, spec):
    """Importance scores for `target` from the pool, as `spec` says."""
    dtype = current(model, target).dtype if spec in ("param", "wrong shape") else getattr(torch, spec)
    scores = pool[target].to(dtype, copy=True)
    return scores.unsqueeze(0) if spec == "wrong shape" else scores


def custom_mask(model, target, spec):
    """A mask of random levels: bool, int64 with 2s, halves in the parameter's
    dtype, float64, or one of the wrong shape."""
    levels, seed = spec
    param = current(model, target)
    shape = (*param.shape, 1) if levels == "wrong shape" else param.shape
    values = torch.tensor(MASK_LEVELS[levels])
    if levels == "param":
        values = values.to(param.dtype)
    return values[torch.randint(len(values), shape, generator=torch.Generator().manual_seed(seed))]


def pruning_hook(module, name):
    """The pruning hook of `module.<name>`."""
    return next(h for h in module._forward_pre_hooks.values()
                if isinstance(h, REF.BasePruningMethod) and h._tensor_name == name)


def run(P, model, call, pool):
    """Makes `call` with library P on `model`; returns what it returns."""
    kind = call["kind"]
    if kind == "forward":  # what a forward pass does first
        for module in model.modules():
            for hook in list(module._forward_pre_hooks.values()):
                hook(module, ())
        return None
    if kind == "global_unstructured":
        scores = {(model.get_submodule(t[0]), t[1]): importance(model, pool, t, spec)
                  for t, spec in call["scores"].items()}
        pairs = [(model.get_submodule(path), name) for path, name in call["pairs"]]
        return P.global_unstructured(pairs, getattr(P, call["method"]), importance_scores=scores or None,
                                     amount=call["amount"])
    path, name = call["target"]
    module = model.get_submodule(path)
    if kind == "remove":
        return P.remove(module, name)
    if kind == "touch":  # an optimizer-like step, no forward: module.<name> goes stale
        p = getattr(module, name + "_orig", None)
        p = getattr(module, name) if p is None else p
        with torch.no_grad():
            p.copy_(p.flatten()[torch.randperm(p.numel(), generator=torch.Generator().manual_seed(1))].view(p.shape))
        return None
    args = [call[a] for a in ("amount", "n", "dim") if a in call]
    if kind == "custom_from_mask":
        args.append(custom_mask(model, call["target"], call["mask"]))
    kwargs = {}
    if call.get("scores") is not None:
        kwargs["importance_scores"] = importance(model, pool, call["target"], call["scores"])
    if call["via"] == "apply":
        return getattr(P, CLASSES[kind]).apply(module, name, *args, **kwargs)
    return getattr(P, kind)(module, name, *args, **kwargs)


def expected_return(model, call):
    """The functional helpers and remove return the module, Cls.apply the hook."""
    if "target" not in call or call["kind"] == "touch":
        return None
    path, name = call["target"]
    module = model.get_submodule(path)
    return pruning_hook(module, name) if call.get("via") == "apply" else module


# ----------------------------------------------------------------------------
# Ties at the reference's cut
# ----------------------------------------------------------------------------

def ranked_inputs(model, call, pool):
    """(targets, scores, masks) that the reference ranks in `call`, or None for
    calls that leave nothing to topk. Taken before the call: pruning replaces
    these tensors on the module and never writes into them."""
    if call["kind"] == "global_unstructured":
        targets, specs = call["pairs"], call["scores"]
    elif call["kind"] in ("l1_unstructured", "random_unstructured", "ln_structured"):
        targets, specs = [call["target"]], {call["target"]: call.get("scores")}
    else:
        return None
    scores = [current(model, t) if specs.get(t) is None else importance(model, pool, t, specs[t]) for t in targets]
    masks = [getattr(model.get_submodule(path), name + "_mask", None) for path, name in targets]
    return targets, scores, masks


def cut_ties(keys, k, largest):
    """Which keys equal the key at the cut, when the reference prunes the k
    smallest (largest) and the k-th and (k+1)-th are equal; else None."""
    k = int(k)
    if not 0 < k < keys.numel():
        return None
    ordered = keys.sort(descending=largest).values
    return keys == ordered[k - 1] if ordered[k - 1] == ordered[k] else None


def unstructured_ties(scores, masks, amount, random, seed):
    """Tied units of L1 (smallest |score|) or random (largest of torch.rand over
    the candidates, in the scores' promoted dtype) unstructured pruning:
    candidates are all entries of an unpruned tensor and the entries still at
    1 of a pruned one, numbered across the tensors; one id tensor per tensor
    (-1: not tied), or None."""
    dtype = functools.reduce(torch.promote_types, [s.dtype for s in scores])
    flat = torch.cat([s.detach().reshape(-1).to(dtype) for s in scores])
    candidate = torch.cat([torch.ones(s.numel(), dtype=torch.bool) if m is None else m.reshape(-1) == 1
                           for s, m in zip(scores, masks)])
    n = int(candidate.sum())
    if random:
        keys = torch.rand(n, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    else:
        keys = flat[candidate].abs()
    tied = cut_ties(keys, REF._compute_nparams_toprune(amount, n), largest=random)
    if tied is None:
        return None
    where = torch.zeros_like(candidate)
    where[candidate] = tied
    ids = torch.where(where, torch.arange(where.numel()), -1)
    return [i.view(s.shape) for i, s in zip(ids.split([s.numel() for s in scores]), scores)]


def ln_ties(scores, mask, amount, n, dim):
    """Tied channels of LnStructured: the reference ranks the norms of the
    channels not yet all zero (on a first prune: all), gathered as it gathers
    them (a pruned 1-D tensor becomes a (1, n) view); channel ids over the
    channels' entries (-1 elsewhere), or None."""
    region = (slice(None),) * scores.dim()
    if mask is not None:
        d = dim % scores.dim()
        region = region[:d] + (mask.sum(dim=[i for i in range(scores.dim()) if i != d]) != 0,)
    ranked = scores[region]
    norms = REF._compute_norm(ranked, n, dim)
    tied = cut_ties(norms, REF._compute_nparams_toprune(amount, norms.numel()), largest=False)
    if tied is None:
        return None
    shape = [1] * ranked.dim()
    shape[dim] = -1
    ids = torch.full(scores.shape, -1)
    ids[region] = torch.where(tied, torch.arange(tied.numel()), -1).view(shape).expand(ranked.shape)
    return [ids]


def tied_units(call, ranked, seed):
    """Ids of the units tied at the reference's cut in `call` (one tensor per
    ranked target), or None when its choice is unambiguous."""
    _, scores, masks = ranked
    if call["kind"] == "ln_structured":
        return ln_ties(scores[0], masks[0], call["amount"], call["n"], call["dim"])
    random = "RandomUnstructured" in (CLASSES.get(call["kind"]), call.get("method"))
    return unstructured_ties(scores, masks, call["amount"], random, seed)


def settle_ties(mods, targets, units):
    """fastprune's masks differ from the reference's only at tied units and
    prune as many of them; the reference copy then takes fastprune's masks
    (and refreshes its cached tensors), so the example goes on."""
    pruned = {key: set() for key in mods}
    for (path, name), ids in zip(targets, units):
        masks = {key: m.get_submodule(path).get_buffer(name + "_mask") for key, m in mods.items()}
        assert masks["fast"].dtype == masks["ref"].dtype and masks["fast"].shape == masks["ref"].shape
        assert torch.equal(masks["fast"][ids < 0], masks["ref"][ids < 0]), f"{path}.{name}: masks differ off the ties"
        if not torch.equal(masks["fast"], masks["ref"]):
            event("ties at the cut broken differently")
        for key, mask in masks.items():
            pruned[key] |= set(ids[ids >= 0].tolist()) - set(ids[(ids >= 0) & (mask != 0)].tolist())
        module = mods["ref"].get_submodule(path)
        with torch.no_grad():
            masks["ref"].copy_(masks["fast"])
        pruning_hook(module, name)(module, ())
    assert len(pruned["fast"]) == len(pruned["ref"]), "a different number of tied units pruned"


# ----------------------------------------------------------------------------
# The fuzzer
# ----------------------------------------------------------------------------

def reference_changed(before, module):
    """Whether a failed reference call changed its module (docs/behaviour.md
    §Errors: the reference loses the hook of a failed re-prune)."""
    try:
        assert_same_snapshot(before, snapshot(module))
    except AssertionError:
        return True
    return False


def step(mods, call, pool, seed):
    """Makes `call` on both copies and compares; returns False when the example
    has to stop because the reference's copy changed on a failed call."""
    ranked = ranked_inputs(mods["ref"], call, pool)
    before, returned, error, draws = {}, {}, {}, {}
    for key, P in LIBS.items():
        before[key] = snapshot(mods[key])
        torch.manual_seed(seed)
        try:
            returned[key], error[key] = run(P, mods[key], call, pool), None
        except Exception as e:  # noqa: BLE001  (compared across the libraries below)
            error[key] = (type(e), normalize_message(e))
        draws[key] = torch.rand(2)
    assert error["fast"] == error["ref"]
    assert torch.equal(draws["fast"], draws["ref"]), "fastprune drew a different amount of random numbers"
    if error["ref"] is not None:
        event(f"error: {error['ref'][0].__name__}")
        assert_same_snapshot(before["fast"], snapshot(mods["fast"]))
        if reference_changed(before["ref"], mods["ref"]):
            event("stopped: the reference changed its module on a failed call")
            return False
    else:
        for key, model in mods.items():
            assert returned[key] is expected_return(model, call)
        units = None if ranked is None else tied_units(call, ranked, seed)
        if units is not None:
            event("ties at the cut")
            settle_ties(mods, ranked[0], units)
    assert_same_pruned_state(mods["ref"], mods["fast"])
    return True


@settings(max_examples=EXAMPLES or 500, derandomize=not EXAMPLES, database=None, deadline=None, print_blob=True,
          phases=[Phase.explicit, Phase.generate, Phase.shrink])
@given(data=st.data())
def test_fastprune_matches_reference(data):
    """A random model, and a random sequence of calls made on its two copies."""
    model = build(data.draw(model_specs, label="model"))
    total = sum(p.numel() for p in model.parameters())
    dtypes = [d for d in FLOAT_DTYPES if 2 * total <= _EXACT_INTS[d]]  # pool included: tie-free in the dtype
    for layer in model.modules():
        if layer._parameters:
            layer.to(data.draw(st.sampled_from(dtypes), label=f"dtype of {type(layer).__name__}"))
    targets = [(path, name) for path, m in model.named_modules() for name, p in m._parameters.items()
               if p is not None]
    pool = fill(model, targets, seed=data.draw(st.integers(0, 2 ** 16), label="values seed"))
    mods = {"ref": model, "fast": copy.deepcopy(model)}
    shapes = {t: tuple(pool[t].shape) for t in targets}
    for seed in range(data.draw(st.integers(1, 10), label="calls")):
        if not step(mods, data.draw(calls(shapes), label=f"call {seed}"), pool, seed):
            break
