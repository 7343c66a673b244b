"""docs/behaviour.md §Differences (fixed bugs: each fails on the reference and
works here) and §Ties (exactly k, deterministic, lower flat index pruned first)."""
import copy
import pickle

import pytest
import torch
import torch.nn as nn

from conftest import (
    FAST, LIBS, REF, assert_mask_equal, assert_same_pruned_state, assert_same_snapshot, channel_separated,
    example_input, hook_summary, make_conv, make_linear, make_net, pruning_hooks,
    select_oracle, snapshot, tie_free,
)

VIEW_ERROR = "view size is not compatible with input tensor's size and stride"


# ----------------------------------------------------------------------------
# channels_last and non-contiguous weights and importance scores
# ----------------------------------------------------------------------------

def with_layout(kind):
    """A module whose `weight` Parameter has the same values as the
    contiguous twin's (`make_*()`), in another memory layout."""
    def make():
        if kind == "channels_last":
            return conv_sep().to(memory_format=torch.channels_last)
        m = conv_sep() if kind == "conv_permuted" else make_linear()
        w = m.weight.detach()
        if kind == "transposed":
            new = torch.empty(w.shape[::-1]).t()
        elif kind == "conv_permuted":
            new = torch.empty(w.permute(2, 3, 1, 0).shape).permute(3, 2, 0, 1)
        elif kind == "sliced":  # non-dense, and not viewable as 1-D
            new = torch.empty(w.shape[0], w.shape[1] + 3)[:, :w.shape[1]]
        new.copy_(w)
        m.weight = nn.Parameter(new)
        return m
    return make


def conv_sep():
    m = make_conv()
    with torch.no_grad():
        m.weight.copy_(channel_separated((4, 3, 3, 3), 0))
    return m


def contiguous_twin(m):
    twin = copy.deepcopy(m)
    twin.weight = nn.Parameter(m.weight.detach().contiguous())
    return twin


LAYOUTS = ["channels_last", "transposed", "conv_permuted", "sliced"]

DENSE = {"channels_last", "transposed", "conv_permuted"}
# (name, call, deterministic, layouts on which the reference fails)
METHOD_CALLS = [
    ("identity", lambda P, m: P.identity(m, "weight"), True, set()),
    ("l1", lambda P, m: P.l1_unstructured(m, "weight", 0.4), True, DENSE),
    ("random", lambda P, m: P.random_unstructured(m, "weight", 0.4), False, DENSE),
    ("random_structured", lambda P, m: P.random_structured(m, "weight", 1, 0), False, set()),
    ("ln", lambda P, m: P.ln_structured(m, "weight", 2, 2, 0), True, set()),
    ("custom", lambda P, m: P.custom_from_mask(m, "weight", tie_free(tuple(m.weight.shape)) > 0), True, set()),
    ("global_l1", lambda P, m: P.global_unstructured([(m, "weight"), (m, "bias")], P.L1Unstructured, amount=0.4),
     True, set(LAYOUTS)),
    ("global_random", lambda P, m: P.global_unstructured([(m, "weight")], P.RandomUnstructured, amount=7),
     False, set(LAYOUTS)),
]


