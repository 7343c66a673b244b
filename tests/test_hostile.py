"""Hostile input (issue #6): amounts, dims, parameters, importance scores and
masks of wrong types, degenerate shapes, odd values, layouts and devices.

Each case runs on a fresh module per library (after the same setup, with the
same seed). fastprune must end in the reference's state or raise the
reference's exception (class and message); the few tests that expect
otherwise say why in their docstrings (bugs fixed here, docs/behaviour.md
§Differences; scores on which the reference silently prunes wrong or
nothing, where fastprune raises). A fastprune call must never warn, and
when it raises it must leave the module exactly as it was.
"""
import fractions
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import (
    FAST, LIBS, REF, assert_mask_equal, assert_same_pruned_state, assert_same_snapshot, channel_separated,
    example_input, hook_summary, normalize_message, snapshot, tie_free,
)

NAN, INF = float("nan"), float("inf")


# ----------------------------------------------------------------------------
# Runner
# ----------------------------------------------------------------------------

def run_fast(call, m):
    """Runs `call(FAST, m)`; returns the exception it raised, or None. Fails
    on any warning and, if it raised, on any change to `m`."""
    before = snapshot(m)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call(FAST, m)
            error = None
        except Exception as e:  # noqa: BLE001  (compared with the reference's)
            error = e
    assert not caught, [str(w.message) for w in caught]
    if error is not None:
        assert_same_snapshot(before, snapshot(m))
    return error


def run_ref(call, m):
    try:
        call(REF, m)
    except Exception as e:  # noqa: BLE001
        return e
    return None


def outcomes(make, call, setup=None, seed=0):
    """{lib: (module, exception or None)} for `call` on a fresh `make()` per library."""
    out = {}
    for key, P in LIBS.items():
        m = make()
        if setup is not None:
            setup(P, m)
        torch.manual_seed(seed)
        out[key] = (m, run_ref(call, m) if key == "ref" else run_fast(call, m))
    return out


def same_error(e_fast, e_ref):
    assert e_fast is not None, f"the reference raised {e_ref!r}, fastprune did not"
    assert (type(e_fast), normalize_message(e_fast)) == (type(e_ref), normalize_message(e_ref))


def assert_like_reference(make, call, setup=None, seed=0):
    """The same outcome in both libraries; returns the reference's exception."""
    out = outcomes(make, call, setup, seed)
    (m_ref, e_ref), (m_fast, e_fast) = out["ref"], out["fast"]
    if e_ref is None:
        assert e_fast is None, f"fastprune raised {e_fast!r}"
        assert_same_pruned_state(m_ref, m_fast)
    else:
        same_error(e_fast, e_ref)
    return e_ref


# ----------------------------------------------------------------------------
# Modules: no magnitude is shared between any two entries, channel norms
# strictly ordered (weights are multiples of 1/128, biases odd multiples of 1/256)
# ----------------------------------------------------------------------------

def linear():
    m = nn.Linear(6, 5)
    with torch.no_grad():
        m.weight.copy_(channel_separated((5, 6), 0))
        m.bias.copy_(torch.tensor([1., -3., 5., -7., 9.]) / 256)
    return m


def conv(dim=0):
    m = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        m.weight.copy_(channel_separated((4, 3, 3, 3), dim))
        m.bias.copy_(torch.tensor([1., -3., 5., -7.]) / 256)
    return m


def pruned_once(P, m):
    """The second-prune setup: containers on both tensors afterwards."""
    P.l1_unstructured(m, "weight", 3)
    P.l1_unstructured(m, "bias", 1)


STAGES = {"first": None, "second": pruned_once}


# ----------------------------------------------------------------------------
# Amounts
# ----------------------------------------------------------------------------

AMOUNT_CALLS = {
    "l1": lambda a: lambda P, m: P.l1_unstructured(m, "weight", a),
    "random": lambda a: lambda P, m: P.random_unstructured(m, "weight", a),
    "random_structured": lambda a: lambda P, m: P.random_structured(m, "weight", a, 0),
    "ln": lambda a: lambda P, m: P.ln_structured(m, "weight", a, 2, 0),
    "global_l1": lambda a: lambda P, m: P.global_unstructured([(m, "weight"), (m, "bias")], P.L1Unstructured,
                                                              amount=a),
    "global_random": lambda a: lambda P, m: P.global_unstructured([(m, "weight"), (m, "bias")],
                                                                  P.RandomUnstructured, amount=a),
}

AMOUNTS = [
    1 + 0j, 0.5j, NAN, INF, -INF, -0.0, 1e-300, 1 - 1e-16, False, True, 5, 6, 27, 30, 31, 35, 36, 10 ** 30, 2 ** 63,
    np.float32(0.5), np.float32(0.3), np.float32(1.0000001), np.float16(0.5), np.float64(0.25), np.int64(3),
    np.int8(2), np.uint8(200), np.bool_(True), np.bool_(False), torch.tensor(3), torch.tensor(0.5),
    fractions.Fraction(1, 3),
]


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("amount", AMOUNTS, ids=repr)
@pytest.mark.parametrize("method", list(AMOUNT_CALLS))
def test_amount(method, amount, stage):
    """Wrong types, NaN, infinities, bools, numpy and 0-dim tensor scalars,
    counts at and above the number of candidates (30 weights, 5 channels, 35
    entries together; fewer left on a second prune)."""
    assert_like_reference(linear, AMOUNT_CALLS[method](amount), STAGES[stage])


