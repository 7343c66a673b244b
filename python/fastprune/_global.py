"""Global pruning, shared by the single-process and DTensor entry point
(:func:`fastprune.prune.global_unstructured`) and the rank-partitioned one
(:func:`fastprune.distributed.global_unstructured`): the reference's checks,
the typed record of a prepared call, the agreement of the ranks, the masks
(a kernel path, the fused in-place select, or the reference's concatenation)
and their all-or-nothing application through :class:`CustomFromMask`.
"""
import dataclasses
import functools
from collections.abc import Iterable
from typing import Optional

import torch

from . import _backends, _kernel_paths, _layouts, ops
from ._methods import (BasePruningMethod, CustomFromMask, PruningContainer, _AnyContainer, _AnyMethod,
                       _kernel_path)
from ._twins import _checked_count


def global_unstructured(parameters, pruning_method, importance_scores, kwargs):
    """:func:`fastprune.prune.global_unstructured`: the method's kernel path
    (the fused in-place select when every pair allows it), else the
    reference's algorithm; then every pair gets its share, all or nothing."""
    prepared = _prepare_global_agreed(parameters, importance_scores, pruning_method, kwargs)
    currents, scores, method = prepared.currents, prepared.scores, prepared.method
    path = _kernel_path(method)
    if path is not None and all(path.accepts(s, m) for s, m in zip(scores, prepared.masks_or_ones)):
        writable = prepared.writable_masks() if path.reads_live_sets else None
        if writable is not None:
            return _global_in_place(prepared, writable)
        masks = prepared.live_sets() if path.reads_live_sets else prepared.masks()
        own_masks = path.global_masks(method, currents, scores, masks)
    else:
        own_masks = _global_reference_masks(prepared.container, currents, scores, prepared.masks())
    _apply_global_masks(prepared.parameters, own_masks, prepared.firsts)


def _global_in_place(prepared, masks):
    """A global magnitude prune whose pairs are all pruned in place (bits or
    bool masks, local tensors): :func:`fastprune.ops.prune_in_place_` selects
    among the live entries and, in its last pass, clears the pruned entries'
    mask bits and zeroes their values; the masks are the stored ones (for a
    first prune, new ones with every entry live), nothing else is allocated.
    The amount is checked, and every pair installed, before it runs."""
    scores, _ = _kernel_paths.promoted_scores([_backends.magnitude_scores(s) for s in prepared.scores])
    n = sum(c.numel() if first else layout.count_live(m) for c, m, first, layout in
            zip(prepared.currents, masks, prepared.firsts, prepared.layouts))
    k = _checked_count(prepared.method.amount, n)
    values = [module._parameters[name].detach() for module, name in prepared.parameters]
    _apply_global_masks(prepared.parameters, list(masks), prepared.firsts,
                        prune_values=lambda: ops.prune_in_place_(values, scores, masks, k))


def _prepare_global_agreed(parameters, importance_scores, pruning_method, kwargs):
    """:func:`_prepare_global`, the layouts' checks (an FSDP2 parameter held
    gathered or tied raises), and with DTensor parameters the check that
    every rank of their mesh made the same call. Every check that can fail
    on one rank only (a misspelled name, an extra plain pair, scores of
    another shape) runs before that agreement, which reports it to every
    rank: no rank is left waiting in a collective for a peer that raised."""
    if isinstance(parameters, Iterable):
        parameters = list(parameters)
    mesh_tensor = _backends.first_sharded(_named_tensors(parameters))
    prepared, error, call = None, None, []
    try:
        prepared = _prepare_global(parameters, importance_scores, pruning_method, kwargs)
        _backends.check_one_mesh(prepared.currents)
        call = [("method", getattr(pruning_method, "__name__", pruning_method)), *sorted(kwargs.items()),
                ("parameters", prepared.currents), ("importance_scores", prepared.scores),
                ("pruned", [not first for first in prepared.firsts])]
    except Exception as e:  # reported to every rank by agree()
        error = e
    _backends.of(mesh_tensor).agree(mesh_tensor, call, error)
    return prepared


def _named_tensors(parameters):
    """The tensors the pairs name, skipping malformed pairs and missing
    names (:func:`_prepare_global` raises the reference's errors for them)."""
    out = []
    for pair in parameters if isinstance(parameters, list) else ():
        try:
            module, name = pair
            out.append(getattr(module, name))
        except Exception:
            continue
    return out


@dataclasses.dataclass
class _PreparedGlobal:
    """The checked arguments of a global prune (see :func:`_prepare_global`)."""

    parameters: list  # the (module, name) pairs
    layouts: list  # each pair's layout (see fastprune._layouts.for_prune)
    currents: list  # each pair's current tensor (``module.<name>``)
    scores: list  # each pair's importance scores
    firsts: list  # whether each pair is unpruned
    masks_or_ones: list  # each pair's mask buffer, or its tensor where unpruned (device checks)
    method: BasePruningMethod  # the pruning method, made from the kwargs
    container: PruningContainer  # a one-member container of it (the reference algorithm)
    dtype: Optional[torch.dtype]  # the scores' promoted dtype (None: no pairs)
    device: Optional[torch.device]  # the scores' device (None: no pairs)

    def masks(self):
        """Each pair's mask as a tensor of its shape, None where unpruned."""
        return [None if first else layout.mask(module, name)
                for (module, name), layout, first in zip(self.parameters, self.layouts, self.firsts)]

    def writable_masks(self):
        """Each pair's mask for a select that prunes in place
        (:meth:`fastprune._layouts.InPlace.writable_mask`), or None unless
        every pair has one."""
        masks = [layout.writable_mask(module, name) for (module, name), layout in zip(self.parameters, self.layouts)]
        return None if not masks or any(m is None for m in masks) else masks

    def live_sets(self):
        """Each pair's mask as its layout stores it, for a select that reads
        every stored format (None: unpruned in the reference's layout)."""
        return [layout.live_set(module, name, current) for (module, name), layout, current
                in zip(self.parameters, self.layouts, self.currents)]


