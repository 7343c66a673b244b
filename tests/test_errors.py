"""Every error of the reference (docs/behaviour.md §Errors): fastprune raises
the reference's exception class with the reference's message on the same bad
input, and leaves the module exactly as it was (on a 2nd or later prune too,
where the reference loses the hook, so only fastprune's state is checked
there)."""
import pytest
import torch
import torch.nn as nn

from conftest import (
    FAST, LIBS, assert_same_pruned_state, assert_same_snapshot, example_input, fill_tie_free,
    make_conv, make_linear, make_net, normalize_message, snapshot, tie_free,
)


def user_hook(module, inputs):
    return None


def user_hook_2(module, inputs):
    return None


def raised(call, P, m):
    with pytest.raises(Exception) as info:
        call(P, m)
    return type(info.value), normalize_message(info.value)


def run_error(make, setup, call, exc_type, fragment):
    """Runs `call` on a fresh module per library (after `setup`, with user
    hooks registered before and after it); both must raise the same class and
    message, and fastprune's module must be exactly unchanged. (The
    reference's is not checked: its rollback of a failed first prune moves the
    parameter to the end of `_parameters`, and a failed later prune loses the
    hook.)"""
    results = {}
    for key, P in LIBS.items():
        m = make()
        m.register_forward_pre_hook(user_hook)
        if setup is not None:
            setup(P, m)
        m.register_forward_pre_hook(user_hook_2)
        before = snapshot(m)
        results[key] = raised(call, P, m)
        if key == "fast":
            assert_same_snapshot(before, snapshot(m))
            m(example_input(m))  # still usable
    assert results["ref"][0] is exc_type, results["ref"]
    assert fragment in results["ref"][1], results["ref"]
    assert results["fast"] == results["ref"]
    return results


# ----------------------------------------------------------------------------
# First prune: nothing changes in either library
# ----------------------------------------------------------------------------

BAD_AMOUNTS = [("0.5", TypeError, "Invalid type for amount"), (None, TypeError, "Invalid type for amount"),
               (torch.tensor(0.5), TypeError, "Invalid type for amount"), ([0.5], TypeError, "Invalid type"),
               (-1, ValueError, "should either be a float in the range [0, 1] or a non-negative integer"),
               (1.1, ValueError, "amount=1.1 should either be"), (2.0, ValueError, "amount=2.0 should either be"),
               (-0.1, ValueError, "amount=-0.1 should either be")]

AMOUNT_CALLS = {
    "l1": lambda a: lambda P, m: P.l1_unstructured(m, "weight", a),
    "random": lambda a: lambda P, m: P.random_unstructured(m, "weight", a),
    "random_structured": lambda a: lambda P, m: P.random_structured(m, "weight", a, 0),
    "ln": lambda a: lambda P, m: P.ln_structured(m, "weight", a, 2, 0),
    "L1Unstructured()": lambda a: lambda P, m: P.L1Unstructured(a),
    "RandomUnstructured()": lambda a: lambda P, m: P.RandomUnstructured(a),
    "RandomStructured()": lambda a: lambda P, m: P.RandomStructured(a),
    "LnStructured()": lambda a: lambda P, m: P.LnStructured(a, 1),
}


