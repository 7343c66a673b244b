"""Interoperation with torch.nn.utils.prune (docs/behaviour.md §Interop,
§Custom methods): either library's is_pruned/remove on the other's modules,
both libraries on one tensor, user subclasses. (Serialization, copying and
torch.compile: test_serialization.py.)"""
from unittest import mock

import pytest
import torch

from conftest import (
    FAST, LIBS, REF, assert_mask_equal, assert_same_pruned_state, channel_separated, each_lib, every_other,
    example_input, lib_context, make_linear, make_net, pruning_hooks, tie_free,
)

# Each test runs with fastprune imported directly and reached through
# torch.nn.utils.prune under fastprune.patch() (conftest.fast_impl).
pytestmark = pytest.mark.usefixtures("fast_impl")

CLASSES = ["Identity", "RandomUnstructured", "L1Unstructured", "RandomStructured", "LnStructured",
           "CustomFromMask", "PruningContainer"]


@pytest.mark.parametrize("name", CLASSES)
def test_classes_are_reference_subclasses(name):
    assert issubclass(getattr(FAST, name), REF.BasePruningMethod)
    assert issubclass(FAST.BasePruningMethod, REF.BasePruningMethod)
    assert issubclass(FAST.PruningContainer, REF.PruningContainer)


def net_conv_separated():
    m = make_net()
    with torch.no_grad():
        m.conv.weight.copy_(channel_separated((4, 3, 3, 3), 0, seed=1) * 3 + 0.001)
    return m


PRUNES = {
    "l1": lambda P, m: P.l1_unstructured(m.fc, "weight", 0.4),
    "random": lambda P, m: P.random_unstructured(m.fc, "weight", 0.4),
    "ln": lambda P, m: P.ln_structured(m.conv, "weight", 1, 2, 0),
    "custom": lambda P, m: P.custom_from_mask(m.fc, "weight", tie_free((5, 16)) > 0),
    "container": lambda P, m: (P.l1_unstructured(m.fc, "weight", 0.2), P.random_structured(m.fc, "weight", 1, 0),
                               P.identity(m.fc, "weight")),
    "global": lambda P, m: P.global_unstructured([(m.conv, "weight"), (m.fc, "weight")], P.L1Unstructured,
                                                 amount=0.3),
}


@pytest.mark.parametrize("prune_lib,remove_lib", [("fast", "ref"), ("ref", "fast")])
@pytest.mark.parametrize("name", list(PRUNES))
def test_is_pruned_and_remove_across_libraries(name, prune_lib, remove_lib):
    """Pruned with one library, inspected and removed with the other: the
    same result as using the reference throughout."""
    mixed, pure = net_conv_separated(), net_conv_separated()
    torch.manual_seed(0)
    with lib_context(prune_lib):
        PRUNES[name](LIBS[prune_lib], mixed)
    torch.manual_seed(0)
    PRUNES[name](REF, pure)
    other = LIBS[remove_lib]
    with lib_context(remove_lib):
        assert other.is_pruned(mixed) is True
    for mod_name in ("conv", "fc"):
        for key, P, m in ((remove_lib, other, mixed), ("ref", REF, pure)):
            mod = getattr(m, mod_name)
            if pruning_hooks(mod):
                with lib_context(key):
                    assert P.remove(mod, "weight") is mod
    with lib_context(remove_lib):
        assert other.is_pruned(mixed) is False
    assert_same_pruned_state(pure, mixed)


# Steps on one tensor (fc.weight) taking turns between the libraries.
STEP = {
    "l1": lambda P, m: P.l1_unstructured(m.fc, "weight", 0.3),
    "l1_int": lambda P, m: P.l1_unstructured(m.fc, "weight", 4),
    "random": lambda P, m: P.random_unstructured(m.fc, "weight", 0.3),
    "ln": lambda P, m: P.ln_structured(m.fc, "weight", 1, 2, 0),
    "random_structured": lambda P, m: P.random_structured(m.fc, "weight", 2, 1),
    "custom": lambda P, m: P.custom_from_mask(m.fc, "weight", tie_free((5, 16), seed=3) > -0.4),
    "identity": lambda P, m: P.identity(m.fc, "weight"),
    "global": lambda P, m: P.global_unstructured([(m.fc, "weight"), (m.conv, "weight")], P.L1Unstructured,
                                                 amount=0.25),
}

MIXES = [
    [("ref", "l1"), ("fast", "l1")],
    [("fast", "l1"), ("ref", "l1")],
    [("ref", "ln"), ("fast", "l1_int"), ("ref", "random")],
    [("fast", "random_structured"), ("ref", "l1"), ("fast", "ln")],
    [("fast", "custom"), ("ref", "l1")],
    [("ref", "custom"), ("fast", "l1"), ("fast", "random")],
    [("ref", "identity"), ("fast", "identity"), ("ref", "l1_int")],
    [("ref", "global"), ("fast", "global")],
    [("fast", "global"), ("ref", "l1"), ("fast", "global")],
]