# ----------------------------------------------------------------------------
# Dims of the structured methods
# ----------------------------------------------------------------------------

DIMS = [2, 3, 100, 2 ** 70, -3, -4, -100, 1.0, -1.0, None, "0", True, False, np.int64(1), torch.tensor(1)]


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("dim", DIMS, ids=repr)
@pytest.mark.parametrize("method", ["ln", "random_structured"])
def test_dim(method, dim, stage):
    def call(P, m):
        if method == "ln":
            P.ln_structured(m, "weight", 1, 2, dim)
        else:
            P.random_structured(m, "weight", 1, dim)
    assert_like_reference(linear, call, STAGES[stage])


# ----------------------------------------------------------------------------
# 0-dim, empty and one-element parameters
# ----------------------------------------------------------------------------

def with_weight(values):
    """A module with `weight` (the tensor under test) and a 4-entry `other`."""
    def make():
        m = nn.Module()
        m.weight = nn.Parameter(values.clone())
        m.other = nn.Parameter(torch.tensor([1., -3., 5., -7.]) / 256)
        return m
    return make


def empty_linear(i, o):
    def make():
        with warnings.catch_warnings():  # "Initializing zero-element tensors is a no-op"
            warnings.simplefilter("ignore")
            return nn.Linear(i, o)
    return make


DEGENERATE = {
    "0-dim": with_weight(torch.tensor(-0.75)),
    "Linear(0,3)": empty_linear(0, 3),
    "Linear(3,0)": empty_linear(3, 0),
    "(0,)": with_weight(torch.empty(0)),
    "(2,0,3)": with_weight(torch.empty(2, 0, 3)),
    "(1,)": with_weight(torch.tensor([0.5])),
    "(1,1)": with_weight(torch.tensor([[0.5]])),
    "(1,1,1,1)": with_weight(torch.full((1, 1, 1, 1), -2.0)),
}


def _other(m):
    return "bias" if hasattr(m, "bias") else "other"


DEGENERATE_CALLS = {
    "identity": lambda P, m: P.identity(m, "weight"),
    "l1_0.5": lambda P, m: P.l1_unstructured(m, "weight", 0.5),
    "l1_1.0": lambda P, m: P.l1_unstructured(m, "weight", 1.0),
    "l1_0": lambda P, m: P.l1_unstructured(m, "weight", 0),
    "l1_1": lambda P, m: P.l1_unstructured(m, "weight", 1),
    "random_1": lambda P, m: P.random_unstructured(m, "weight", 1),
    "random_1.0": lambda P, m: P.random_unstructured(m, "weight", 1.0),
    "random_structured_1_dim0": lambda P, m: P.random_structured(m, "weight", 1, 0),
    "random_structured_0.5_dim-1": lambda P, m: P.random_structured(m, "weight", 0.5, -1),
    "ln_1_dim0": lambda P, m: P.ln_structured(m, "weight", 1, 2, 0),
    "ln_1.0_dim-1": lambda P, m: P.ln_structured(m, "weight", 1.0, 1, -1),
    "ln_0_dim1": lambda P, m: P.ln_structured(m, "weight", 0, 2, 1),
    "custom_zeros": lambda P, m: P.custom_from_mask(m, "weight", torch.zeros_like(m.weight)),
    "global_l1_0.5": lambda P, m: P.global_unstructured([(m, "weight"), (m, _other(m))], P.L1Unstructured,
                                                        amount=0.5),
    "global_l1_3": lambda P, m: P.global_unstructured([(m, "weight"), (m, _other(m))], P.L1Unstructured,
                                                      amount=3),
    "global_l1_alone_1": lambda P, m: P.global_unstructured([(m, "weight")], P.L1Unstructured, amount=1),
    "global_random_alone_0.5": lambda P, m: P.global_unstructured([(m, "weight")], P.RandomUnstructured,
                                                                  amount=0.5),
}


@pytest.mark.parametrize("stage", ["first", "after_identity"])
@pytest.mark.parametrize("call", list(DEGENERATE_CALLS))
@pytest.mark.parametrize("shape", list(DEGENERATE))
def test_degenerate_parameter(shape, call, stage):
    """On a second prune the reference applies structured methods to a 1-D
    tensor through a (1, n) or (0, n) view (a 0-dim bool index adds a dim)
    instead of rejecting it; fastprune does the same."""
    setup = None if stage == "first" else (lambda P, m: P.identity(m, "weight"))
    assert_like_reference(DEGENERATE[shape], DEGENERATE_CALLS[call], setup)


@pytest.mark.parametrize("call", [lambda P, m: P.ln_structured(m, "bias", 2, 1, -1),
                                  lambda P, m: P.ln_structured(m, "bias", 1, 2, 0),
                                  lambda P, m: P.random_structured(m, "bias", 0.5, 0),
                                  lambda P, m: P.random_structured(m, "bias", 1, -1)])
def test_structured_reprune_of_a_bias(call):
    """The same quirk on an ordinary bias: after any first prune, structured
    methods prune it (dim -1: entry by entry, dim 0: all or nothing)."""
    assert assert_like_reference(linear, call, setup=lambda P, m: P.l1_unstructured(m, "bias", 1)) is None


# ----------------------------------------------------------------------------
# Importance scores: shape, dtype, device, autograd
# ----------------------------------------------------------------------------

