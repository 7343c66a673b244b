"""Pruning in place: a parameter that holds its own pruned values.

A parameter pruned in place stays the same ``nn.Parameter`` under its own
name, with its pruned entries stored as zeros; there is no ``<name>_orig``.
Its mask is the buffer ``<name>_mask`` in one of three formats:

* ``"bits"``: ``torch.uint8``, packed along the last dimension (see
  :func:`fastprune.ops.pack_mask`), 1 bit per weight;
* ``"bool"``: ``torch.bool``, the parameter's shape, 1 byte per weight;
* ``"dense"``: the dtype :meth:`compute_mask` gives (FSDP2 parameters pruned
  outside :func:`in_place`, as before it existed).

:func:`in_place` (or ``FASTPRUNE_IN_PLACE=bits|bool`` in the environment)
picks the format of a first prune; FSDP2 parameters are always pruned in
place. This module keeps held parameters pruned, with nothing recomputed per
forward:

* the gradient is multiplied by the mask after it is accumulated (a
  post-accumulate-grad hook): the gradient of the reference's ``<name>_orig``,
  so clipping and optimizers see what they would see there;
* the values are masked again after every ``Optimizer.step`` that holds the
  parameter and after ``load_state_dict``, and, through :func:`refresh`
  (FSDP2: before every all-gather of the parameter's group), when the values
  or the mask were written since they were last masked (a manual edit);
* a copy (``deepcopy``, pickle) is held again by its first :func:`refresh`.

State is keyed by module and parameter name, never by the parameter tensor,
so ``Module._apply`` (which swaps tensors) and ``load_state_dict(assign=True)``
(which replaces them) keep working: a parameter that lost the gradient hook
gets it again. DTensor parameters and masks are handled through their local
shards: every operation here is local.
"""
import contextlib
import contextvars
import dataclasses
import functools
import os
import weakref
from typing import Optional

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import ops

FORMATS = ("bits", "bool")
_ENVIRONMENT = "FASTPRUNE_IN_PLACE"
_REQUESTED = contextvars.ContextVar("fastprune_in_place", default=None)

# module -> {name: _Held}, for every parameter held pruned.
_HELD = weakref.WeakKeyDictionary()
_STEP_HOOK = None


@contextlib.contextmanager
def in_place(mask="bits"):
    """Prune in place inside the block: parameters pruned for the first time
    keep their name and hold their pruned values, with a 1-bit
    (``mask="bits"``) or 1-byte (``mask="bool"``) mask; see the user guide
    (docs/in_place.md). Tensors pruned before keep the layout they have.

    Args:
        mask (str): ``"bits"`` (default) or ``"bool"``.
    """
    if mask not in FORMATS:
        raise ValueError(f"fastprune.in_place: mask must be 'bits' or 'bool', got {mask!r}")
    token = _REQUESTED.set(mask)
    try:
        yield
    finally:
        _REQUESTED.reset(token)


def requested():
    """The mask format of a first prune in place now: the innermost
    :func:`in_place` block's, else ``FASTPRUNE_IN_PLACE``'s; None for the
    reference's layout."""
    mask = _REQUESTED.get()
    if mask is not None:
        return mask
    value = os.environ.get(_ENVIRONMENT, "").strip().lower()
    if value in ("", "0"):
        return None
    if value not in FORMATS:
        raise ValueError(f"fastprune: {_ENVIRONMENT}={value!r}: expected 'bits', 'bool', 0 or unset")
    return value


def format_of(mask):
    """The format of a mask buffer (or its local shard)."""
    return {torch.uint8: "bits", torch.bool: "bool"}.get(mask.dtype, "dense")


def local(t):
    """A tensor's local shard (the tensor itself when it is not a DTensor)."""
    to_local = getattr(t, "to_local", None)
    return t if to_local is None else to_local()


