"""Where a pruned parameter's state lives: the storage layouts.

Every pruning call asks once which layout a tensor is in (:func:`for_prune`
when pruning, :func:`of` afterwards) and lets that object do what differs:

* :data:`REPARAMETRIZED`, the reference's layout: the parameter moves to
  ``<name>_orig`` (the same Parameter object), the mask is the buffer
  ``<name>_mask`` (the dtype the method computes), and the method, the
  forward pre-hook, recomputes ``module.<name> = <name>_mask * <name>_orig``
  before every forward;
* :class:`InPlace` (:mod:`fastprune._in_place`), for FSDP2 parameters always
  and for others inside :func:`fastprune.in_place`: the parameter keeps its
  name and holds the pruned values itself, the mask buffer is packed bits,
  bool, or (FSDP2 outside ``in_place``) the computed dtype, and nothing is
  recomputed per forward.

A tensor keeps the layout of its first prune. The methods in
:mod:`fastprune.prune` stay layout-agnostic: they compute masks of the
tensor's shape from the dense mask a layout gives (:meth:`mask`); the
layout stores (:meth:`store`), publishes and removes them. Rollback is the
module :class:`Snapshot`'s: both layouts change the module's dicts only
until :meth:`finish`, which changes values, runs last (and, inside
:func:`finished_together`, only once the whole block succeeded).
"""
import contextlib

import torch
from torch.nn.utils import prune as _torch_prune

from . import _backends, _in_place, fsdp

_DEFERRED = None  # the finish steps postponed by finished_together()


class Reparametrized:
    """The reference's layout (see the module docstring)."""

    binary_masks = False  # a custom mask may scale

    def install(self, module, name, orig):
        """First prune: move the parameter ``orig`` to ``<name>_orig``."""
        module.register_parameter(name + "_orig", orig)
        del module._parameters[name]

    def values(self, module, name):
        """The tensor the mask multiplies."""
        return getattr(module, name + "_orig")

    def mask(self, module, name):
        """The mask as a tensor of the parameter's shape (not to be written)."""
        return getattr(module, name + "_mask").detach()

    def store(self, module, name, mask):
        """Register the computed ``mask`` as the buffer ``<name>_mask``."""
        module.register_buffer(name + "_mask", mask)

    def live_set(self, module, name, param):
        """The mask a global select reads as the live set (None: unpruned,
        every entry is live)."""
        return getattr(module, name + "_mask", None)

    def writable_mask(self, module, name):
        """None: a select cannot prune this layout in place."""
        return None

    def shares_buffer(self, hook_mask, buffer, first):
        """Whether a global prune's :class:`CustomFromMask` may hold the mask
        buffer in place of its own mask: on a first prune the buffer is
        ``1 * hook_mask``; later, the earlier mask multiplies it (a custom
        mask may scale)."""
        return first and hook_mask.dtype == buffer.dtype

    def publish(self, module, name, method):
        """Make ``module.<name>`` the pruned tensor (after a prune)."""
        setattr(module, name, method.apply_mask(module))

    refresh = publish  # before every forward

    def finish(self, module, name, masked=False):
        """What happens once the whole prune succeeded: nothing more here."""

    def remove(self, module, name, method):
        """Make the pruning permanent: ``<name>_orig`` gets the pruned values
        and becomes ``<name>`` again (appended to the parameters), the mask
        buffer goes."""
        pruned = method.apply_mask(module)
        if hasattr(module, name):
            delattr(module, name)
        orig = module._parameters[name + "_orig"]
        _backends.of(orig).assign(orig, pruned)
        del module._parameters[name + "_orig"]
        del module._buffers[name + "_mask"]
        setattr(module, name, orig)