def first_call_cases():
    cases = []
    for name, mk in AMOUNT_CALLS.items():
        for amount, exc, frag in BAD_AMOUNTS:
            cases.append((f"{name}-amount={amount!r}", make_linear, None, mk(amount), exc, frag))
    too_many = "should be smaller than the number of parameters to prune="
    cases += [
        ("l1_int_above_numel", make_linear, None, lambda P, m: P.l1_unstructured(m, "weight", 31), ValueError,
         "amount=31 " + too_many + "30"),
        ("random_int_above_numel", make_linear, None, lambda P, m: P.random_unstructured(m, "bias", 6), ValueError,
         too_many + "5"),
        ("random_structured_int_above", make_linear, None, lambda P, m: P.random_structured(m, "weight", 6, 0),
         ValueError, too_many + "5"),
        ("ln_int_above", make_linear, None, lambda P, m: P.ln_structured(m, "weight", 7, 1, -1), ValueError,
         too_many + "6"),
        ("l1_amount_true", make_linear, None, lambda P, m: P.l1_unstructured(m, "weight", True), TypeError,
         "topk(): argument 'k' must be int, not bool"),
        ("random_amount_true", make_linear, None, lambda P, m: P.random_unstructured(m, "weight", True), TypeError,
         "topk(): argument 'k' must be int, not bool"),
        ("random_structured_amount_true", make_linear, None,
         lambda P, m: P.random_structured(m, "weight", True, 0), TypeError, "kthvalue(): argument 'k'"),
        ("l1_importance_shape", make_linear, None,
         lambda P, m: P.l1_unstructured(m, "weight", 0.5, importance_scores=torch.ones(6, 5)), AssertionError,
         "importance_scores should have the same shape as parameter weight of Linear("),
        ("ln_importance_shape", make_linear, None,
         lambda P, m: P.ln_structured(m, "weight", 1, 2, 0, importance_scores=torch.ones(5)), AssertionError,
         "got torch.Size([5]) vs torch.Size([5, 6])"),
        ("apply_importance_shape", make_linear, None,
         lambda P, m: P.L1Unstructured.apply(m, "bias", 1, importance_scores=torch.ones(1, 5)), AssertionError,
         "importance_scores should have the same shape"),
        ("buffer_l1", lambda: nn.BatchNorm1d(4), None, lambda P, m: P.l1_unstructured(m, "running_mean", 0.5),
         TypeError, "cannot assign 'torch.FloatTensor' object to parameter 'running_mean_orig'"),
        ("buffer_identity", lambda: nn.BatchNorm1d(4), None, lambda P, m: P.identity(m, "running_var"),
         TypeError, "(torch.nn.Parameter or None required)"),
        ("missing_attribute", make_linear, None, lambda P, m: P.l1_unstructured(m, "nothing", 0.5),
         AttributeError, "'Linear' object has no attribute 'nothing'"),
        ("ln_1d", make_linear, None, lambda P, m: P.ln_structured(m, "bias", 1, 2, 0), ValueError,
         "Structured pruning can only be applied to multidimensional tensors. Found tensor of shape torch.Size([5]) with 1 dims"),
        ("random_structured_1d", make_linear, None, lambda P, m: P.random_structured(m, "bias", 1, -1), ValueError,
         "Structured pruning can only be applied"),
        ("ln_dim_too_large", make_linear, None, lambda P, m: P.ln_structured(m, "weight", 1, 2, 2), IndexError,
         "Invalid index 2 for tensor of size torch.Size([5, 6])"),
        ("random_structured_dim_too_large", make_conv, None, lambda P, m: P.random_structured(m, "weight", 1, 4),
         IndexError, "Invalid index 4 for tensor of size torch.Size([4, 3, 3, 3])"),
        ("ln_dim_too_negative", make_linear, None, lambda P, m: P.ln_structured(m, "weight", 1, 2, -3), IndexError,
         "tuple index out of range"),
        ("random_structured_dim_too_negative", make_conv, None,
         lambda P, m: P.random_structured(m, "weight", 1, -5), IndexError, "tuple index out of range"),
        ("ln_nuc", make_conv, None, lambda P, m: P.ln_structured(m, "weight", 1, "nuc", 0), RuntimeError,
         "linalg.matrix_norm: dim must be a 2-tuple"),
        ("ln_fro_4d", make_conv, None, lambda P, m: P.ln_structured(m, "weight", 1, "fro", 1), RuntimeError,
         "linalg.matrix_norm: dim must be a 2-tuple"),
        ("custom_shape", make_linear, None, lambda P, m: P.custom_from_mask(m, "weight", torch.ones(6, 5)),
         AssertionError, "default_mask shape torch.Size([5, 6]) must match self.mask shape torch.Size([6, 5])"),
        ("multiple_hooks", make_linear, add_two_hooks, lambda P, m: P.l1_unstructured(m, "weight", 0.2),
         AssertionError, "Avoid adding multiple pruning hooks to the same tensor weight of module Linear("),
        ("remove_unpruned", make_linear, None, lambda P, m: P.remove(m, "weight"), ValueError,
         "Parameter 'weight' of module Linear(in_features=6, out_features=5, bias=True) has to be pruned before "
         "pruning can be removed"),
        ("remove_other_name", make_linear, lambda P, m: P.l1_unstructured(m, "weight", 0.3),
         lambda P, m: P.remove(m, "bias"), ValueError, "Parameter 'bias' of module"),
        ("remove_twice", make_linear, lambda P, m: (P.l1_unstructured(m, "weight", 0.3), P.remove(m, "weight")),
         lambda P, m: P.remove(m, "weight"), ValueError, "has to be pruned before pruning can be removed"),
    ]
    return cases


