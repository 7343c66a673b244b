"""Serialization, copying, compilation and training of pruned models
(docs/behaviour.md §Serialization, §Differences; issue #6): state_dict round
trips within and across the two libraries, torch.save/torch.load and pickle of
whole models, copy.deepcopy, torch.compile, and optimizer steps on pruned
models."""
import copy
import importlib
import io
import pickle

import pytest
import torch
import torch.nn as nn

from conftest import (
    FAST, LIBS, REF, Net, assert_mask_equal, assert_same_pruned_state, channel_separated, example_input,
    hook_summary, make_linear, make_net, normalize_message, pruning_hooks, tie_free,
)


def net(seed=0):
    """make_net(seed) whose conv channels have strictly ordered norms, no
    magnitude shared with another parameter (for ln_structured)."""
    m = make_net(seed=seed)
    with torch.no_grad():
        m.conv.weight.copy_(channel_separated((4, 3, 3, 3), 0, seed=seed + 1) * 3 + 0.001)
    return m


ALL = lambda m: [(m.conv, "weight"), (m.fc, "weight"), (m.fc, "bias"), (m.head, "weight")]  # noqa: E731

# Each recipe prunes fc.weight (among others); random ones draw the same
# numbers in both libraries (seeded by `pruned`).
RECIPES = {
    "l1": lambda P, m: P.l1_unstructured(m.fc, "weight", 0.4),
    "mixed": lambda P, m: (P.l1_unstructured(m.fc, "weight", 0.4), P.ln_structured(m.conv, "weight", 1, 2, 0),
                           P.l1_unstructured(m.conv, "weight", 5),
                           P.global_unstructured([(m.fc, "bias"), (m.head, "weight")], P.L1Unstructured,
                                                 amount=0.3)),
    "containers": lambda P, m: (P.l1_unstructured(m.fc, "weight", 0.3), P.random_structured(m.fc, "weight", 1, 0),
                                P.custom_from_mask(m.head, "weight", tie_free((3, 5)) > -0.3),
                                P.random_unstructured(m.head, "weight", 2), P.identity(m.conv, "weight"),
                                P.ln_structured(m.conv, "weight", 1, 1, 0)),
    "global_twice": lambda P, m: (P.global_unstructured(ALL(m), P.L1Unstructured, amount=0.3),
                                  P.global_unstructured(ALL(m), P.L1Unstructured, amount=0.3)),
    "global_random": lambda P, m: P.global_unstructured(ALL(m), P.RandomUnstructured, amount=40),
    # the reference prunes first, then the library under test on top
    "both_libraries": lambda P, m: (REF.l1_unstructured(m.fc, "weight", 0.3), P.ln_structured(m.fc, "weight", 1, 2, 0),
                                    REF.identity(m.head, "weight"), P.l1_unstructured(m.head, "weight", 4)),
}


def pruned(P, recipe, seed=0, grad=True, device="cpu"):
    m = net(seed).to(device)
    torch.manual_seed(seed)
    with torch.set_grad_enabled(grad):
        RECIPES[recipe](P, m)
    return m


def round_trip(m, how):
    if how == "pickle":
        return pickle.loads(pickle.dumps(m))
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def hook_types(m):
    return [type(h) for mod in m.modules() for _, h in pruning_hooks(mod)]


# ----------------------------------------------------------------------------
# state_dict
# ----------------------------------------------------------------------------