def scores_of(dtype, dim=0):
    """Scores for conv(): channels strictly ordered along `dim`, magnitudes
    k/128 (k = 1..108; integers k for integer dtypes), so that no score ties
    with another or with a bias value, in every dtype."""
    base = channel_separated((4, 3, 3, 3), dim, torch.float64, seed=4)
    if dtype == torch.bool:
        return base > 0
    if dtype.is_complex:
        return torch.complex(base, torch.zeros_like(base)).to(dtype)
    if not dtype.is_floating_point:
        return (base * 128).round().abs().to(dtype) if dtype == torch.uint8 else (base * 128).round().to(dtype)
    return base.to(dtype)


SCORE_DTYPES = [torch.int64, torch.int32, torch.uint8, torch.bool, torch.float64, torch.float16, torch.bfloat16,
                torch.complex64]

SCORE_CALLS = {
    "l1_0.3": lambda s: lambda P, m: P.l1_unstructured(m, "weight", 0.3, importance_scores=s()),
    "l1_27": lambda s: lambda P, m: P.l1_unstructured(m, "weight", 27, importance_scores=s()),
    "ln2_dim0": lambda s: lambda P, m: P.ln_structured(m, "weight", 1, 2, 0, importance_scores=s()),
    "ln_inf_dim0": lambda s: lambda P, m: P.ln_structured(m, "weight", 2, INF, 0, importance_scores=s()),
    "identity": lambda s: lambda P, m: P.BasePruningMethod.apply.__func__(P.Identity, m, "weight",
                                                                          importance_scores=s()),
    "global_l1": lambda s: lambda P, m: P.global_unstructured(
        [(m, "weight"), (m, "bias")], P.L1Unstructured, importance_scores={(m, "weight"): s()}, amount=27),
    "global_random": lambda s: lambda P, m: P.global_unstructured(
        [(m, "weight"), (m, "bias")], P.RandomUnstructured, importance_scores={(m, "weight"): s()}, amount=27),
}


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("call", list(SCORE_CALLS))
@pytest.mark.parametrize("dtype", SCORE_DTYPES, ids=str)
def test_importance_score_dtype(dtype, call, stage):
    """Integer scores rank like the reference's, bool ones fail in L1's abs
    and every norm rejects non-float scores; structured masks take the
    scores' dtype. (Complex scores in a container give a complex mask, whose
    cast to the weight's dtype in apply_mask makes torch warn once per
    process, in either library: the reference runs first here.)"""
    if dtype == torch.bool and call.startswith("global"):
        pytest.skip("0/1 scores are all ties: which entries go is not defined")
    if dtype == torch.complex64 and call == "global_random":
        pytest.skip("complex draws: see test_complex_random_draws")
    assert_like_reference(conv, SCORE_CALLS[call](lambda: scores_of(dtype)), STAGES[stage])


SCORE_AUTOGRAD = {
    "leaf": lambda: scores_of(torch.float32).requires_grad_(),
    "non_leaf": lambda: scores_of(torch.float32).requires_grad_() * 2,
    "parameter": lambda: nn.Parameter(scores_of(torch.float32)),
}


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("call", list(SCORE_CALLS))
@pytest.mark.parametrize("kind", list(SCORE_AUTOGRAD))
def test_importance_scores_requiring_grad(kind, call, stage):
    """The masks never require grad or hang off the scores' graph."""
    assert_like_reference(conv, SCORE_CALLS[call](SCORE_AUTOGRAD[kind]), STAGES[stage])


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("shape", [(), (1, 5, 6), (5, 6, 1), (6, 5), (30,), (5, 1)], ids=str)
@pytest.mark.parametrize("method", ["l1", "ln"])
def test_importance_scores_of_wrong_shape(method, shape, stage):
    def call(P, m):
        scores = torch.ones(shape)
        if method == "l1":
            P.l1_unstructured(m, "weight", 0.5, importance_scores=scores)
        else:
            P.ln_structured(m, "weight", 1, 2, 0, importance_scores=scores)
    assert assert_like_reference(linear, call, STAGES[stage]) is not None


def test_global_scores_of_another_shape_with_the_same_size():
    """[Q] The reference reshapes the scores silently (misaligned ranks);
    fastprune rejects them (as it does scores of another size) and prunes
    nothing."""
    scores = scores_of(torch.float32).permute(1, 0, 2, 3).contiguous()  # (3, 4, 3, 3)

    def call(P, m):
        P.global_unstructured([(m, "weight"), (m, "bias")], P.L1Unstructured,
                              importance_scores={(m, "weight"): scores}, amount=20)
    out = outcomes(conv, call)
    assert out["ref"][1] is None
    assert REF.is_pruned(out["ref"][0])
    assert isinstance(out["fast"][1], IndexError)
    assert "should have its shape (4, 3, 3, 3), got (3, 4, 3, 3)" in str(out["fast"][1])