def is_packed(mask, t):
    """Whether the local ``mask`` of the local tensor ``t`` is in the packed
    format (a uint8 mask of the packed shape; where that shape is ``t``'s,
    a last dim of 1, packed and 0/1 bytes are the same thing)."""
    return mask.dtype == torch.uint8 and tuple(mask.shape) == ops.packed_shape(t.shape)


def stored(mask, fmt, t):
    """The local ``mask`` of the local tensor ``t`` (0/1 values, or already
    in format ``fmt``) in format ``fmt``."""
    if fmt == "bits":
        return mask if is_packed(mask, t) else ops.pack_mask(mask)
    return mask != 0 if fmt == "bool" and mask.dtype != torch.bool else mask


def new_mask(fmt, t):
    """A mask in format ``fmt`` with every entry of the local ``t`` live."""
    if fmt == "bool":
        return torch.ones(t.shape, dtype=torch.bool, device=t.device)
    mask = torch.full(ops.packed_shape(t.shape), 0xFF, dtype=torch.uint8, device=t.device)
    tail = t.shape[-1] % 8 if t.dim() else 1
    if tail:
        mask[..., -1] = (1 << tail) - 1  # padding bits 0
    return mask


_POPCOUNT = torch.tensor([bin(b).count("1") for b in range(256)], dtype=torch.int64)


def count_live(mask):
    """The live entries of a local bits or bool mask."""
    if format_of(mask) == "bool":
        return int(mask.sum())
    return int(torch.bincount(mask.reshape(-1), minlength=256).cpu() @ _POPCOUNT)


def all_live(fmt, t):
    """A broadcast mask in format ``fmt`` with every entry of the local ``t`` live."""
    if fmt == "bits":  # (a last dim of 1: packed and 0/1 bytes coincide, see is_packed)
        shape = ops.packed_shape(t.shape)
        byte = 1 if shape == tuple(t.shape) else 0xFF
        return torch.full((), byte, dtype=torch.uint8, device=t.device).expand(shape)
    return torch.ones((), dtype=torch.bool, device=t.device).expand(t.shape)


def unpacked(mask, shape):
    """A stored local mask as a tensor of shape ``shape`` (bool for bits)."""
    return ops.unpack_mask(mask, shape) if format_of(mask) == "bits" else mask


def multiply_(values, masks):
    """Zero the entries of each local tensor of ``values`` where its mask is 0:
    exactly 0 (NaN and inf too) for bits and bool masks; multiplied by a
    dense (FSDP2) mask, as the reference's product."""
    dense = [(v, m) for v, m in zip(values, masks) if format_of(m) == "dense"]
    if dense:
        torch._foreach_mul_([v for v, _ in dense], [m.to(v.dtype) for v, m in dense])
    for v, m in zip(values, masks):
        if format_of(m) == "bits":
            ops.mask_packed_(v, m)
        elif format_of(m) == "bool":
            v.masked_fill_(m.logical_not(), 0)


@dataclasses.dataclass
class _Held:
    """What keeps one parameter pruned."""

    group: object = None  # its FSDP2 param group (None: not FSDP2's)
    grad_hook: Optional[torch.utils.hooks.RemovableHandle] = None
    load_hook: Optional[torch.utils.hooks.RemovableHandle] = None
    masked: tuple = ()  # (values, mask) identity and versions when last masked


def held(module, name):
    """The :class:`_Held` of ``module.<name>``, or None."""
    return _HELD.get(module, {}).get(name)


def hold(module, name, group=None, masked=False):
    """Mask ``module.<name>`` with its ``<name>_mask`` and keep it pruned.

    Args:
        group: the FSDP2 param group of an FSDP2 parameter (whose all-gather
            calls :func:`enforce`), else None.
        masked: the values are masked already (by :func:`fastprune.ops.prune_in_place_`).
    """
    global _STEP_HOOK
    entry = _HELD.setdefault(module, {}).get(name)
    if entry is None:
        entry = _HELD[module][name] = _Held(group)
        entry.load_hook = module.register_load_state_dict_post_hook(
            functools.partial(_after_load, name))
    if _STEP_HOOK is None:
        _STEP_HOOK = register_optimizer_step_post_hook(_after_step)
    if masked:
        entry.masked = _stamp(module, name)
    enforce([(module, name, entry)], force=not masked)