def test_state_dict_keys_like_reference():
    ref, fast = pruned(REF, "mixed"), pruned(FAST, "mixed")
    assert list(fast.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert_mask_equal(fast.state_dict()[k], v)
    lin = make_linear()
    FAST.l1_unstructured(lin, "weight", 0.5)
    assert list(lin.state_dict()) == ["bias", "weight_orig", "weight_mask"]


def test_load_state_dict_into_unpruned_model_needs_identity_first():
    fast = pruned(FAST, "mixed")
    fresh = make_net()
    with pytest.raises(RuntimeError, match='Missing key\\(s\\) in state_dict: "conv.weight"'):
        fresh.load_state_dict(fast.state_dict())
    for mod, name in ALL(fresh):
        FAST.identity(mod, name)
    fresh.load_state_dict(fast.state_dict())
    x = example_input(fresh)
    torch.testing.assert_close(fresh(x), fast(x), rtol=0, atol=0)
    torch.testing.assert_close(fresh.fc.weight, fast.fc.weight, rtol=0, atol=0)


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("src,dst", [("ref", "fast"), ("fast", "ref"), ("fast", "fast")])
def test_state_dict_across_libraries(src, dst, recipe):
    """A checkpoint of a model pruned by one library, loaded into the same
    architecture pruned by the other (other weights, so other masks): after a
    forward it serves the checkpoint's model, exactly as when both sides are
    the reference, and prunes on like it."""
    x = example_input(net())
    source = pruned(LIBS[src], recipe)
    target = pruned(LIBS[dst], recipe, seed=1)
    pure_source, pure_target = pruned(REF, recipe), pruned(REF, recipe, seed=1)
    assert any(not torch.equal(a, b) for a, b in zip(source.buffers(), target.buffers())), "masks differ before"
    target.load_state_dict(source.state_dict())
    pure_target.load_state_dict(pure_source.state_dict())
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    pure_target(x)
    for b, b_src in zip(target.buffers(), source.buffers()):
        assert_mask_equal(b, b_src)
    assert_same_pruned_state(pure_target, target)
    for P, m in ((LIBS[dst], target), (REF, pure_target)):
        P.l1_unstructured(m.fc, "weight", 3)
        P.global_unstructured(ALL(m), P.L1Unstructured, amount=10)
    assert_same_pruned_state(pure_target, target)


# ----------------------------------------------------------------------------
# Whole models: pickle, torch.save/torch.load
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("grad", [True, False], ids=["grad_mode", "no_grad"])
@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_round_trip(how, recipe, grad):
    fast = pruned(FAST, recipe, grad=grad)
    loaded = round_trip(fast, how)
    assert_same_pruned_state(fast, loaded, autograd=False)
    assert_same_pruned_state(pruned(REF, recipe, grad=grad), loaded, autograd=False)
    assert hook_summary(loaded.conv) == hook_summary(fast.conv)
    assert hook_types(loaded) == hook_types(fast)
    x = example_input(fast)
    torch.testing.assert_close(loaded(x), fast(x), rtol=0, atol=0)
    # the loaded model prunes on like the original
    FAST.l1_unstructured(loaded.fc, "weight", 3)
    FAST.l1_unstructured(fast.fc, "weight", 3)
    FAST.global_unstructured(ALL(loaded), FAST.L1Unstructured, amount=7)
    FAST.global_unstructured(ALL(fast), FAST.L1Unstructured, amount=7)
    assert_same_pruned_state(fast, loaded, autograd=False)
    # and its hooks act on the loaded parameters
    for p in fast.parameters():
        p.grad = None
    loaded(x).sum().backward()
    assert loaded.fc.weight_orig.grad is not None and fast.fc.weight_orig.grad is None
    assert (loaded.fc.weight_orig.grad[loaded.fc.weight_mask == 0] == 0).all()


def refused_globals(buf, allowed):
    """The globals torch.load(weights_only=True) refuses one after another
    (each then allowlisted), and the model it finally loads."""
    refused = []
    while True:
        buf.seek(0)
        try:
            with torch.serialization.safe_globals(allowed + refused):
                return [normalize_message(g.__module__ + "." + g.__name__) for g in refused], torch.load(buf)
        except pickle.UnpicklingError as e:
            module, _, name = str(e).split("Unsupported global: GLOBAL ")[1].split(" ")[0].rpartition(".")
            refused.append(getattr(importlib.import_module(module), name))
            assert len(refused) < 10, refused


@pytest.mark.parametrize("recipe", ["mixed", "containers", "both_libraries"])
def test_torch_load_weights_only(recipe):
    """docs/behaviour.md §Serialization: the default torch.load
    (weights_only=True) refuses the hook classes of both libraries alike;
    allowlisted, they load. A state_dict is plain tensors and loads as it
    is."""
    out = {}
    for key, P in LIBS.items():
        m = pruned(P, recipe)
        buf = io.BytesIO()
        torch.save(m, buf)
        with pytest.raises(pickle.UnpicklingError, match="weights_only"):
            buf.seek(0)
            torch.load(buf)
        out[key] = refused_globals(buf, [Net, nn.Conv2d, nn.Linear])
        assert_same_pruned_state(m, out[key][1], autograd=False)
        buf = io.BytesIO()
        torch.save(m.state_dict(), buf)
        buf.seek(0)
        target = pruned(P, recipe, seed=1)
        target.load_state_dict(torch.load(buf, weights_only=True))
        x = example_input(m)
        torch.testing.assert_close(target(x), m(x), rtol=0, atol=0)
    assert set(out["fast"][0]) == set(out["ref"][0])  # both_libraries: fastprune's and the reference's L1
    assert any(".L1Unstructured" in g for g in out["fast"][0])


def test_pickled_reference_model_prunes_on_with_fastprune():
    """A model pruned and saved with the reference, loaded and pruned further
    with fastprune: as if the reference had done it all."""
    loaded, ref = round_trip(pruned(REF, "mixed"), "torch.save"), pruned(REF, "mixed")
    FAST.l1_unstructured(loaded.fc, "weight", 4)
    FAST.global_unstructured(ALL(loaded), FAST.L1Unstructured, amount=0.2)
    REF.l1_unstructured(ref.fc, "weight", 4)
    REF.global_unstructured(ALL(ref), REF.L1Unstructured, amount=0.2)
    assert_same_pruned_state(ref, loaded, autograd=False)


# ----------------------------------------------------------------------------
# copy.deepcopy
# ----------------------------------------------------------------------------

def test_deepcopy_under_no_grad_like_reference():
    mods = {}
    for key, P in LIBS.items():
        mods[key] = copy.deepcopy(pruned(P, "mixed", grad=False))
    assert_same_pruned_state(mods["ref"], mods["fast"])


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_deepcopy_under_grad_mode(recipe):
    """docs/behaviour.md §Differences (pytorch#37322): the copy equals the
    reference's copy of the model pruned under no_grad, and is independent of
    the original."""
    fast = pruned(FAST, recipe)
    if recipe != "both_libraries":  # there the last prune of each tensor is fastprune's
        with pytest.raises(RuntimeError, match="Only Tensors created explicitly by the user"):
            copy.deepcopy(pruned(REF, recipe))
    fast_copy = copy.deepcopy(fast)
    assert_same_pruned_state(copy.deepcopy(pruned(REF, recipe, grad=False)), fast_copy)
    x = example_input(fast)
    torch.testing.assert_close(fast_copy(x), fast(x), rtol=0, atol=0)
    FAST.l1_unstructured(fast_copy.fc, "weight", 5)
    assert not torch.equal(fast_copy.fc.weight_mask, fast.fc.weight_mask)


def test_deepcopy_of_model_and_optimizer_after_a_step():
    """Checkpointing by deepcopy((model, optimizer)) under grad mode: the
    copied optimizer steps the copied parameters, and both pairs train on
    identically."""
    m = pruned(FAST, "mixed")
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    x = example_input(m)
    step(m, opt, x)
    m(x)  # the cached pruned tensors are non-leaf again
    m2, opt2 = copy.deepcopy((m, opt))
    assert {id(p) for g in opt2.param_groups for p in g["params"]} == {id(p) for p in m2.parameters()}
    for pair in ((m, opt), (m2, opt2)):
        step(*pair, x)
    torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)
    assert not ({id(p) for p in m.parameters()} & {id(p) for p in m2.parameters()})


