"""FSDP2 (``fully_shard``) parameters in the drop-in API: pruned in place.

FSDP2 owns ``module.<name>``: before a unit's forward it all-gathers the
sharded parameter and writes the full one into ``module._parameters[name]``,
and afterwards it puts the sharded one back. The reference's
reparametrization (``<name>_orig`` parameter, ``<name>_mask`` buffer and a
forward pre-hook that assigns ``<name> = <name>_orig * <name>_mask``) cannot
live under that: the hook's assignment collides with FSDP's parameter, and a
mask applied to the gathered tensor would have to be gathered too.

So a pruned FSDP2 parameter is pruned in place (:mod:`fastprune._in_place`):
it keeps its name, its FSDP record and its place, and holds the pruned values
itself (docs/distributed.md, "FSDP2"). Its ``<name>_mask`` buffer is a
DTensor with the parameter's mesh and placements (so ``state_dict``,
``torch.distributed.checkpoint`` and ``Module._apply`` shard, reshard, move
and convert it like the parameter). What is FSDP2's own lives here: finding
a parameter's FSDP2 record, refusing one FSDP2 holds gathered or tied, and
masking the held parameters of a param group before its all-gather when
they were written since they were last masked (a loaded checkpoint, a manual
edit). The all-gather is the one place every gather passes (forward,
``register_fsdp_forward_method`` methods, prefetch, ``unshard()``); FSDP2
runs it outside ``torch.compile``'s graphs, so compiled models keep it. The
FSDP2 internals read (the state registry, ``FSDPParam`` records, the param
group's ``unshard``) are private torch API, checked against the pinned torch
by the tests.
"""
import functools
import sys
import weakref

from . import _in_place

# FSDP2 param groups whose unshard masks first -> None.
_WATCHED = weakref.WeakKeyDictionary()
# (ids of the live FSDP2 states, {(id(module), name): weakrefs to (FSDPParam, FSDPState)}).
_INDEX = ((), {})


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
    """Prune ``module.<name>`` in place and keep it pruned, its group's
    all-gather watched."""
    fsdp_param, state = found
    group = next(g for g in state._fsdp_param_groups if fsdp_param in g.fsdp_params)
    _in_place.hold(module, name, group)
    if group not in _WATCHED:
        _watch(group)


def release(module, name):
    """Stop keeping ``module.<name>`` pruned; its group's all-gather is
    unwatched with the group's last held parameter."""
    group = _in_place.release(module, name).group
    if not _held_in(group):
        _WATCHED.pop(group)
        vars(group).pop("unshard", None)  # back to the class's method


def _watch(group):
    """Make ``group``'s all-gather mask its held parameters first (an
    instance attribute over ``FSDPParamGroup.unshard``; :func:`release`
    deletes it)."""
    unshard = group.unshard

    @functools.wraps(unshard)
    def masked_unshard(*args, **kwargs):
        if group.is_sharded:
            _in_place.enforce(_held_in(group))
        return unshard(*args, **kwargs)

    group.unshard = masked_unshard
    _WATCHED[group] = None


def _held_in(group):
    """``(module, name, _Held)`` of the held parameters of an FSDP2 group."""
    out = []
    for fsdp_param in group.fsdp_params:
        info = fsdp_param._module_info
        entry = _in_place.held(info.module, info.param_name)
        if entry is not None:
            out.append((info.module, info.param_name, entry))
    return out