def add_two_hooks(P, m):
    P.l1_unstructured(m, "weight", 0.2)
    extra = P.Identity()
    extra._tensor_name = "weight"
    m.register_forward_pre_hook(extra)


FIRST = first_call_cases()


@pytest.mark.parametrize("make,setup,call,exc,fragment", [c[1:] for c in FIRST], ids=[c[0] for c in FIRST])
def test_first_call_error(make, setup, call, exc, fragment):
    run_error(make, setup, call, exc, fragment)


# ----------------------------------------------------------------------------
# Second and later prunes: same error; fastprune keeps the old hook (A.1)
# ----------------------------------------------------------------------------

def user_method(P, pruning_type, with_dim=None, fail=False):
    """A user subclass of library P's BasePruningMethod (the tutorial pattern)."""
    def compute_mask(self, t, default_mask):
        if fail:
            raise RuntimeError("user compute_mask failed")
        mask = default_mask.clone()
        mask.view(-1)[::2] = 0
        return mask
    attrs = {"PRUNING_TYPE": pruning_type, "compute_mask": compute_mask}
    if with_dim is not None:
        attrs["dim"] = with_dim
    return type("UserMethod", (P.BasePruningMethod,), attrs)


SETUPS = {
    "l1": lambda P, m: P.l1_unstructured(m, "weight", 0.2),
    "container": lambda P, m: (P.l1_unstructured(m, "weight", 0.2), P.ln_structured(m, "weight", 1, 2, 0)),
    "custom": lambda P, m: P.custom_from_mask(m, "weight", tie_free(tuple(m.weight.shape)) > -0.5),
    "global": lambda P, m: P.global_unstructured([(m, "weight"), (m, "bias")], P.L1Unstructured, amount=0.3),
}

SECOND = [
    ("amount_ctor", lambda P, m: P.l1_unstructured(m, "weight", -1), ValueError, "amount=-1 should either be"),
    ("amount_type", lambda P, m: P.random_unstructured(m, "weight", "x"), TypeError, "Invalid type for amount: x"),
    ("amount_above_remaining", lambda P, m: P.l1_unstructured(m, "weight", 100), ValueError,
     "amount=100 should be smaller than the number of parameters to prune="),
    ("random_above_remaining", lambda P, m: P.random_unstructured(m, "weight", 30), ValueError,
     "should be smaller than the number of parameters to prune="),
    ("structured_above_remaining", lambda P, m: P.random_structured(m, "weight", 7, 1), ValueError,
     "should be smaller than the number of parameters to prune="),
    ("importance_shape", lambda P, m: P.l1_unstructured(m, "weight", 0.5, importance_scores=torch.ones(30)),
     AssertionError, "importance_scores should have the same shape as parameter weight"),
    ("ln_nuc", lambda P, m: P.ln_structured(m, "weight", 1, "nuc", 0), RuntimeError,
     "linalg.matrix_norm: dim must be a 2-tuple"),
    ("container_dim_too_negative", lambda P, m: P.ln_structured(m, "weight", 1, 2, -10), IndexError,
     "Index is out of bounds for tensor with dimensions 2"),
    ("container_dim_too_large", lambda P, m: P.random_structured(m, "weight", 1, 5), IndexError,
     "list assignment index out of range"),
    ("custom_shape", lambda P, m: P.custom_from_mask(m, "weight", torch.ones(30)), AssertionError,
     "default_mask shape"),
    ("structured_without_dim", lambda P, m: user_method(P, "structured").apply(m, "weight"), AttributeError,
     'Pruning methods of PRUNING_TYPE "structured" need to have the attribute `dim` defined.'),
    ("unrecognized_type", lambda P, m: user_method(P, "weird").apply(m, "weight"), ValueError,
     "Unrecognized PRUNING_TYPE weird"),
    ("user_compute_mask_raises", lambda P, m: user_method(P, "unstructured", fail=True).apply(m, "weight"),
     RuntimeError, "user compute_mask failed"),
    ("global_above_remaining",
     lambda P, m: P.global_unstructured([(m, "weight"), (m, "bias")], P.L1Unstructured, amount=1000), ValueError,
     "amount=1000 should be smaller than the number of parameters to prune="),
    ("global_structured_method",
     lambda P, m: P.global_unstructured([(m, "weight")], P.RandomStructured, amount=1), TypeError,
     'Only "unstructured" PRUNING_TYPE supported for the `pruning_method`. Found method <class '),
]


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("name,call,exc,fragment", SECOND, ids=[c[0] for c in SECOND])
def test_second_call_error_keeps_module(setup, name, call, exc, fragment):
    run_error(make_linear, SETUPS[setup], call, exc, fragment)
    # The module keeps working: a valid prune afterwards gives what it gives
    # on a module that never saw the failed call.
    mods = {}
    for key, P in LIBS.items():
        m = make_linear()
        SETUPS[setup](P, m)
        if key == "fast":
            with pytest.raises(exc):
                call(P, m)
        P.l1_unstructured(m, "weight", 2)
        mods[key] = m
    assert_same_pruned_state(mods["ref"], mods["fast"])


