"""FSDP2 (``fully_shard``) parameters in the drop-in API: pruned in place.

FSDP2 owns ``module.<name>``: before a unit's forward it all-gathers the
sharded parameter and writes the full one into ``module._parameters[name]``,
and afterwards it puts the sharded one back. The reference's
reparametrization (``<name>_orig`` parameter, ``<name>_mask`` buffer and a
forward pre-hook that assigns ``<name> = <name>_orig * <name>_mask``) cannot
live under that: the hook's assignment collides with FSDP's parameter, and a
mask applied to the gathered tensor would have to be gathered too.

So a pruned FSDP2 parameter keeps its name, its FSDP record and its place, and
holds the pruned values itself (docs/distributed.md, "FSDP2"):

* its local shard is multiplied by the local shard of ``<name>_mask``, a
  buffer that is a DTensor with the parameter's mesh and placements (so
  ``state_dict``, ``torch.distributed.checkpoint`` and ``Module._apply``
  (``.to()``, ``.float()``, ``to_empty``) shard, reshard, move and convert it
  like the parameter);
* after FSDP2's reduce-scatter, the sharded gradient is multiplied by the mask
  (a post-accumulate-grad hook, which FSDP2 calls): the gradient of the
  reference's ``<name>_orig``, zero at pruned entries, so gradient clipping
  and optimizers see what they would see there;
* the values are multiplied by the mask again after every ``Optimizer.step``
  that holds the parameter (an optimizer whose state predates the prune moves
  zeros), and before every all-gather of its FSDP2 group when the local shard
  or the mask was written since it was last masked (a loaded checkpoint, a
  manual edit). The all-gather is the one place every gather passes (forward,
  ``register_fsdp_forward_method`` methods, prefetch, ``unshard()``); FSDP2
  runs it outside ``torch.compile``'s graphs, so compiled models keep it.

The bookkeeping is keyed by module and parameter name, never by the
parameter tensor: ``Module._apply`` swaps tensors (refused while a weak
reference to one exists) and ``load_state_dict(assign=True)`` replaces them;
before each all-gather the current parameter gets the gradient hook again if
it lacks it. Everything here is local: no collective, no full-size tensor.
The FSDP2 internals read (the state registry, ``FSDPParam`` records, the
param group's ``unshard``) are private torch API, checked against the pinned
torch by the tests.
"""
import contextlib
import dataclasses
import functools
import sys
import weakref
from typing import Optional

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

# module -> {name: _Held}, for every parameter held pruned.
_HELD = weakref.WeakKeyDictionary()
# FSDP2 param groups whose unshard masks first -> None.
_WATCHED = weakref.WeakKeyDictionary()
_STEP_HOOK = None
_DEFERRED = None
# (ids of the live FSDP2 states, {(id(module), name): weakrefs to (FSDPParam, FSDPState)}).
_INDEX = ((), {})


@dataclasses.dataclass
class _Held:
    """What keeps one parameter pruned."""

    group: object  # its FSDPParamGroup
    grad_hook: Optional[torch.utils.hooks.RemovableHandle] = None
    masked: tuple = ()  # (values, mask) identity and versions when last masked


def record(module, name):
    """FSDP2's ``(FSDPParam, FSDPState)`` for ``module.<name>``, or None
    when FSDP2 does not manage that parameter."""
    fsdp_state = sys.modules.get("torch.distributed.fsdp._fully_shard._fsdp_state")
    if fsdp_state is None:  # FSDP2 never imported (importing it here would cost every prune)
        return None
    found = _index(fsdp_state.FSDPState).get((id(module), name))
    if found is None:
        return None
    fsdp_param, state = found[0](), found[1]()
    if fsdp_param is None or state is None:
        return None
    info = fsdp_param._module_info
    if not any(m is module for m in (info.module, *info.shared_modules)):
        return None  # (an id reused by another module)
    return fsdp_param, state


def _index(state_type):
    """Every FSDP2 parameter by ``(id(module), name)`` of its owners, rebuilt
    when the set of FSDP2 states changes: one walk per model, not per lookup."""
    global _INDEX
    from torch.distributed._composable_state import _module_state_mapping

    states = [s for s in (ref() for ref in list(_module_state_mapping.values())) if isinstance(s, state_type)]
    key = tuple(map(id, states))
    if key != _INDEX[0]:
        table = {}
        for state in states:
            for group in state._fsdp_param_groups:
                for fsdp_param in group.fsdp_params:
                    info = fsdp_param._module_info
                    for m, n in zip((info.module, *info.shared_modules),
                                    (info.param_name, *info.shared_param_names)):
                        table[(id(m), n)] = (weakref.ref(fsdp_param), weakref.ref(state))
        _INDEX = (key, table)
    return _INDEX[1]


def prunable(module, name):
    """:func:`record` of ``module.<name>`` after checking that it can be
    pruned now (None when FSDP2 does not manage it)."""
    found = record(module, name)
    if found is None:
        return None
    from torch.distributed.fsdp._fully_shard._fsdp_param import ShardedState

    fsdp_param, _ = found
    if fsdp_param._module_info.shared_modules:
        raise NotImplementedError(
            f"fastprune: parameter '{name}' of {type(module).__name__} is shared with other modules "
            "under FSDP2 (tied weights); pruning a tied FSDP2 parameter is not supported")
    if (fsdp_param.sharded_state != ShardedState.SHARDED
            or module._parameters.get(name) is not fsdp_param.sharded_param):
        raise RuntimeError(
            f"fastprune: FSDP2 holds parameter '{name}' of {type(module).__name__} unsharded now "
            "(inside forward or backward, or after a forward with reshard_after_forward=False); "
            "prune it while it is sharded, e.g. after calling reshard() on its fully_shard module")
    return found