META_SCORE_CALLS = {
    "l1": lambda P, m: P.l1_unstructured(m, "weight", 5, importance_scores=scores_of(torch.float32).to("meta")),
    "ln": lambda P, m: P.ln_structured(m, "weight", 1, 2, 0, importance_scores=scores_of(torch.float32).to("meta")),
    "global": lambda P, m: P.global_unstructured([(m, "weight"), (m, "bias")], P.L1Unstructured, amount=5,
                                                 importance_scores={(m, "weight"): scores_of(torch.float32).to("meta")}),
}


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("call", list(META_SCORE_CALLS))
def test_meta_scores_for_a_real_weight_fail(call, stage):
    """Meta scores cannot rank a CPU weight. The reference either fails
    (with some device error) or silently prunes nothing (L1; ln in a
    container); fastprune always fails and leaves the module as it was."""
    out = outcomes(conv, META_SCORE_CALLS[call], STAGES[stage])
    (m_ref, e_ref), (m_fast, e_fast) = out["ref"], out["fast"]
    assert isinstance(e_fast, (RuntimeError, NotImplementedError, TypeError)), e_fast
    if e_ref is None:  # the reference's mask is the one before the call
        fresh = conv()
        if STAGES[stage] is not None:
            STAGES[stage](REF, fresh)
            assert_mask_equal(m_ref.weight_mask, fresh.weight_mask)
        else:
            assert bool((m_ref.weight_mask == 1).all())


# ----------------------------------------------------------------------------
# Masks given to custom_from_mask, and pruning on top of them
# ----------------------------------------------------------------------------

def _mixed(dtype):
    """Entries 0, 1, 0.5, 2 and -1 (1 most often) at fixed random positions."""
    values = torch.tensor([0., 1., 0.5, 2., -1., 1., 1.], dtype=dtype)
    return lambda: values[torch.randint(0, 7, (4, 3, 3, 3), generator=torch.Generator().manual_seed(3))]


MASKS = {
    "mixed_float32": _mixed(torch.float32),
    "mixed_float64": _mixed(torch.float64),
    "mixed_float16": _mixed(torch.float16),
    "bool": lambda: tie_free((4, 3, 3, 3), seed=2) > -0.3,
    "int64": lambda: torch.randint(-1, 3, (4, 3, 3, 3), generator=torch.Generator().manual_seed(5)),
    "uint8": lambda: torch.randint(0, 3, (4, 3, 3, 3), generator=torch.Generator().manual_seed(5)).to(torch.uint8),
    "dead_channel": lambda: torch.ones(4, 3, 3, 3).index_fill_(0, torch.tensor([1]), 0.0),
    "all_zero": lambda: torch.zeros(4, 3, 3, 3),
    "nan_entries": lambda: torch.ones(4, 3, 3, 3).index_fill_(1, torch.tensor([2]), NAN),
    "negative_zeros": lambda: torch.ones(4, 3, 3, 3).index_fill_(1, torch.tensor([2]), -0.0),
    "channels_last": lambda: (tie_free((4, 3, 3, 3), seed=2) > -0.3).float().contiguous(
        memory_format=torch.channels_last),
    "expanded": lambda: torch.tensor([1., 0., 1.]).view(1, 3, 1, 1).expand(4, 3, 3, 3),
}

ON_TOP = {
    "nothing": None,
    "l1_0.3": lambda P, m: P.l1_unstructured(m, "weight", 0.3),
    "l1_10": lambda P, m: P.l1_unstructured(m, "weight", 10),
    "l1_all": lambda P, m: P.l1_unstructured(m, "weight", 1.0),
    "random_0.3": lambda P, m: P.random_unstructured(m, "weight", 0.3),
    "ln_dim0": lambda P, m: P.ln_structured(m, "weight", 1, 1, 0),
    "ln_dim1": lambda P, m: P.ln_structured(m, "weight", 1, 1, 1),
    "random_structured": lambda P, m: P.random_structured(m, "weight", 1, 0),
    "custom": lambda P, m: P.custom_from_mask(m, "weight", tie_free((4, 3, 3, 3), seed=9) > 0),
    "identity": lambda P, m: P.identity(m, "weight"),
    "global_l1": lambda P, m: P.global_unstructured([(m, "weight"), (m, "bias")], P.L1Unstructured, amount=0.2),
    "global_random": lambda P, m: P.global_unstructured([(m, "weight"), (m, "bias")], P.RandomUnstructured,
                                                        amount=7),
}


@pytest.mark.parametrize("then", list(ON_TOP))
@pytest.mark.parametrize("mask", list(MASKS))
def test_custom_mask_then_more_pruning(mask, then):
    """Non-binary, bool, integer, NaN and non-contiguous masks, then every
    method on top (container path: only entries equal to 1 are candidates)."""
    if mask == "nan_entries" and then.startswith("ln"):
        pytest.skip("every channel norm is NaN: which channel goes is not defined")
    first = lambda P, m: P.custom_from_mask(m, "weight", MASKS[mask]())  # noqa: E731
    if ON_TOP[then] is None:
        assert_like_reference(conv, first)
    else:
        assert_like_reference(conv, ON_TOP[then], setup=first)


@pytest.mark.parametrize("mask", ["mixed_float32", "mixed_float16", "int64", "nan_entries"])
def test_entries_other_than_one_are_never_pruned_further(mask):
    m = conv()
    FAST.custom_from_mask(m, "weight", MASKS[mask]())
    first = m.weight_mask.clone()
    FAST.l1_unstructured(m, "weight", 1.0)
    ones = first == 1
    assert bool((m.weight_mask[ones] == 0).all())
    assert_mask_equal(m.weight_mask[~ones], first[~ones])