# ----------------------------------------------------------------------------
# Method objects, containers and helpers
# ----------------------------------------------------------------------------

def _unnamed(P):
    m = P.L1Unstructured(0.5)
    m._tensor_name = None
    return m


def _container_with_name(P, name="weight"):
    c = P.PruningContainer()
    c._tensor_name = name
    return c


def _other_name(P):
    m = P.L1Unstructured(0.1)
    m._tensor_name = "bias"
    return m


OBJECT_ERRORS = [
    ("abstract_base", lambda P, m: P.BasePruningMethod(), TypeError, "Can't instantiate abstract class BasePruningMethod"),
    ("tensor_name_unset", lambda P, m: P.L1Unstructured(0.5)._tensor_name, AttributeError,
     "'L1Unstructured' object has no attribute '_tensor_name'"),
    ("apply_mask_unpruned", lambda P, m: _unnamed(P).apply_mask(m), AssertionError, "Module Linear("),
    ("remove_unpruned_method", lambda P, m: _unnamed(P).remove(m), AssertionError,
     "has to be pruned before pruning can be removed"),
    ("prune_shape", lambda P, m: P.L1Unstructured(0.5).prune(torch.ones(3, 4), importance_scores=torch.ones(4, 3)),
     AssertionError, "importance_scores should have the same shape as tensor t, got torch.Size([4, 3]) vs torch.Size([3, 4])"),
    ("add_non_method", lambda P, m: _container_with_name(P).add_pruning_method(3), TypeError,
     "<class 'int'> is not a BasePruningMethod subclass"),
    ("add_module", lambda P, m: _container_with_name(P).add_pruning_method(m), TypeError,
     "is not a BasePruningMethod subclass"),
    ("add_other_name", lambda P, m: _container_with_name(P).add_pruning_method(_other_name(P)), ValueError,
     "Can only add pruning methods acting on the parameter named 'weight' to PruningContainer <prune.PruningContainer"),
    ("container_structured_without_dim",
     lambda P, m: P.PruningContainer(_named(user_method(P, "structured")())).compute_mask(
         torch.ones(3, 4), default_mask=torch.ones(3, 4)), AttributeError, "need to have the attribute `dim`"),
    ("container_unrecognized_type",
     lambda P, m: P.PruningContainer(_named(user_method(P, "other")())).compute_mask(
         torch.ones(3, 4), default_mask=torch.ones(3, 4)), ValueError, "Unrecognized PRUNING_TYPE other"),
    ("custom_compute_mask_shape", lambda P, m: P.CustomFromMask(torch.ones(3)).compute_mask(
        torch.ones(4), default_mask=torch.ones(4)), AssertionError, "default_mask shape torch.Size([4]) must match"),
    ("l1_compute_mask_int_above", lambda P, m: P.L1Unstructured(5).compute_mask(
        torch.ones(4), default_mask=torch.ones(4)), ValueError, "amount=5 should be smaller"),
    ("ln_compute_mask_1d", lambda P, m: P.LnStructured(1, 2).compute_mask(torch.ones(4), default_mask=torch.ones(4)),
     ValueError, "Structured pruning can only be applied"),
]


def _named(method, name="weight"):
    method._tensor_name = name
    return method


@pytest.mark.parametrize("call,exc,fragment", [c[1:] for c in OBJECT_ERRORS], ids=[c[0] for c in OBJECT_ERRORS])
def test_method_object_error(call, exc, fragment):
    run_error(make_linear, None, call, exc, fragment)