@pytest.mark.parametrize("name,call,deterministic,ref_fails_on", METHOD_CALLS, ids=[c[0] for c in METHOD_CALLS])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_non_contiguous_weight(kind, name, call, deterministic, ref_fails_on):
    make = with_layout(kind)
    if kind in ref_fails_on:
        with pytest.raises(RuntimeError, match=VIEW_ERROR):
            call(REF, make())
    m = make()
    param = m.weight
    expected_stride = torch.ones_like(param).stride()
    torch.manual_seed(0)
    call(FAST, m)
    assert m.weight_orig is param
    assert m.weight_mask.stride() == expected_stride, "mask keeps torch.ones_like(param)'s memory format"
    torch.testing.assert_close(m.weight, m.weight_mask * param, rtol=0, atol=0)
    if deterministic:  # the values the reference gives on a contiguous copy
        twin = contiguous_twin(make())
        call(REF, twin)
        assert_mask_equal(m.weight_mask, twin.weight_mask)
    else:
        pruned = int((m.weight_mask == 0).sum())
        assert pruned == (7 if name == "global_random" else
                          round(0.4 * param.numel()) if name == "random" else param.numel() // param.shape[0])
    y = m(example_input(m))
    y.sum().backward()
    assert (param.grad[m.weight_mask == 0] == 0).all()
    # and a second prune on top (container path) works too
    zeros = int((m.weight_mask == 0).sum())
    FAST.l1_unstructured(m, "weight", 3)
    assert int((m.weight_mask == 0).sum()) == zeros + 3


@pytest.mark.parametrize("kind", ["transposed", "channels_last", "sliced"])
def test_non_contiguous_importance_scores(kind):
    base = channel_separated((4, 3, 3, 3), 1, seed=4) * 3 + 0.001  # no magnitude equals a bias value
    if kind == "transposed":
        scores = base.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    elif kind == "channels_last":
        scores = base.contiguous(memory_format=torch.channels_last)
    else:
        scores = torch.zeros(4, 3, 3, 5)[..., :3]
        scores.copy_(base)
    assert not scores.is_contiguous()
    ref_fails = [
        lambda P, m, s: P.l1_unstructured(m, "weight", 0.3, importance_scores=s),
        lambda P, m, s: P.global_unstructured([(m, "weight"), (m, "bias")], P.L1Unstructured,
                                              importance_scores={(m, "weight"): s}, amount=0.3),
    ]
    for call in ref_fails:
        if kind != "sliced":
            with pytest.raises(RuntimeError, match=VIEW_ERROR):
                call(REF, make_conv(), scores)
        m_ref, m_fast = make_conv(), make_conv()
        call(REF, m_ref, base)
        call(FAST, m_fast, scores)
        assert_same_pruned_state(m_ref, m_fast)  # mask in the weight's format, the values of contiguous scores
    # the reference handles them in ln_structured (its mask follows the scores' layout): same result
    m_ref, m_fast = make_conv(), make_conv()
    REF.ln_structured(m_ref, "weight", 1, 2, 1, importance_scores=scores)
    FAST.ln_structured(m_fast, "weight", 1, 2, 1, importance_scores=scores)
    assert_same_pruned_state(m_ref, m_fast)


def test_channels_last_iterative_matches_contiguous_values():
    m = with_layout("channels_last")()
    twin = contiguous_twin(m)
    steps = [lambda P, m: P.l1_unstructured(m, "weight", 0.3), lambda P, m: P.ln_structured(m, "weight", 1, 2, 1),
             lambda P, m: P.l1_unstructured(m, "weight", 5)]
    for step in steps:
        step(FAST, m)
        step(REF, twin)
        assert_mask_equal(m.weight_mask, twin.weight_mask)
        torch.testing.assert_close(m.weight, twin.weight, rtol=0, atol=0)


# ----------------------------------------------------------------------------
# copy.deepcopy of a module pruned under grad mode
# ----------------------------------------------------------------------------

DEEPCOPY_CASES = {
    "identity": lambda P, m: P.identity(m.fc, "weight"),
    "l1": lambda P, m: P.l1_unstructured(m.fc, "weight", 0.5),
    "random": lambda P, m: P.random_unstructured(m.fc, "bias", 2),
    "ln": lambda P, m: P.ln_structured(m.conv, "weight", 1, 2, 0),
    "random_structured": lambda P, m: P.random_structured(m.conv, "weight", 1, 1),
    "custom": lambda P, m: P.custom_from_mask(m.head, "weight", tie_free((3, 5)) > 0),
    "container": lambda P, m: (P.l1_unstructured(m.fc, "weight", 0.3), P.ln_structured(m.fc, "weight", 1, 1, 0)),
    "global": lambda P, m: P.global_unstructured([(m.conv, "weight"), (m.fc, "weight"), (m.head, "weight")],
                                                 P.L1Unstructured, amount=0.5),
}


@pytest.mark.parametrize("name", list(DEEPCOPY_CASES))
def test_deepcopy_under_grad_mode(name):
    prune = DEEPCOPY_CASES[name]
    m_ref = make_net()
    prune(REF, m_ref)
    with pytest.raises(RuntimeError, match="Only Tensors created explicitly by the user"):
        copy.deepcopy(m_ref)

    m = make_net()
    prune(FAST, m)
    before = snapshot(m)
    m2 = copy.deepcopy(m)
    assert_same_snapshot(before, snapshot(m))
    # values equal; the copy's cached tensors are detached copies (as after
    # pruning under no_grad) until its next forward recomputes them
    assert_same_pruned_state(m, m2, autograd=False)
    assert not ({id(p) for p in m.parameters()} & {id(p) for p in m2.parameters()})
    hooks = {id(h) for mod in m.modules() for _, h in pruning_hooks(mod)}
    assert not (hooks & {id(h) for mod in m2.modules() for _, h in pruning_hooks(mod)})
    x = example_input(m)
    torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)
    # the copy's cached tensors hang off the copy's parameters
    m2(x).sum().backward()
    assert all(p.grad is None for p in m.parameters())
    assert any(p.grad is not None for n, p in m2.named_parameters() if n.endswith("_orig"))
    # pruning the copy further leaves the original alone
    before = snapshot(m)
    FAST.l1_unstructured(m2.fc, "bias", 1)
    FAST.l1_unstructured(m2.conv, "weight", 1)
    assert_same_snapshot(before, snapshot(m))