def test_mask_requiring_grad():
    """[Q] A mask that requires grad makes the first buffer a non-leaf that
    requires grad, in both libraries; a prune on top gives a plain mask."""
    def mask():
        return (tie_free((4, 3, 3, 3), seed=2) > -0.3).float().requires_grad_()
    masks = {}
    for key, P in LIBS.items():
        m = conv()
        call = lambda P, m: P.custom_from_mask(m, "weight", mask())  # noqa: E731
        assert (run_fast(call, m) if key == "fast" else run_ref(call, m)) is None
        masks[key] = m.weight_mask
        assert m.weight_mask.requires_grad and m.weight_mask.grad_fn is not None
        P.l1_unstructured(m, "weight", 5)
        assert not m.weight_mask.requires_grad
        masks[key, 2] = m.weight_mask
    assert_mask_equal(masks["fast"].detach(), masks["ref"].detach())
    assert_mask_equal(masks["fast", 2], masks["ref", 2])


# ----------------------------------------------------------------------------
# NaN, infinities, signed zeros and denormals in the weights
# ----------------------------------------------------------------------------

DENORMAL = 2.0 ** -140  # k * DENORMAL for k <= 9 is a float32 denormal

SPECIAL = {
    "one_nan": [0.5, -1.0, NAN, 2.0, -0.25, 3.0, 1.5, -4.0, 0.75],
    "two_nans": [0.5, -1.0, NAN, 2.0, -0.25, NAN, 1.5, -4.0, 0.75],
    "infs": [0.5, -1.0, INF, 2.0, -0.25, -INF, 1.5, -4.0, 0.75],
    "nan_and_infs": [0.5, -INF, NAN, 2.0, -0.25, INF, 1.5, -4.0, 0.75],
    "negative_zero": [0.5, -0.0, 1.0, 2.0, -0.25, 3.0, 1.5, -4.0, 0.75],
    "both_zeros": [0.5, -0.0, 1.0, 0.0, -0.25, 3.0, 1.5, -4.0, 0.75],
    "denormals": [k * DENORMAL for k in (1, -2, 3, 4, -5, 6, 7, -8, 9)],
    "denormals_and_normals": [DENORMAL, -2.0, 3 * DENORMAL, 4.0, -5 * DENORMAL, 6.0, 7 * DENORMAL, -8.0, 2.0 ** -149],
}

# Counts chosen so that no cut falls inside a group of equal magnitudes
# (two NaNs, +-inf, +-0.0) in any of the weights above; NaN ranks highest.
SPECIAL_CALLS = {
    **{f"l1_{a}": (lambda a: lambda P, m: P.l1_unstructured(m, "weight", a))(a) for a in (2, 3, 6, 9, 0.5)},
    "l1_2_then_3": lambda P, m: (P.l1_unstructured(m, "weight", 2), P.l1_unstructured(m, "weight", 3)),
    "random_4": lambda P, m: P.random_unstructured(m, "weight", 4),
    "ln1_rows": lambda P, m: P.ln_structured(m, "weight", 1, 1, 0),
    "ln_inf_rows": lambda P, m: P.ln_structured(m, "weight", 1, INF, 0),
    "ln1_rows_after_l1": lambda P, m: (P.l1_unstructured(m, "weight", 2), P.ln_structured(m, "weight", 1, 1, 0)),
    "random_structured": lambda P, m: P.random_structured(m, "weight", 1, 1),
    "custom": lambda P, m: P.custom_from_mask(m, "weight", torch.tensor([[1., 0, 1], [0, 1, 0], [1, 0, 1]])),
    "global_2": lambda P, m: P.global_unstructured([(m, "weight"), (m, "bias")], P.L1Unstructured, amount=2),
    "global_6": lambda P, m: P.global_unstructured([(m, "weight"), (m, "bias")], P.L1Unstructured, amount=6),
    "global_0.5": lambda P, m: P.global_unstructured([(m, "weight"), (m, "bias")], P.L1Unstructured, amount=0.5),
}


def special(values):
    def make():
        m = nn.Module()
        m.weight = nn.Parameter(torch.tensor(values).reshape(3, 3))
        m.bias = nn.Parameter(torch.tensor([0.125, -0.375, 0.625]))
        return m
    return make


@pytest.mark.parametrize("call", list(SPECIAL_CALLS))
@pytest.mark.parametrize("weights", list(SPECIAL))
def test_special_float_values(weights, call):
    """Compared bit for bit: a pruned NaN or inf stays NaN in the pruned
    weight (0 * NaN), -0.0 keeps its sign where unpruned."""
    if weights in ("two_nans", "infs") and call.startswith("ln"):
        pytest.skip("two rows with a NaN or infinite norm tie")
    assert assert_like_reference(special(SPECIAL[weights]), SPECIAL_CALLS[call]) is None


# ----------------------------------------------------------------------------
# Expanded (stride-0) weights and importance scores
# ----------------------------------------------------------------------------

def expanded_conv():
    """conv() whose weight is one filter expanded 4 times along dim 0: every
    value appears 4 times, so counts are multiples of 4 and only dim 1
    (distinct channels) is ranked."""
    m = conv(dim=1)
    m.weight = nn.Parameter(m.weight.detach()[:1].expand(4, 3, 3, 3))
    return m