# ----------------------------------------------------------------------------
# global_unstructured argument errors: nothing changes anywhere in the model
# ----------------------------------------------------------------------------

def params_of(m):
    return [(m.conv, "weight"), (m.fc, "weight"), (m.fc, "bias")]


GLOBAL_ERRORS = [
    ("not_iterable", lambda P, m: P.global_unstructured(m.parameters, P.L1Unstructured, amount=0.2), TypeError,
     "global_unstructured(): parameters is not an Iterable"),
    ("scores_not_dict", lambda P, m: P.global_unstructured(params_of(m), P.L1Unstructured,
                                                           importance_scores=[torch.ones(3)], amount=0.2),
     TypeError, "global_unstructured(): importance_scores must be of type dict"),
    ("structured_method", lambda P, m: P.global_unstructured(params_of(m), P.LnStructured, amount=1, n=2),
     TypeError, "Found method <class 'prune.LnStructured'> of type structured"),
    ("custom_method", lambda P, m: P.global_unstructured(params_of(m), P.CustomFromMask, mask=torch.ones(3)),
     TypeError, "of type global"),
    ("amount_above_count", lambda P, m: P.global_unstructured(params_of(m), P.L1Unstructured, amount=194),
     ValueError, "amount=194 should be smaller than the number of parameters to prune=193"),
    ("amount_invalid", lambda P, m: P.global_unstructured(params_of(m), P.RandomUnstructured, amount=1.5),
     ValueError, "amount=1.5 should either be a float"),
    ("amount_missing", lambda P, m: P.global_unstructured(params_of(m), P.L1Unstructured), TypeError,
     "missing 1 required positional argument: 'amount'"),
    ("amount_positional_only_kw", lambda P, m: P.global_unstructured(params_of(m), P.L1Unstructured, 0.3),
     TypeError, "importance_scores must be of type dict"),
    ("missing_attribute", lambda P, m: P.global_unstructured([(m.fc, "nothing")], P.L1Unstructured, amount=1),
     AttributeError, "'Linear' object has no attribute 'nothing'"),
    ("buffer", lambda P, m: P.global_unstructured([(m.bn, "running_mean")], P.L1Unstructured, amount=1),
     TypeError, "cannot assign 'torch.FloatTensor' object to parameter 'running_mean_orig'"),
]


def make_net_bn():
    m = make_net()
    m.bn = nn.BatchNorm1d(4)
    return m


@pytest.mark.parametrize("call,exc,fragment", [c[1:] for c in GLOBAL_ERRORS], ids=[c[0] for c in GLOBAL_ERRORS])
def test_global_unstructured_error(call, exc, fragment):
    run_error(make_net_bn, None, call, exc, fragment)


@pytest.mark.parametrize("setup", list(SETUPS))
def test_global_buffer_among_parameters_leaves_everything(setup):
    """A buffer after pruned and unpruned parameters: fastprune fails before
    touching any of them (the reference prunes the ones before the buffer)."""
    m = make_net_bn()
    SETUPS[setup](FAST, m.fc)
    before = snapshot(m)
    with pytest.raises(TypeError, match="cannot assign"):
        FAST.global_unstructured([(m.conv, "weight"), (m.fc, "weight"), (m.bn, "running_mean")],
                                 FAST.L1Unstructured, amount=0.5)
    assert_same_snapshot(before, snapshot(m))


def test_global_wrong_size_importance_scores():
    """[Q] unchecked shapes: a wrong total size fails with IndexError in both
    libraries, and nothing is pruned."""
    for key, P in LIBS.items():
        m = make_net()
        before = snapshot(m)
        with pytest.raises(IndexError):
            P.global_unstructured([(m.fc, "weight"), (m.head, "weight")], P.L1Unstructured,
                                  importance_scores={(m.fc, "weight"): torch.ones(6)}, amount=0.5)
        if key == "fast":
            assert_same_snapshot(before, snapshot(m))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_global_two_devices():
    results = {}
    for key, P in LIBS.items():
        a, b = fill_tie_free(nn.Linear(3, 2)), fill_tie_free(nn.Linear(3, 2)).cuda()
        results[key] = raised(lambda P, m: P.global_unstructured([(a, "weight"), (b, "weight")], P.L1Unstructured,
                                                                 amount=0.5), P, None)
    assert results["ref"][0] is TypeError and "Found two parameters on different devices" in results["ref"][1]
    assert results["fast"] == results["ref"]