class InPlace:
    """Pruned in place (see :mod:`fastprune._in_place`).

    Args:
        fmt: the mask buffer's format, ``"bits"``, ``"bool"`` or ``"dense"``.
        found: FSDP2's ``(FSDPParam, FSDPState)`` of the parameter when
            pruning an FSDP2 parameter, else None.
    """

    def __init__(self, fmt, found=None):
        self.fmt = fmt
        self.found = found
        self.binary_masks = fmt != "dense"

    def install(self, module, name, orig):
        """First prune: the parameter stays where it is."""

    def values(self, module, name):
        return getattr(module, name)

    def mask(self, module, name):
        buffer = module._buffers[name + "_mask"]
        param = module._parameters[name]
        return _backends.of(param).unpacked_mask(buffer, param).detach()

    def store(self, module, name, mask):
        """Register ``mask`` (computed, or already in the layout's format) as
        the buffer ``<name>_mask`` in the layout's format."""
        param = module._parameters[name]
        module.register_buffer(name + "_mask", _backends.of(param).stored_mask(mask, self.fmt, param))

    def live_set(self, module, name, param):
        """The stored mask, or for an unpruned parameter a broadcast of "all
        live" in the layout's format, as far as the backend's selects read
        the format (a global select then answers in it)."""
        buffer = module._buffers.get(name + "_mask")
        return _backends.of(param).live_set(buffer, self.fmt, param)

    count_live = staticmethod(_in_place.count_live)

    def writable_mask(self, module, name):
        """For a select that prunes in place: the stored mask, or a new one
        with every entry live (None where it cannot: a dense FSDP2 mask, a
        DTensor, or a parameter that is not contiguous)."""
        param = module._parameters[name]
        if self.fmt == "dense" or not _backends.of(param).selects_in_place or not param.is_contiguous():
            return None
        buffer = module._buffers.get(name + "_mask")
        return _in_place.new_mask(self.fmt, param) if buffer is None else buffer

    def shares_buffer(self, hook_mask, buffer, first):
        return True  # binary masks: the buffer is the share itself

    def publish(self, module, name, method):
        """Nothing to recompute: :meth:`finish` masks the values."""

    def refresh(self, module, name, method):
        """Before a forward: mask the values if they were written (FSDP2
        parameters: before their all-gather instead). Nothing runs while
        ``torch.compile`` traces: no guards on the bookkeeping (the optimizer
        step, gradient and load hooks keep a compiled model pruned)."""
        if torch.compiler.is_compiling():
            return
        entry = _in_place.held(module, name)
        if entry is not None and entry.group is not None:
            return  # held for FSDP2
        if entry is None and fsdp.record(module, name) is not None:
            return  # an FSDP2 parameter nothing holds yet
        _in_place.refresh(module, name, entry)

    def finish(self, module, name, masked=False):
        """Mask the values (unless ``masked``: a fused select did) and keep
        them pruned (deferred inside :func:`finished_together`)."""
        if _DEFERRED is not None:
            _DEFERRED.append((self, module, name))
        elif self.found is not None:
            fsdp.hold(module, name, self.found)
        else:
            _in_place.hold(module, name, masked=masked)

    def remove(self, module, name, method):
        """The values are pruned already: drop the hooks and the mask."""
        entry = _in_place.held(module, name)
        if entry is None:  # a copy never run: its values are masked once, nothing to release
            _in_place.mask_once(module, name)
        elif entry.group is not None:
            fsdp.release(module, name)
        else:
            _in_place.release(module, name)
        del module._buffers[name + "_mask"]


REPARAMETRIZED = Reparametrized()


def for_prune(module, name):
    """The layout a prune of ``module.<name>`` uses. A tensor pruned before
    keeps its layout; a first prune is in place for an FSDP2 parameter
    (checked prunable now: sharded, not tied) and inside
    :func:`fastprune.in_place`, else the reference's."""
    param = module._parameters.get(name)
    if param is None:
        return REPARAMETRIZED
    found = fsdp.prunable(module, name)
    buffer = module._buffers.get(name + "_mask")
    if buffer is not None:
        return InPlace(_in_place.format_of(buffer), found)
    fmt = _in_place.requested()
    if fmt is None and found is None:
        return REPARAMETRIZED
    return InPlace(_backends.of(param).mask_format(param, fmt or "dense"), found)


@contextlib.contextmanager
def finished_together(masked=False):
    """A block in which every prune's :meth:`finish` waits for the block to
    end without an error (and is dropped if it fails): a global prune that
    fails on one pair then changes no values. ``masked``: the block masked
    the values itself (its last step, a fused select)."""
    global _DEFERRED
    pending, _DEFERRED = [], []
    try:
        yield
        pending = _DEFERRED
    finally:
        _DEFERRED = None
    for layout, module, name in pending:
        layout.finish(module, name, masked)


def of(module, name):
    """The layout of the pruned tensor ``module.<name>``: in place when it is
    still a registered parameter (the reference's layout moved it to
    ``<name>_orig``)."""
    if name in module._parameters:
        return InPlace(_in_place.format_of(module._buffers[name + "_mask"]))
    return REPARAMETRIZED


class Snapshot:
    """What pruning tensors ``names`` of ``module`` may change, to put back on failure.

    Parameters, buffers and forward pre-hooks (contents and order), the
    non-persistent buffer set, the members of existing pruning containers and
    the cached attributes ``module.<name>``.
    """

    _MISSING = object()

    def __init__(self, module, names):
        self.module = module
        self.parameters = list(module._parameters.items())
        self.buffers = list(module._buffers.items())
        self.non_persistent = set(module._non_persistent_buffers_set)
        self.hooks = list(module._forward_pre_hooks.items())
        self.members = [(hook, hook._pruning_methods) for _, hook in self.hooks
                        if isinstance(hook, _torch_prune.PruningContainer)]
        self.cached = {name: module.__dict__.get(name, self._MISSING) for name in names}

    def restore(self, reassigned=()):
        """Put the module back.

        Args:
            reassigned (Iterable[str]): names that were assigned with
                ``setattr`` since the snapshot; a module class with its own
                ``__setattr__`` (RNN ``_flat_weights``) sees their old values
                assigned again.
        """
        module = self.module
        for live, items in ((module._parameters, self.parameters),
                            (module._buffers, self.buffers),
                            (module._forward_pre_hooks, self.hooks)):
            live.clear()
            live.update(items)
        module._non_persistent_buffers_set.clear()
        module._non_persistent_buffers_set.update(self.non_persistent)
        for container, members in self.members:
            container._pruning_methods = members
        for name, value in self.cached.items():
            if value is self._MISSING:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = value
        if type(module).__setattr__ is not torch.nn.Module.__setattr__:
            for name in reassigned:
                setattr(module, name, getattr(module, name))