EXPANDED_WEIGHT_CALLS = {
    "identity": lambda P, m: P.identity(m, "weight"),
    "l1_8": lambda P, m: P.l1_unstructured(m, "weight", 8),
    "random_0.3": lambda P, m: P.random_unstructured(m, "weight", 0.3),
    "ln_dim1": lambda P, m: P.ln_structured(m, "weight", 1, 2, 1),
    "random_structured": lambda P, m: P.random_structured(m, "weight", 2, 0),
    "custom": lambda P, m: P.custom_from_mask(m, "weight", tie_free((4, 3, 3, 3), seed=5) > 0),
    "ln_then_l1": lambda P, m: (P.ln_structured(m, "weight", 1, 2, 1), P.l1_unstructured(m, "weight", 12)),
}


@pytest.mark.parametrize("call", list(EXPANDED_WEIGHT_CALLS))
def test_expanded_weight(call):
    assert assert_like_reference(expanded_conv, EXPANDED_WEIGHT_CALLS[call]) is None


@pytest.mark.parametrize("amount", [8, 0.25])
def test_expanded_weight_in_global(amount):
    """The reference's `.view(-1)` fails (docs/behaviour.md §Differences);
    fastprune prunes as the reference does a contiguous copy, the mask in
    ones_like(weight)'s format."""
    def call(P, m):
        P.global_unstructured([(m, "weight"), (m, "bias")], P.L1Unstructured, amount=amount)

    with pytest.raises(RuntimeError, match="view size is not compatible"):
        call(REF, expanded_conv())
    m = expanded_conv()
    assert run_fast(call, m) is None
    twin = expanded_conv()
    twin.weight = nn.Parameter(twin.weight.detach().contiguous())
    call(REF, twin)
    assert_mask_equal(m.weight_mask, twin.weight_mask)
    assert_mask_equal(m.bias_mask, twin.bias_mask)
    assert m.weight_mask.stride() == torch.ones_like(m.weight_orig).stride()


def expanded_scores():
    """Scores for conv(dim=1): one filter's scores expanded along dim 0."""
    return scores_of(torch.float32, dim=1)[:1].expand(4, 3, 3, 3)


EXPANDED_SCORE_CALLS = {
    "l1_12": lambda P, m: P.l1_unstructured(m, "weight", 12, importance_scores=expanded_scores()),
    "ln_dim1": lambda P, m: P.ln_structured(m, "weight", 1, 2, 1, importance_scores=expanded_scores()),
}

# A whole filter pruned first: every score value then has 3 candidates left.
EXPANDED_STAGES = {"first": None, "second": lambda P, m: P.random_structured(m, "weight", 1, 0)}


@pytest.mark.parametrize("stage", list(EXPANDED_STAGES))
@pytest.mark.parametrize("call", list(EXPANDED_SCORE_CALLS))
def test_expanded_importance_scores(call, stage):
    assert assert_like_reference(lambda: conv(dim=1), EXPANDED_SCORE_CALLS[call], EXPANDED_STAGES[stage]) is None


@pytest.mark.parametrize("stage", list(EXPANDED_STAGES))
def test_expanded_importance_scores_in_global(stage):
    def call(scores):
        return lambda P, m: P.global_unstructured([(m, "weight")], P.L1Unstructured,
                                                  importance_scores={(m, "weight"): scores}, amount=12)
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        call(expanded_scores())(REF, conv(dim=1))
    m_ref, m_fast = conv(dim=1), conv(dim=1)
    if EXPANDED_STAGES[stage] is not None:
        for P, m in ((REF, m_ref), (FAST, m_fast)):
            torch.manual_seed(0)
            EXPANDED_STAGES[stage](P, m)
    call(expanded_scores().contiguous())(REF, m_ref)
    assert run_fast(call(expanded_scores()), m_fast) is None
    assert_same_pruned_state(m_ref, m_fast)


def test_reprune_of_channels_last_weight_keeps_its_format():
    """docs/behaviour.md §Differences: the mask keeps the format
    ones_like(weight) has. The reference's container returns contiguous masks (it clones the mask
    contiguous), so only the values are the reference's, and the forward
    pass, which then convolves a channels_last instead of a contiguous
    weight, agrees up to rounding."""
    mods = {}
    for key, P in LIBS.items():
        m = conv().to(memory_format=torch.channels_last)
        P.ln_structured(m, "weight", 1, 2, 0)
        if key == "fast":
            assert run_fast(lambda P, m: P.l1_unstructured(m, "weight", 10), m) is None
        else:
            P.l1_unstructured(m, "weight", 10)
        mods[key] = m
    r, f = mods["ref"], mods["fast"]
    assert r.weight_mask.is_contiguous()
    assert f.weight_mask.is_contiguous(memory_format=torch.channels_last)
    assert_mask_equal(f.weight_mask, r.weight_mask)
    torch.testing.assert_close(f.weight, r.weight, rtol=0, atol=0)
    x = example_input(f)
    torch.testing.assert_close(f(x), r(x))


# ----------------------------------------------------------------------------
# Buffers, missing and None tensors, frozen parameters, no_grad
# ----------------------------------------------------------------------------

def batchnorm():
    m = nn.BatchNorm1d(4)
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([0.5, -0.25, 1.0, -2.0]))
        m.weight.copy_(torch.tensor([0.375, -0.625, 1.125, 0.125]))
    return m