def test_deepcopy_before_any_forward_keeps_stale_attribute():
    """The copy of the cached pruned tensor has the original's values (also
    when orig changed without a forward since)."""
    m = make_linear()
    FAST.l1_unstructured(m, "weight", 0.5)
    with torch.no_grad():
        m.weight_orig.mul_(2)
    m2 = copy.deepcopy(m)
    torch.testing.assert_close(m2.weight, m.weight, rtol=0, atol=0)
    m2(example_input(m2))
    torch.testing.assert_close(m2.weight, m.weight_mask * m.weight_orig, rtol=0, atol=0)


# ----------------------------------------------------------------------------
# A failed prune leaves the module exactly as it was (2nd and later prunes)
# ----------------------------------------------------------------------------

FAILING = [
    ("ctor", lambda P, m: P.l1_unstructured(m, "weight", 1.5), ValueError),
    ("count", lambda P, m: P.random_unstructured(m, "weight", 31), ValueError),
    ("importance_shape", lambda P, m: P.l1_unstructured(m, "weight", 0.1, importance_scores=torch.ones(2)),
     AssertionError),
    ("structured_dim", lambda P, m: P.ln_structured(m, "weight", 1, 2, -7), IndexError),
]


@pytest.mark.parametrize("name,call,exc", FAILING, ids=[c[0] for c in FAILING])
def test_failed_reprune_keeps_hook(name, call, exc):
    for key, P in LIBS.items():
        m = make_linear()
        P.l1_unstructured(m, "weight", 0.2)
        m.register_forward_pre_hook(lambda mod, inp: None)
        P.l1_unstructured(m, "weight", 0.2)  # now a container, before the user hook
        before = snapshot(m)
        with pytest.raises(exc):
            call(P, m)
        if key == "ref":
            assert not REF.is_pruned(m), "the reference loses the hook"
        else:
            assert_same_snapshot(before, snapshot(m))
            assert FAST.is_pruned(m) and REF.is_pruned(m)
            assert [t[0] for t in hook_summary(m)] == ["function", "PruningContainer"]


# ----------------------------------------------------------------------------
# PruningContainer(a, b, ...)
# ----------------------------------------------------------------------------

def test_pruning_container_with_several_methods():
    def named(*methods):
        for x in methods:
            x._tensor_name = "weight"
        return methods

    a, b = named(REF.L1Unstructured(0.5), REF.RandomUnstructured(0.5))
    with pytest.raises(AttributeError, match="'PruningContainer' object has no attribute '_tensor_name'"):
        REF.PruningContainer(a, b)

    a, b, c = named(FAST.L1Unstructured(0.5), FAST.LnStructured(1, 2, 0), FAST.L1Unstructured(3))
    two = FAST.PruningContainer(a, b)
    assert two._tensor_name == "weight" and len(two) == 2 and tuple(two) == (a, b)
    three = FAST.PruningContainer(a, b, c)
    assert tuple(three) == (a, b, c) and three[-1] is c
    # only the last method is applied
    t = tie_free((4, 6))
    out = three.compute_mask(t, default_mask=torch.ones(4, 6))
    assert int((out == 0).sum()) == 3
    other = FAST.L1Unstructured(0.1)
    other._tensor_name = "bias"
    with pytest.raises(ValueError, match="Can only add pruning methods acting on the parameter named 'weight'"):
        FAST.PruningContainer(a, other)