def _prepare_global(parameters, importance_scores, pruning_method, kwargs, allow_empty=False):
    """Check the arguments of :func:`global_unstructured` as the reference does
    and gather what the masks need: each pair's layout, current tensor and
    scores, the method and its one-member container. ``allow_empty`` accepts
    no pairs (a rank of a distributed prune)."""
    if not isinstance(parameters, Iterable):
        raise TypeError("global_unstructured(): parameters is not an Iterable")
    if importance_scores is None:
        importance_scores = {}
    if not isinstance(importance_scores, dict):
        raise TypeError("global_unstructured(): importance_scores must be of type dict")
    parameters = list(parameters)

    currents, scores, buffers = [], [], []
    for module, name in parameters:
        current = getattr(module, name)
        currents.append(current)
        scores.append(importance_scores.get((module, name), current))
        buffers.append(getattr(module, name + "_mask", None))
    _check_same_device(scores)
    for (module, name), score, current in zip(parameters, scores, currents):
        if score.shape != current.shape:
            # The reference does not check: it fails later with an IndexError,
            # or silently misaligns the scores when the total size agrees.
            raise IndexError(
                f"global_unstructured(): importance_scores for parameter {name} of {module} "
                f"should have its shape {tuple(current.shape)}, got {tuple(score.shape)}")
        _backends.check_like(score, current, "importance_scores")
    masks_or_ones = [current if mask is None else mask for mask, current in zip(buffers, currents)]
    _check_same_device(masks_or_ones)
    if not parameters and not allow_empty:
        raise ValueError("torch.cat(): expected a non-empty list of Tensors")
    layouts = [_layouts.for_prune(module, name) for module, name in parameters]

    method = pruning_method(**kwargs)
    method._tensor_name = "temp"
    if method.PRUNING_TYPE != "unstructured":
        raise TypeError(
            'Only "unstructured" PRUNING_TYPE supported for the `pruning_method`. '
            f"Found method {pruning_method} of type {method.PRUNING_TYPE}")
    container = PruningContainer()
    container._tensor_name = "temp"
    container.add_pruning_method(method)
    dtype = functools.reduce(torch.promote_types, [s.dtype for s in scores]) if scores else None
    return _PreparedGlobal(parameters=parameters, layouts=layouts, currents=currents, scores=scores,
                           firsts=[b is None for b in buffers], masks_or_ones=masks_or_ones, method=method,
                           container=container, dtype=dtype, device=scores[0].device if scores else None)


def _apply_global_masks(parameters, own_masks, firsts, prune_values=None):
    """Prune each pair with its mask through :func:`custom_from_mask`; all or
    nothing: if one fails, every module is put back as it was.

    ``firsts`` says for each pair whether it was unpruned. ``prune_values``,
    when given, runs once every pair is installed: it computes the masks in
    place and prunes the values (the pairs are then held without masking
    them again)."""
    names = {}
    for module, name in parameters:
        names.setdefault(id(module), (module, []))[1].append(name)
    saved = {key: _layouts.Snapshot(module, module_names) for key, (module, module_names) in names.items()}
    done = []
    try:
        with _layouts.finished_together(masked=prune_values is not None):  # values change last
            for i, (module, name) in enumerate(parameters):
                CustomFromMask._apply_owned(module, name, own_masks[i])
                own_masks[i] = None
                _share_mask(module, name, first=firsts[i])
                done.append((module, name))
            if prune_values is not None:
                prune_values()
    except BaseException:
        # All or nothing: undo the parameters pruned before the failure.
        for key, snapshot in saved.items():
            snapshot.restore(reassigned=[name for module, name in done if id(module) == key])
        raise


def _share_mask(module, name, first):
    """After a prune by :class:`CustomFromMask` with a global prune's share,
    let the method hold the buffer itself where the layout says the buffer
    has its values (see :meth:`~fastprune._layouts.Reparametrized.shares_buffer`),
    so a second copy of the mask need not stay alive."""
    hook = next(hook for hook in module._forward_pre_hooks.values()
                if isinstance(hook, _AnyMethod) and hook._tensor_name == name)
    method = hook._pruning_methods[-1] if isinstance(hook, _AnyContainer) else hook
    buffer = getattr(module, name + "_mask")
    if type(method) is CustomFromMask and _layouts.of(module, name).shares_buffer(method.mask, buffer, first):
        method.mask = buffer


def _global_reference_masks(container, currents, scores, masks):
    """The reference algorithm (any unstructured method): one concatenated mask,
    split into one copy per parameter so that no hook keeps the whole."""
    flat_scores = torch.cat([s.detach().reshape(-1) for s in scores])
    default_mask = torch.cat([
        (torch.ones_like(current) if mask is None else mask.detach()).reshape(-1)
        for mask, current in zip(masks, currents)])
    final = container.compute_mask(flat_scores, default_mask)
    del flat_scores, default_mask
    own_masks, start = [], 0
    for current in currents:
        stop = start + current.numel()
        own = torch.empty_like(current, dtype=final.dtype)
        own_masks.append(own.copy_(final[start:stop].view(current.shape)))
        start = stop
    return own_masks


def _check_same_device(tensors):
    devices = [t.device for t in tensors]  # a None parameter fails here, as in the reference
    if any(d != devices[0] for d in devices[1:]):
        raise TypeError("Found two parameters on different devices, this is currently not supported.")