NOT_A_PARAMETER = {
    "l1_running_mean": lambda P, m: P.l1_unstructured(m, "running_mean", 1),
    "random_running_var": lambda P, m: P.random_unstructured(m, "running_var", 1),
    "ln_running_mean": lambda P, m: P.ln_structured(m, "running_mean", 1, 2, 0),
    "random_structured_running_mean": lambda P, m: P.random_structured(m, "running_mean", 1, 0),
    "custom_running_mean": lambda P, m: P.custom_from_mask(m, "running_mean", torch.tensor([1., 0., 1., 1.])),
    "identity_num_batches_tracked": lambda P, m: P.identity(m, "num_batches_tracked"),
    "l1_num_batches_tracked": lambda P, m: P.l1_unstructured(m, "num_batches_tracked", 0.5),
    "global_buffer_last": lambda P, m: P.global_unstructured([(m, "weight"), (m, "running_mean")],
                                                             P.L1Unstructured, amount=1),
    "global_buffer_first": lambda P, m: P.global_unstructured([(m, "running_mean"), (m, "weight")],
                                                              P.L1Unstructured, amount=1),
    "plain_attribute": lambda P, m: P.l1_unstructured(m, "training", 1),
    "missing": lambda P, m: P.l1_unstructured(m, "nothing", 1),
}


@pytest.mark.parametrize("stage", ["first", "weight_pruned", "weight_and_bias_pruned"])
@pytest.mark.parametrize("call", list(NOT_A_PARAMETER))
def test_buffer_instead_of_parameter(call, stage):
    setup = {"first": None,
             "weight_pruned": lambda P, m: P.l1_unstructured(m, "weight", 1),
             "weight_and_bias_pruned": lambda P, m: (P.l1_unstructured(m, "weight", 1), P.identity(m, "bias"))}
    assert assert_like_reference(batchnorm, NOT_A_PARAMETER[call], setup[stage]) is not None


NONE_BIAS = {
    "identity": lambda P, m: P.identity(m, "bias"),
    "l1": lambda P, m: P.l1_unstructured(m, "bias", 1),
    "random": lambda P, m: P.random_unstructured(m, "bias", 1),
    "custom": lambda P, m: P.custom_from_mask(m, "bias", torch.ones(5)),
    "global_after_weight": lambda P, m: P.global_unstructured([(m, "weight"), (m, "bias")], P.L1Unstructured,
                                                              amount=1),
    "global_alone": lambda P, m: P.global_unstructured([(m, "bias")], P.L1Unstructured, amount=1),
}


@pytest.mark.parametrize("stage", ["first", "weight_pruned"])
@pytest.mark.parametrize("call", list(NONE_BIAS))
def test_none_parameter(call, stage):
    """A `bias=False` layer's bias is None."""
    def make():
        m = linear()
        m.bias = None
        return m
    setup = None if stage == "first" else (lambda P, m: P.l1_unstructured(m, "weight", 3))
    assert assert_like_reference(make, NONE_BIAS[call], setup) is not None


FROZEN_CALLS = {
    "l1": lambda P, m: P.l1_unstructured(m, "weight", 0.3),
    "ln": lambda P, m: P.ln_structured(m, "weight", 1, 2, 0),
    "custom": lambda P, m: P.custom_from_mask(m, "weight", tie_free((4, 3, 3, 3)) > 0),
    "iterative_then_remove": lambda P, m: (P.l1_unstructured(m, "weight", 0.3), P.ln_structured(m, "weight", 1, 2, 0),
                                           P.remove(m, "weight")),
    "global": lambda P, m: P.global_unstructured([(m, "weight"), (m, "bias")], P.L1Unstructured, amount=0.4),
}


@pytest.mark.parametrize("call", list(FROZEN_CALLS))
def test_frozen_parameter(call):
    """requires_grad=False weights (next to a trainable bias): the pruned
    weight does not require grad, and a backward pass leaves it without grad."""
    def make():
        m = conv()
        m.weight.requires_grad_(False)
        return m
    assert assert_like_reference(make, FROZEN_CALLS[call]) is None
    m = make()
    FROZEN_CALLS[call](FAST, m)
    assert not m.weight.requires_grad
    m(example_input(m)).sum().backward()
    frozen = m.weight if call == "iterative_then_remove" else m.weight_orig
    assert frozen.grad is None
    assert (m.bias_orig if hasattr(m, "bias_orig") else m.bias).grad is not None


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("call", list(FROZEN_CALLS))
def test_prune_under_no_grad_and_inference_mode(call, mode):
    with getattr(torch, mode)():
        assert assert_like_reference(conv, FROZEN_CALLS[call]) is None


# ----------------------------------------------------------------------------
# Meta, complex and integer parameters
# ----------------------------------------------------------------------------

def meta_conv():
    return conv().to("meta")


META_CALLS = {
    "identity": lambda P, m: P.identity(m, "weight"),
    "l1": lambda P, m: P.l1_unstructured(m, "weight", 0.5),
    "l1_int": lambda P, m: P.l1_unstructured(m, "weight", 5),
    "random": lambda P, m: P.random_unstructured(m, "weight", 3),
    "random_structured": lambda P, m: P.random_structured(m, "weight", 1, 0),
    "ln": lambda P, m: P.ln_structured(m, "weight", 1, 2, 1),
    "custom": lambda P, m: P.custom_from_mask(m, "weight", torch.ones(4, 3, 3, 3, device="meta")),
    "custom_cpu_mask": lambda P, m: P.custom_from_mask(m, "weight", torch.ones(4, 3, 3, 3)),
    "l1_cpu_scores": lambda P, m: P.l1_unstructured(m, "weight", 3, importance_scores=torch.ones(4, 3, 3, 3)),
    "remove": lambda P, m: P.remove(m, "weight"),
}