# ----------------------------------------------------------------------------
# global_unstructured: any iterable, no model-sized tensor kept, meta device
# ----------------------------------------------------------------------------

class OneShot:
    """An iterable that can be iterated only once."""

    def __init__(self, items):
        self.items, self.used = items, False

    def __iter__(self):
        assert not self.used, "iterated twice"
        self.used = True
        return iter(self.items)


ITERABLES = {
    "generator": lambda items: (x for x in items),
    "iterator": lambda items: iter(items),
    "one_shot": OneShot,
    "tuple": tuple,
    "dict_keys": lambda items: dict.fromkeys(items).keys(),
}


@pytest.mark.parametrize("kind", list(ITERABLES))
@pytest.mark.parametrize("method", ["L1Unstructured", "RandomUnstructured"])
def test_global_accepts_any_iterable(kind, method):
    def params(m):
        return [(m.conv, "weight"), (m.fc, "weight"), (m.fc, "bias")]

    if kind in ("generator", "iterator", "one_shot"):
        m = make_net()
        with pytest.raises((ValueError, AssertionError)):
            REF.global_unstructured(ITERABLES[kind](params(m)), getattr(REF, method), amount=0.3)
    m_ref, m_fast = make_net(), make_net()
    torch.manual_seed(0)
    REF.global_unstructured(params(m_ref), getattr(REF, method), amount=0.3)
    torch.manual_seed(0)
    assert FAST.global_unstructured(ITERABLES[kind](params(m_fast)), getattr(FAST, method), amount=0.3) is None
    assert_same_pruned_state(m_ref, m_fast)


def mask_holders(module):
    """(hook mask, own parameter) for every CustomFromMask in `module`'s hooks."""
    out = []
    for mod in module.modules():
        for _, h in pruning_hooks(mod):
            for x in (h if isinstance(h, REF.PruningContainer) else [h]):
                if type(x).__name__ == "CustomFromMask":
                    out.append((x.mask, getattr(mod, x._tensor_name + "_orig")))
    return out


class Uneven(nn.Module):
    def __init__(self):
        super().__init__()
        self.big = nn.Linear(100, 60)
        self.small = nn.Linear(2, 2)


def test_global_masks_hold_only_their_own_parameter():
    def prune_three_times(P, m):
        params = [(m.big, "weight"), (m.big, "bias"), (m.small, "weight"), (m.small, "bias")]
        for amount in (0.3, 0.3, 100):
            P.global_unstructured(params, P.L1Unstructured, amount=amount)

    total = sum(p.numel() for p in Uneven().parameters())
    m_ref = Uneven()
    prune_three_times(REF, m_ref)
    assert max(mask.untyped_storage().nbytes() for mask, _ in mask_holders(m_ref)) >= total * 4, \
        "the reference keeps a model-sized mask (the bug fixed here)"

    m = Uneven()
    prune_three_times(FAST, m)
    holders = mask_holders(m)
    assert len(holders) == 12
    for mask, param in holders:
        assert mask.untyped_storage().nbytes() == param.numel() * mask.element_size()
    for mod in (m.big, m.small):
        for name in ("weight", "bias"):
            buf = getattr(mod, name + "_mask")
            assert buf.untyped_storage().nbytes() == buf.numel() * buf.element_size()
    # so a pickled small layer carries no big mask
    assert len(pickle.dumps(m.small)) < len(pickle.dumps(m_ref.small)) - 3 * total