@pytest.mark.parametrize("mix", MIXES, ids=["-".join(f"{lib}:{s}" for lib, s in mix) for mix in MIXES])
def test_both_libraries_on_one_tensor(mix):
    mixed, pure = make_net(), make_net()
    for i, (lib, step) in enumerate(mix):
        torch.manual_seed(i)
        with lib_context(lib):
            STEP[step](LIBS[lib], mixed)
        torch.manual_seed(i)
        STEP[step](REF, pure)
        assert_same_pruned_state(pure, mixed)
    hooks = pruning_hooks(mixed.fc)
    assert len(hooks) == 1
    container = hooks[0][1]
    assert isinstance(container, REF.PruningContainer) and len(container) == len(mix)
    x = example_input(mixed)
    torch.testing.assert_close(mixed(x), pure(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------
# User subclasses of either library's BasePruningMethod
# ----------------------------------------------------------------------------

def threshold(P):
    class Threshold(P.BasePruningMethod):
        """Tutorial pattern: prune |t| <= threshold; returns a bool mask."""
        PRUNING_TYPE = "unstructured"

        def __init__(self, threshold):
            self.threshold = threshold

        def compute_mask(self, t, default_mask):
            return torch.abs(t) > self.threshold
    return Threshold


def channel_drop(P):
    class FirstChannel(P.BasePruningMethod):
        """A structured user method: drop the first remaining channel."""
        PRUNING_TYPE = "structured"

        def __init__(self, dim=0):
            self.dim = dim

        def compute_mask(self, t, default_mask):
            mask = default_mask.clone()
            mask.select(self.dim, 0).zero_()
            return mask
    return FirstChannel


@pytest.mark.parametrize("base", ["ref", "fast"])
def test_user_methods_in_fastprune_container(base):
    B = LIBS[base]
    users = [lambda P, m: every_other(B).apply(m.fc, "weight"),
             lambda P, m: threshold(B).apply(m.fc, "weight", threshold=0.3),
             lambda P, m: channel_drop(B).apply(m.fc, "weight", dim=1)]
    for user in users:
        mods = {}
        for key, P in each_lib():
            m = make_net()
            P.l1_unstructured(m.fc, "weight", 0.3)   # the first hook comes from library P
            user(P, m)
            P.l1_unstructured(m.fc, "weight", 5)     # and library P prunes again on top
            mods[key] = m
        assert_same_pruned_state(mods["ref"], mods["fast"])
        assert len(pruning_hooks(mods["fast"].fc)[0][1]) == 3


@pytest.mark.parametrize("base", ["ref", "fast"])
def test_user_method_in_container_compute_mask(base):
    t = tie_free((5, 6))
    default = (tie_free((5, 6), seed=1) > -0.5).float()
    outs = {}
    for key, P in each_lib():
        for make in (every_other, threshold, channel_drop):
            cls = make(LIBS[base])
            meth = cls(0.2) if make is threshold else cls()
            meth._tensor_name = "w"
            outs[key, make.__name__] = P.PruningContainer(meth).compute_mask(t, default_mask=default.clone())
    for make in (every_other, threshold, channel_drop):
        assert_mask_equal(outs["fast", make.__name__], outs["ref", make.__name__])


@pytest.mark.parametrize("base", ["ref", "fast"])
def test_user_methods_in_global_unstructured(base):
    B = LIBS[base]
    for cls, kwargs in ((every_other(B), {}), (threshold(B), {"threshold": 0.4})):
        mods = {}
        for key, P in each_lib():
            m = make_net()
            params = [(m.conv, "weight"), (m.fc, "weight"), (m.fc, "bias")]
            P.global_unstructured(params, cls, **kwargs)
            P.global_unstructured(params, cls, **kwargs)
            mods[key] = m
        assert_same_pruned_state(mods["ref"], mods["fast"])
    with pytest.raises(TypeError, match='Only "unstructured" PRUNING_TYPE supported'):
        FAST.global_unstructured([(make_net().fc, "weight")], channel_drop(B))


def test_subclass_of_fastprune_method():
    """Subclassing a fastprune method and calling super() keeps its behaviour."""
    calls = []

    class LoggedL1(FAST.L1Unstructured):
        def compute_mask(self, t, default_mask):
            calls.append((tuple(t.shape), tuple(default_mask.shape)))
            return super().compute_mask(t, default_mask)

    m, ref = make_linear(), make_linear()
    LoggedL1.apply(m, "weight", 0.3)
    LoggedL1.apply(m, "weight", 0.5)
    REF.l1_unstructured(ref, "weight", 0.3)
    REF.l1_unstructured(ref, "weight", 0.5)
    assert calls == [((5, 6), (5, 6)), ((21,), (21,))]
    assert_mask_equal(m.weight_mask, ref.weight_mask)


def test_compute_mask_is_looked_up_and_called_with_keyword_default_mask():
    """The upstream tests mock `prune.<Cls>.compute_mask` (docs/behaviour.md §Surface)."""
    m = make_linear()
    with mock.patch.object(FAST.L1Unstructured, "compute_mask", autospec=True,
                           side_effect=lambda self, t, default_mask: default_mask) as cm:
        FAST.l1_unstructured(m, "weight", 0.5)
        cm.assert_called_once()
        assert set(cm.call_args.kwargs) == {"default_mask"} and len(cm.call_args.args) == 2
        FAST.l1_unstructured(m, "weight", 0.5)  # in the container: t[slc], default_mask=mask[slc]
        assert cm.call_count == 2
        args, kwargs = cm.call_args
        assert args[1].shape == (30,) and kwargs["default_mask"].shape == (30,)
    with mock.patch.object(FAST.LnStructured, "compute_mask", autospec=True,
                           side_effect=lambda self, t, default_mask: default_mask) as cm:
        FAST.ln_structured(m, "weight", 1, 2, 0)
        cm.assert_called_once()
        assert "default_mask" in cm.call_args.kwargs

