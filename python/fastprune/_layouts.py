"""Where a pruned parameter's state lives: the storage layouts.

Every pruning call asks once which layout a tensor is in (:func:`for_prune`
when pruning, :func:`of` afterwards) and lets that object do what differs:

* :data:`REPARAMETRIZED`, the reference's layout: the parameter moves to
  ``<name>_orig`` (the same Parameter object), the mask is the buffer
  ``<name>_mask``, and the method, the forward pre-hook, recomputes
  ``module.<name> = <name>_mask * <name>_orig`` before every forward;
* :class:`InPlace`, for FSDP2 parameters (:mod:`fastprune.fsdp`): the
  parameter keeps its name and holds the pruned values itself, the mask is a
  sharded buffer, and there is nothing to recompute.

The methods in :mod:`fastprune.prune` stay layout-agnostic: they compute
masks; the layout installs, publishes and removes them. Rollback is the
module :class:`Snapshot`'s: both layouts change the module's dicts only, and
the in-place one changes values last.
"""
import torch
from torch.nn.utils import prune as _torch_prune

from . import dtensor, fsdp


class Reparametrized:
    """The reference's layout (see the module docstring)."""

    def install(self, module, name, orig):
        """First prune: move the parameter ``orig`` to ``<name>_orig``."""
        module.register_parameter(name + "_orig", orig)
        del module._parameters[name]

    def values(self, module, name):
        """The tensor the mask multiplies."""
        return getattr(module, name + "_orig")

    def publish(self, module, name, method):
        """Make ``module.<name>`` the pruned tensor (after a prune, and before
        every forward)."""
        setattr(module, name, method.apply_mask(module))

    def finish(self, module, name):
        """What happens once the whole prune succeeded: nothing more here."""

    def remove(self, module, name, method):
        """Make the pruning permanent: ``<name>_orig`` gets the pruned values
        and becomes ``<name>`` again (appended to the parameters), the mask
        buffer goes."""
        pruned = method.apply_mask(module)
        if hasattr(module, name):
            delattr(module, name)
        orig = module._parameters[name + "_orig"]
        if dtensor.is_dtensor(orig):  # `.data =` does not reach a DTensor's local shard
            dtensor.assign(orig, pruned)
        else:
            orig.data = pruned.data
        del module._parameters[name + "_orig"]
        del module._buffers[name + "_mask"]
        setattr(module, name, orig)


class InPlace:
    """FSDP2 parameters, pruned in place (see :mod:`fastprune.fsdp`).

    Args:
        found: FSDP2's ``(FSDPParam, FSDPState)`` of the parameter, when
            pruning it (None when only reading or removing).
    """

    def __init__(self, found=None):
        self.found = found

    def install(self, module, name, orig):
        """First prune: the parameter stays where it is."""

    def values(self, module, name):
        return getattr(module, name)

    def publish(self, module, name, method):
        """Nothing to recompute: the parameter holds the pruned values."""

    def finish(self, module, name):
        """Multiply the values by the mask and keep them pruned (hooks)."""
        fsdp.hold(module, name, self.found)

    def remove(self, module, name, method):
        """The values are pruned already: drop the hooks and the mask."""
        fsdp.release(module, name)
        del module._buffers[name + "_mask"]


REPARAMETRIZED = Reparametrized()


def for_prune(module, name):
    """The layout a prune of ``module.<name>`` uses: in place for an FSDP2
    parameter (checked prunable now: sharded, not tied), else the
    reference's. A tensor keeps the layout of its first prune."""
    if name in module._parameters:
        found = fsdp.prunable(module, name)
        if found is not None:
            return InPlace(found)
    return REPARAMETRIZED


def finished_together():
    """A block in which every prune's :meth:`finish` waits for the block to
    end without an error (and is dropped if it fails): a global prune that
    fails on one pair then changes no values."""
    return fsdp.deferred()


def of(module, name):
    """The layout of the pruned tensor ``module.<name>``: in place when it is
    still a registered parameter (the reference's layout moved it to
    ``<name>_orig``)."""
    return InPlace() if name in module._parameters else REPARAMETRIZED


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