META_CLASSES = {"identity": "Identity", "l1": "L1Unstructured", "l1_int": "L1Unstructured",
                "random": "RandomUnstructured", "ln": "LnStructured"}


def meta_summary(m):
    return [(n, b.device.type, b.dtype, tuple(b.shape)) for n, b in m.named_buffers()], hook_summary(m)


@pytest.mark.parametrize("setup", ["identity", "l1", "ln"])
@pytest.mark.parametrize("call", list(META_CALLS))
def test_reprune_on_meta(call, setup):
    """Like the reference, except that L1 and random pruning in a container
    work on meta: the reference's boolean indexing needs nonzero, which meta
    lacks; fastprune's kernel path does not (as for global pruning,
    docs/behaviour.md §Differences)."""
    out = outcomes(meta_conv, META_CALLS[call], setup=META_CALLS[setup])
    (m_ref, e_ref), (m_fast, e_fast) = out["ref"], out["fast"]
    if call in ("l1", "l1_int", "random"):
        assert isinstance(e_ref, NotImplementedError) and e_fast is None
        assert hook_summary(m_fast) == [("PruningContainer", "weight", (META_CLASSES[setup], META_CLASSES[call]))]
        assert m_fast.weight_mask.device.type == "meta" and m_fast.weight.device.type == "meta"
    elif e_ref is None:
        assert e_fast is None
        assert meta_summary(m_fast) == meta_summary(m_ref)
    else:
        same_error(e_fast, e_ref)


def complex_module():
    m = nn.Module()
    m.weight = nn.Parameter(torch.complex(channel_separated((3, 4), 0), 0.01 * tie_free((3, 4), seed=1)))
    m.bias = nn.Parameter(torch.tensor([1., -3., 5.]) / 256)
    return m


COMPLEX_CALLS = {
    "identity": lambda P, m: P.identity(m, "weight"),
    "l1_5": lambda P, m: P.l1_unstructured(m, "weight", 5),
    "l1_0.5": lambda P, m: P.l1_unstructured(m, "weight", 0.5),
    "ln": lambda P, m: P.ln_structured(m, "weight", 1, 2, 0),
    "random_structured": lambda P, m: P.random_structured(m, "weight", 1, 1),
    "custom": lambda P, m: P.custom_from_mask(m, "weight", tie_free((3, 4)) > 0),
    "global_alone": lambda P, m: P.global_unstructured([(m, "weight")], P.L1Unstructured, amount=4),
    "global_with_real_bias": lambda P, m: P.global_unstructured([(m, "weight"), (m, "bias")], P.L1Unstructured,
                                                                amount=0.5),
}


@pytest.mark.parametrize("stage", ["first", "after_identity", "after_l1"])
@pytest.mark.parametrize("call", list(COMPLEX_CALLS))
def test_complex_parameter(call, stage):
    """Complex masks, ranked by |z| as torch.abs gives it."""
    setup = {"first": None, "after_identity": COMPLEX_CALLS["identity"],
             "after_l1": lambda P, m: P.l1_unstructured(m, "weight", 2)}[stage]
    assert assert_like_reference(complex_module, COMPLEX_CALLS[call], setup) is None


COMPLEX_DRAWS = {
    "random": (complex_module, lambda P, m: P.random_unstructured(m, "weight", 2)),
    "global_random": (complex_module,
                      lambda P, m: P.global_unstructured([(m, "weight")], P.RandomUnstructured, amount=2)),
    "global_random_complex_scores": (conv, SCORE_CALLS["global_random"](lambda: scores_of(torch.complex64))),
}


@pytest.mark.parametrize("case", list(COMPLEX_DRAWS))
def test_complex_random_draws(case):
    """The reference draws complex numbers and its topk rejects them;
    fastprune fails the same way (module unchanged: run_fast checks it)."""
    out = outcomes(*COMPLEX_DRAWS[case])
    assert "topk does not support complex dtypes" in str(out["ref"][1])
    same_error(out["fast"][1], out["ref"][1])


def integer_module():
    m = nn.Module()
    m.weight = nn.Parameter(torch.tensor([[3, -1, 2], [5, -7, 4]]), requires_grad=False)
    return m


INTEGER_CALLS = {
    "identity": lambda P, m: P.identity(m, "weight"),
    "l1": lambda P, m: P.l1_unstructured(m, "weight", 2),
    "random": lambda P, m: P.random_unstructured(m, "weight", 2),
    "ln": lambda P, m: P.ln_structured(m, "weight", 1, 2, 0),
    "random_structured": lambda P, m: P.random_structured(m, "weight", 1, 0),
    "custom": lambda P, m: P.custom_from_mask(m, "weight", torch.tensor([[1, 0, 1], [0, 1, 1]])),
    "global": lambda P, m: P.global_unstructured([(m, "weight")], P.L1Unstructured, amount=2),
}


@pytest.mark.parametrize("stage", ["first", "after_identity"])
@pytest.mark.parametrize("call", list(INTEGER_CALLS))
def test_integer_parameter(call, stage):
    setup = None if stage == "first" else INTEGER_CALLS["identity"]
    assert_like_reference(integer_module, INTEGER_CALLS[call], setup)