def test_global_first_prune_creates_one_mask_and_one_product_per_parameter():
    """The mask global_unstructured selects becomes the buffer itself (it is
    fastprune's own fresh tensor): per parameter, a first prune runs one
    multiplication (the pruned tensor), not a second one copying the mask."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMuls(TorchDispatchMode):
        muls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountMuls.muls += func in (torch.ops.aten.mul.Tensor, torch.ops.aten.mul.out)
            return func(*args, **(kwargs or {}))

    m = Uneven()
    m_ref = copy.deepcopy(m)
    params = [(m.big, "weight"), (m.big, "bias"), (m.small, "weight")]
    with CountMuls():
        FAST.global_unstructured(params, FAST.L1Unstructured, amount=0.3)
    assert CountMuls.muls == len(params)
    for mod, name in params:
        hook = next(h for h in mod._forward_pre_hooks.values() if h._tensor_name == name)
        assert hook.mask is getattr(mod, name + "_mask")
    REF.global_unstructured([(m_ref.big, "weight"), (m_ref.big, "bias"), (m_ref.small, "weight")],
                            REF.L1Unstructured, amount=0.3)
    assert_same_pruned_state(m_ref, m)


def test_global_on_meta_device():
    m = make_net().to("meta")
    params = [(m.conv, "weight"), (m.fc, "weight"), (m.fc, "bias"), (m.head, "weight")]
    with pytest.raises(NotImplementedError):
        REF.global_unstructured(params, REF.L1Unstructured, amount=0.3)
    m = make_net().to("meta")
    params = [(m.conv, "weight"), (m.fc, "weight"), (m.fc, "bias"), (m.head, "weight")]
    for method in (FAST.L1Unstructured, FAST.RandomUnstructured, FAST.L1Unstructured):
        FAST.global_unstructured(params, method, amount=0.3)
    for mod, name in params:
        mask, orig = getattr(mod, name + "_mask"), getattr(mod, name + "_orig")
        assert mask.device.type == "meta" and mask.shape == orig.shape and mask.dtype == orig.dtype
        assert getattr(mod, name).device.type == "meta"
    assert [t[:2] for t in hook_summary(m.fc)] == [("PruningContainer", "weight"), ("PruningContainer", "bias")]


def test_global_above_int32_elements_on_meta():
    with torch.device("meta"):
        big = nn.Linear(50_000, 50_000, bias=False)  # 2.5e9 > 2^31 elements
        small = nn.Linear(3, 2)
    params = [(big, "weight"), (small, "weight"), (small, "bias")]
    FAST.global_unstructured(params, FAST.L1Unstructured, amount=0.5)
    FAST.global_unstructured(params, FAST.L1Unstructured, amount=1000)
    assert big.weight_mask.shape == (50_000, 50_000) and big.weight_mask.device.type == "meta"
    assert small.bias_mask.shape == (2,)


PER_TENSOR_META = {
    "identity": lambda P, m: P.identity(m, "weight"),
    "l1": lambda P, m: P.l1_unstructured(m, "weight", 0.5),
    "random": lambda P, m: P.random_unstructured(m, "weight", 3),
    "random_structured": lambda P, m: P.random_structured(m, "weight", 1, 0),
    "ln": lambda P, m: P.ln_structured(m, "weight", 1, 2, 1),
    "custom": lambda P, m: P.custom_from_mask(m, "weight", torch.ones(4, 3, 3, 3, device="meta")),
}


@pytest.mark.parametrize("name", list(PER_TENSOR_META))
def test_per_tensor_methods_on_meta_like_reference(name):
    mods = {}
    for key, P in LIBS.items():
        m = make_conv().to("meta")
        PER_TENSOR_META[name](P, m)
        mods[key] = m
    r, f = mods["ref"], mods["fast"]
    assert list(f._parameters) == list(r._parameters) and list(f._buffers) == list(r._buffers)
    for n, b in r._buffers.items():
        assert f._buffers[n].dtype == b.dtype and f._buffers[n].shape == b.shape
        assert f._buffers[n].device.type == "meta"
    assert hook_summary(f) == hook_summary(r)


# ----------------------------------------------------------------------------
# A.3 ties: exactly k, max pruned <= min kept, deterministic, lower index first
# ----------------------------------------------------------------------------

def tied(shape, seed=0, levels=4):
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    vals = torch.randint(0, levels, (n,), generator=g).float() * 0.5
    sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    return (vals * sign).reshape(shape)


def check_tie_invariants(scores, mask_before, mask_after, k):
    cand = mask_before == 1
    pruned = cand & (mask_after == 0)
    kept = cand & (mask_after != 0)
    assert int(pruned.sum()) == k
    if pruned.any() and kept.any():
        assert scores.abs()[pruned].max() <= scores.abs()[kept].min()


TIE_SHAPES = {"linear": (5, 6), "conv": (4, 3, 3, 3), "large": (300, 200)}


@pytest.mark.parametrize("amount", [0.3, 0.5, 7, 1])
@pytest.mark.parametrize("shape,layout", [("linear", "contiguous"), ("conv", "contiguous"),
                                          ("conv", "channels_last"), ("large", "contiguous")])
def test_l1_ties(shape, layout, amount):
    shp = TIE_SHAPES[shape]
    w = tied(shp, levels=3 if shape == "large" else 4)
    results = []
    saved = torch.get_num_threads()
    try:
        for nthreads in (saved, 1, 3):  # same answer for any thread count
            torch.set_num_threads(nthreads)
            m = nn.Module()
            m.weight = nn.Parameter(w.clone() if layout == "contiguous"
                                    else w.contiguous(memory_format=torch.channels_last))
            FAST.l1_unstructured(m, "weight", amount)
            results.append(m.weight_mask)
    finally:
        torch.set_num_threads(saved)
    k = amount if isinstance(amount, int) else round(amount * w.numel())
    check_tie_invariants(w, torch.ones_like(w), results[0], k)
    for other in results[1:]:
        assert_mask_equal(other, results[0])
    assert_mask_equal(results[0], select_oracle(w, torch.ones_like(w), count=k).contiguous())


def test_l1_ties_in_container_and_with_importance_scores():
    w, s = tied((6, 7), seed=1), tied((6, 7), seed=2)
    m = nn.Module()
    m.weight = nn.Parameter(w.clone())
    FAST.l1_unstructured(m, "weight", 10, importance_scores=s)
    first = select_oracle(s, torch.ones_like(s), count=10)
    assert_mask_equal(m.weight_mask, first)
    FAST.l1_unstructured(m, "weight", 0.5, importance_scores=s)
    second = select_oracle(s, first, fraction=0.5, only_ones=True)
    assert_mask_equal(m.weight_mask, second)
    check_tie_invariants(s, first, second, round(0.5 * 32))
    # default scores in the container: the cached pruned tensor
    FAST.l1_unstructured(m, "weight", 4)
    assert_mask_equal(m.weight_mask, select_oracle(w * second, second, count=4, only_ones=True))


def test_global_ties_follow_parameter_order_then_flat_index():
    m = make_net()
    with torch.no_grad():
        for i, p in enumerate(m.parameters()):
            p.copy_(tied(tuple(p.shape), seed=i))
    params = [(m.fc, "weight"), (m.conv, "weight"), (m.head, "weight"), (m.fc, "bias")]
    scores = torch.cat([getattr(mod, n).detach().reshape(-1) for mod, n in params])
    FAST.global_unstructured(params, FAST.L1Unstructured, amount=0.45)
    got = torch.cat([getattr(mod, n + "_mask").reshape(-1) for mod, n in params])
    exp = select_oracle(scores, torch.ones_like(scores), fraction=0.45)
    assert_mask_equal(got, exp)
    check_tie_invariants(scores, torch.ones_like(scores), got, round(0.45 * scores.numel()))


@pytest.mark.parametrize("n", [1, 2, float("inf"), 0])
def test_ln_structured_ties(n):
    w = tied((6, 4, 3), seed=3, levels=2)  # values in {0, +-0.5}: many equal channel norms
    results = []
    for _ in range(2):
        m = nn.Module()
        m.weight = nn.Parameter(w.clone())
        FAST.ln_structured(m, "weight", 3, n, 0)
        results.append(m.weight_mask)
    assert_mask_equal(results[1], results[0])
    norms = torch.norm(w, p=n, dim=[1, 2])
    pruned = results[0].sum(dim=[1, 2]) == 0
    assert int(pruned.sum()) == 3
    assert norms[pruned].max() <= norms[~pruned].min()