def test_deepcopy_of_a_loaded_model():
    loaded = round_trip(pruned(FAST, "mixed"), "pickle")
    x = example_input(loaded)
    loaded(x)  # grad mode: non-leaf cached tensors
    copied = copy.deepcopy(loaded)
    assert_same_pruned_state(loaded, copied, autograd=False)
    torch.testing.assert_close(copied(x), loaded(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------

def test_torch_compile_of_pruned_module():
    fast = pruned(FAST, "mixed")
    ref = pruned(REF, "mixed")
    compiled = torch.compile(fast, backend="eager")
    x = example_input(fast)
    torch.testing.assert_close(compiled(x), ref(x), rtol=0, atol=0)
    torch.testing.assert_close(compiled(x * 2), ref(x * 2), rtol=0, atol=0)


def test_torch_compile_backward_and_reprune():
    check_compiled_backward_and_reprune("cpu")


def check_compiled_backward_and_reprune(device):
    """aot_eager traces the forward pre-hooks and the backward: gradients
    like the reference's eager ones, and a re-prune of the compiled module is
    seen by its next call (test_cuda_prune.py runs this on the GPU)."""
    torch._dynamo.reset()
    fast, ref = pruned(FAST, "global_twice", device=device), pruned(REF, "global_twice", device=device)
    compiled = torch.compile(fast, backend="aot_eager")
    x = example_input(fast)
    y, y_ref = compiled(x), ref(x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    y.sum().backward()
    y_ref.sum().backward()
    for (n, p), (_, p_ref) in zip(fast.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, msg=n)
    FAST.l1_unstructured(fast.fc, "weight", 10)
    REF.l1_unstructured(ref.fc, "weight", 10)
    torch.testing.assert_close(compiled(x), ref(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------

def step(m, opt, x):
    opt.zero_grad()
    (m(x) ** 2).mean().backward()
    for name, p in m.named_parameters():
        if name.endswith("_orig"):
            mask = m.get_buffer(name[:-len("_orig")] + "_mask")
            assert (p.grad[mask == 0] == 0).all(), f"{name}: gradient on pruned entries"
    opt.step()


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.5, weight_decay=0.01),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_training_after_pruning(recipe, optimizer):
    """A few steps, a prune without a forward in between (stale default
    scores, docs/behaviour.md §Apply), more steps, then remove: the
    fastprune model stays bit for bit equal to its reference twin, and the pruned entries of every
    `_orig` get zero gradient."""
    mods = {key: pruned(P, recipe) for key, P in LIBS.items()}
    opts = {key: OPTIMIZERS[optimizer](m.parameters()) for key, m in mods.items()}
    g = torch.Generator().manual_seed(7)
    for i in range(6):
        x = torch.randn(4, 3, 4, 4, generator=g)
        for key in LIBS:
            step(mods[key], opts[key], x)
        if i == 2:
            for P, m in ((LIBS[key], mods[key]) for key in LIBS):
                P.l1_unstructured(m.fc, "weight", 0.2)
                P.ln_structured(m.conv, "weight", 1, 2, 0)
        assert_same_pruned_state(mods["ref"], mods["fast"])
        y = mods["fast"](x)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, mods["ref"](x), rtol=0, atol=0)
    for key, P in LIBS.items():
        for mod, name in ALL(mods[key]):
            if pruning_hooks(mod):
                P.remove(mod, name)
    assert_same_pruned_state(mods["ref"], mods["fast"])