def hold(module, name, found):
    """Prune ``module.<name>`` in place with its ``<name>_mask`` buffer and
    keep it pruned (see the module docstring). Idempotent; inside
    :func:`deferred`, it runs when that block ends without an error."""
    if _DEFERRED is not None:
        _DEFERRED.append((module, name, found))
        return
    global _STEP_HOOK
    fsdp_param, state = found
    group = next(g for g in state._fsdp_param_groups if fsdp_param in g.fsdp_params)
    held = _HELD.setdefault(module, {}).setdefault(name, _Held(group))
    if group not in _WATCHED:
        _watch(group)
    if _STEP_HOOK is None:
        _STEP_HOOK = register_optimizer_step_post_hook(_after_step)
    _enforce([(module, name, held)], force=True)


def release(module, name):
    """Stop keeping ``module.<name>`` pruned (its values stay as they are,
    pruned once more here) and drop its hooks; the caller deletes the mask."""
    global _STEP_HOOK
    _enforce([(module, name, _HELD[module][name])], force=True)
    held = _HELD[module].pop(name)
    if not _HELD[module]:
        del _HELD[module]
    if held.grad_hook is not None:
        held.grad_hook.remove()
    if not _held_in(held.group):
        _WATCHED.pop(held.group)
        vars(held.group).pop("unshard", None)  # back to the class's method
    if not _HELD and _STEP_HOOK is not None:
        _STEP_HOOK.remove()
        _STEP_HOOK = None


@contextlib.contextmanager
def deferred():
    """Postpone :func:`hold` to the end of the block, and drop it if the block
    fails: a global prune that fails on one parameter has then changed no
    parameter's values."""
    global _DEFERRED
    pending, _DEFERRED = [], []
    try:
        yield
        pending = _DEFERRED
    finally:
        _DEFERRED = None
    for args in pending:
        hold(*args)


def _watch(group):
    """Make ``group``'s all-gather mask its held parameters first (an
    instance attribute over ``FSDPParamGroup.unshard``; :func:`release`
    deletes it)."""
    unshard = group.unshard

    @functools.wraps(unshard)
    def masked_unshard(*args, **kwargs):
        if group.is_sharded:
            _enforce(_held_in(group))
        return unshard(*args, **kwargs)

    group.unshard = masked_unshard
    _WATCHED[group] = None


def _held_in(group):
    """``(module, name, _Held)`` of the held parameters of an FSDP2 group."""
    out = []
    for fsdp_param in group.fsdp_params:
        info = fsdp_param._module_info
        held = _HELD.get(info.module, {}).get(info.param_name)
        if held is not None:
            out.append((info.module, info.param_name, held))
    return out


def _local(module, name, suffix=""):
    return (module._buffers if suffix else module._parameters)[name + suffix].to_local()


@torch.no_grad()
def _enforce(entries, force=False):
    """Mask the values of held parameters whose local shard or mask was
    written since they were last masked (all of them with ``force``), and
    hook the gradient of any that lost the hook (a swapped or assigned
    parameter)."""
    stale, values, masks = [], [], []
    for module, name, held in entries:
        param = module._parameters[name]
        if held.grad_hook is None or not _has_hook(param, held.grad_hook):
            if held.grad_hook is not None:
                held.grad_hook.remove()
            held.grad_hook = param.register_post_accumulate_grad_hook(
                functools.partial(_mask_grad, weakref.ref(module), name))
        if force or held.masked != _stamp(module, name):
            v, m = _local(module, name), _local(module, name, "_mask")
            stale.append((module, name, held))
            values.append(v)
            masks.append(m.to(v.dtype))
    if values:
        torch._foreach_mul_(values, masks)
    for module, name, held in stale:  # (the masking bumped their local versions)
        held.masked = _stamp(module, name)


def _stamp(module, name):
    """What changes when the values or the mask of ``module.<name>`` are
    written or replaced: a write through the DTensor bumps its version, one
    through its local tensor (our own masking included) the local version."""
    out = ()
    for t in (module._parameters[name], module._buffers[name + "_mask"]):
        local = t.to_local()
        out += (id(t), t._version, local.data_ptr(), local._version)
    return out


def _has_hook(param, handle):
    hooks = getattr(param, "_post_accumulate_grad_hooks", None)
    return hooks is not None and handle.hooks_dict_ref() is hooks and handle.id in hooks


@torch.no_grad()
def _mask_grad(module_ref, name, param):
    module = module_ref()
    if module is not None and param.grad is not None and name + "_mask" in module._buffers:
        param.grad.to_local().mul_(_local(module, name, "_mask"))


def _after_step(optimizer, args, kwargs):
    """Re-mask the held parameters that ``optimizer`` holds: a set lookup per
    parameter of the optimizer, nothing more for optimizers that hold none."""
    if not _HELD:
        return
    held = {id(module._parameters[name]): (module, name, h)
            for module, names in list(_HELD.items()) for name, h in names.items()
            if name in module._parameters}
    touched = [held[id(p)] for group in optimizer.param_groups for p in group["params"] if id(p) in held]
    if touched:
        _enforce(touched)
