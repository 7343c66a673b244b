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
  ``state_dict`` and ``torch.distributed.checkpoint`` shard and reshard it
  like the parameter);
* after FSDP2's reduce-scatter, the sharded gradient is multiplied by the mask
  (a post-accumulate-grad hook, which FSDP2 calls): the gradient of the
  reference's ``<name>_orig``, zero at pruned entries, so gradient clipping
  and optimizers see what they would see there;
* the values are multiplied by the mask again after every ``Optimizer.step``
  (an optimizer whose state predates the prune moves zeros), and before the
  unit's all-gather (a forward pre-hook that runs before FSDP2's), which
  catches any other write (a loaded checkpoint, a manual edit).

Everything here is local: no collective, no full-size tensor. The FSDP2
internals read (the state registry, ``FSDPParam`` records) are private torch
API, checked against the pinned torch by the tests.
"""
import contextlib
import sys
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

# The sharded parameters held pruned -> (weakref to the module, name, the
# gradient hook's handle).
_HELD = torch.utils.weak.WeakIdKeyDictionary()
# FSDP2 states with held parameters -> handles of their units' pre-forward hooks.
_UNIT_HOOKS = torch.utils.weak.WeakIdKeyDictionary()
_STEP_HOOK = None
_DEFERRED = None


def record(module, name):
    """FSDP2's ``(FSDPParam, FSDPState)`` for ``module.<name>``, or None
    when FSDP2 does not manage that parameter."""
    fsdp_state = sys.modules.get("torch.distributed.fsdp._fully_shard._fsdp_state")
    if fsdp_state is None:  # FSDP2 never imported (importing it here would cost every prune)
        return None
    from torch.distributed._composable_state import _module_state_mapping

    for ref in list(_module_state_mapping.values()):
        state = ref()
        if not isinstance(state, fsdp_state.FSDPState):
            continue
        for group in state._fsdp_param_groups:
            for fsdp_param in group.fsdp_params:
                info = fsdp_param._module_info
                owners = zip((info.module, *info.shared_modules),
                             (info.param_name, *info.shared_param_names))
                if any(m is module and n == name for m, n in owners):
                    return fsdp_param, state
    return None


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
    param = fsdp_param.sharded_param
    if param not in _HELD:
        _HELD[param] = (weakref.ref(module), name, param.register_post_accumulate_grad_hook(_mask_grad))
    if state not in _UNIT_HOOKS:
        _UNIT_HOOKS[state] = [unit.register_forward_pre_hook(_before_gather, prepend=True)
                              for unit in state._modules]
    if _STEP_HOOK is None:
        _STEP_HOOK = register_optimizer_step_post_hook(_after_step)
    _mask_values([param])


def release(module, name):
    """Stop keeping ``module.<name>`` pruned (its values stay as they are,
    pruned once more here) and drop its hooks; the caller deletes the mask."""
    fsdp_param, state = record(module, name)
    param = fsdp_param.sharded_param
    _mask_values([param])
    _HELD.pop(param)[2].remove()
    if not any(p in _HELD for p in _params_of(state)):
        for handle in _UNIT_HOOKS.pop(state):
            handle.remove()


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


def _params_of(state):
    return [fp.sharded_param for group in state._fsdp_param_groups for fp in group.fsdp_params]


def _mask_of(param):
    module_ref, name, _ = _HELD[param]
    module = module_ref()
    return None if module is None else module._buffers[name + "_mask"].to_local()


@torch.no_grad()
def _mask_values(params):
    pairs = [(p.to_local(), _mask_of(p)) for p in params if p in _HELD]
    pairs = [(values, mask) for values, mask in pairs if mask is not None]
    if pairs:
        torch._foreach_mul_([v for v, _ in pairs], [m.to(v.dtype) for v, m in pairs])


@torch.no_grad()
def _mask_grad(param):
    mask = _mask_of(param)
    if mask is not None and param.grad is not None:
        param.grad.to_local().mul_(mask)


def _before_gather(unit, args):
    _mask_values(_params_of(unit._get_fsdp_state()))


def _after_step(optimizer, args, kwargs):
    if _HELD:
        _mask_values([p for group in optimizer.param_groups for p in group["params"]])