def release(module, name):
    """Stop keeping ``module.<name>`` pruned (its values are masked once more)
    and drop its hooks; the caller deletes the mask. Returns its :class:`_Held`."""
    global _STEP_HOOK
    enforce([(module, name, _HELD[module][name])], force=True)
    entry = _HELD[module].pop(name)
    if not _HELD[module]:
        del _HELD[module]
    if entry.grad_hook is not None:
        entry.grad_hook.remove()
    entry.load_hook.remove()
    if not _HELD and _STEP_HOOK is not None:
        _STEP_HOOK.remove()
        _STEP_HOOK = None
    return entry


def refresh(module, name, entry):
    """Before a forward: hold ``module.<name>`` if nothing does (``entry``
    None: a deep copy, an unpickled module), else mask it if it was written
    since it was last masked."""
    if entry is None:
        hold(module, name)
    else:
        enforce([(module, name, entry)])


@torch.no_grad()
def mask_once(module, name):
    """Mask the values of ``module.<name>`` with its mask, keeping nothing."""
    multiply_([local(module._parameters[name])], [local(module._buffers[name + "_mask"])])


@torch.no_grad()
def enforce(entries, force=False):
    """Mask the values of held parameters ``(module, name, _Held)`` whose
    values or mask were written since they were last masked (all with
    ``force``), and hook the gradient of any that lost the hook."""
    stale, values, masks = [], [], []
    for module, name, entry in entries:
        param = module._parameters[name]
        if entry.grad_hook is None or not _has_hook(param, entry.grad_hook):
            if entry.grad_hook is not None:
                entry.grad_hook.remove()
            entry.grad_hook = param.register_post_accumulate_grad_hook(
                functools.partial(_mask_grad, weakref.ref(module), name))
        if force or entry.masked != _stamp(module, name):
            stale.append((module, name, entry))
            values.append(local(param))
            masks.append(local(module._buffers[name + "_mask"]))
    multiply_(values, masks)
    for module, name, entry in stale:  # (the masking bumped their versions)
        entry.masked = _stamp(module, name)


def _stamp(module, name):
    """What changes when the values or the mask of ``module.<name>`` are
    written or replaced: a write through a DTensor bumps its version, one
    through its local tensor (our own masking included) the local version."""
    out = ()
    for t in (module._parameters[name], module._buffers[name + "_mask"]):
        shard = local(t)
        out += (id(t), t._version, shard.data_ptr(), shard._version)
    return out


def _has_hook(param, handle):
    hooks = getattr(param, "_post_accumulate_grad_hooks", None)
    return hooks is not None and handle.hooks_dict_ref() is hooks and handle.id in hooks


@torch.no_grad()
def _mask_grad(module_ref, name, param):
    module = module_ref()
    if module is not None and param.grad is not None and name + "_mask" in module._buffers:
        multiply_([local(param.grad)], [local(module._buffers[name + "_mask"])])


def _after_load(name, module, incompatible_keys):
    """After ``load_state_dict``: mask what it wrote (in eager code, so that
    a compiled model's next forward sees masked values too)."""
    entry = held(module, name)
    if entry is not None and name in module._parameters and name + "_mask" in module._buffers:
        enforce([(module, name, entry)])


def _after_step(optimizer, args, kwargs):
    """Re-mask the held parameters that ``optimizer`` holds: a set lookup per
    parameter of the optimizer, nothing more for optimizers that hold none.
    Always (a fused optimizer writes without bumping version counters)."""
    if not _HELD:
        return
    by_id = {id(module._parameters[name]): (module, name, entry)
             for module, names in list(_HELD.items()) for name, entry in names.items()
             if name in module._parameters}
    touched = [by_id[id(p)] for group in optimizer.param_groups for p in group["params"] if id(p) in by_id]
    if touched:
        enforce(touched, force=True)
