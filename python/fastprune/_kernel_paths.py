"""How the kernels serve fastprune's own methods: the kernel paths and the
mask computations they run.

Each method class of :mod:`fastprune.prune` names its path (a class
attribute ``_kernel``); :func:`fastprune._methods._kernel_path` answers, in one
place, whether a method object may take it (our exact class, its
``compute_mask`` not replaced). A path says how a container step and a
global prune compute their masks:

* :class:`UnstructuredPath` (L1 and random): one select among the entries
  still at 1 of one tensor or several (:func:`magnitude_masks`,
  :func:`random_masks`), nothing concatenated;
* :class:`StructuredPath` (Ln and random structured): the channels not yet all
  zero are ranked (:func:`structured_on_live`), nothing gathered;
* :class:`SegmentedPath` (N:M and per-channel): the method's own kernel reads
  the old mask in place.

Everything here runs on local tensors and DTensors alike, through
:mod:`fastprune._backends`.
"""
import functools

import torch
from torch.nn.utils import prune as _torch_prune

from . import _backends, ops
from ._twins import (_compute_nparams_toprune, _validate_pruning_amount, _validate_pruning_dim,
                     _validate_structured_pruning)


class KernelPath:
    """How the kernels serve one of our method classes (its ``_kernel``)."""

    # A first prune may pass a stride-0 view of a single one as the default
    # mask (the kernel reads it in place, see unpruned_mask).
    first_ones = True
    # Its global select reads masks in every stored format (see UnstructuredPath).
    reads_live_sets = False

    def accepts(self, t, mask):
        """Whether the path serves a container step on ``t`` with ``mask``."""
        return True

    def step(self, method, t, mask):
        """The container's step: ``mask`` with ``method`` applied where the
        earlier members left it unpruned, in ``t``'s dtype; never written into."""
        raise NotImplementedError

    def global_masks(self, method, currents, scores, masks):
        """The masks of ``global_unstructured`` (see :func:`magnitude_masks`)."""
        raise TypeError(
            f"global_unstructured(): {type(method).__name__} prunes inside each tensor "
            "(per group or per slice) and cannot rank several tensors together; "
            "prune each parameter on its own")


class UnstructuredPath(KernelPath):
    """L1/RandomUnstructured: one select among the entries still at 1 of one
    tensor (a container's step) or several (global pruning)."""

    def __init__(self, masks, random):
        self.masks = masks  # masks(amount, currents, scores, masks), see magnitude_masks
        self.random = random  # ranks random draws (largest first) instead of |score|
        # A global magnitude select reads masks in every stored format (the
        # in-place layout's packed bits included) and answers in it.
        self.reads_live_sets = not random

    def accepts(self, t, mask):
        return not mask.is_complex()  # the unstructured kernels take real masks

    def step(self, method, t, mask):
        return self.masks(method.amount, [t], [t], [mask])[0]

    def global_masks(self, method, currents, scores, masks):
        return self.masks(method.amount, currents, scores, masks)


class StructuredPath(KernelPath):
    """Ln/RandomStructured in a container: the channels not yet all zero are
    ranked without gathering ``t`` or the mask."""

    first_ones = False

    def accepts(self, t, mask):
        # On a 1-D tensor the reference indexes with a 0-dim bool, which adds a
        # leading dim: the method then prunes a (1, n) (or (0, n)) view instead
        # of failing; the generic path does the same.
        return t.device.type != "meta" and t.dim() > 1

    def step(self, method, t, mask):
        dim = structured_dim(method, t)
        backend = _backends.of(t, mask)
        return structured_on_live(backend, method, t, mask, dim, backend.live_channels(mask, dim))


class SegmentedPath(KernelPath):
    """L1SemiStructured / ChannelwiseL1Unstructured: their ``compute_mask``
    reads the old mask in place and prunes only its live entries, so a
    container hands it the whole tensor (gathering the live entries into 1-D
    would lose the groups and slices). Never global."""

    def step(self, method, t, mask):
        return method.compute_mask(t, mask).to(dtype=t.dtype)


def promoted_scores(scores):
    """The scores as ``torch.cat`` would promote them, one tensor each, uncopied where possible."""
    dtype = functools.reduce(torch.promote_types, [s.dtype for s in scores])
    return [s.detach().to(dtype) for s in scores], dtype


def kernel_operands(currents, scores, masks):
    """The scores in their promoted dtype, that dtype, and each tensor's
    current mask (a stride-0 view of a single one for an unpruned one)."""
    scores, dtype = promoted_scores(scores)
    olds = [unpruned_mask(c, s) if m is None else m.detach() for c, s, m in zip(currents, scores, masks)]
    return scores, dtype, olds


def unpruned_mask(orig, scores):
    """All ones shaped like ``orig``, for a kernel: a stride-0 view of a single
    one where the result's layout (the scores') is ``ones_like(orig)``'s too.
    Anything else (a None parameter too) goes to ``torch.ones_like``, which
    fails on it as the reference does."""
    return _backends.of(orig).ones_like(orig, scores)


def magnitude_masks(amount, currents, scores, masks):
    """L1 masks of one or several tensors ranked together (global pruning, and
    a container's unstructured step), without concatenating or gathering
    anything; one new mask per tensor, in the scores' promoted dtype.

    ``masks`` holds each tensor's current mask, or None for an unpruned one.
    Candidates are the entries still at 1; ``|score|`` is ranked across all
    parameters with one multi-tensor select. New masks take the scores'
    dtype, as the reference's, except packed ones (of an in-place layout's
    bits), which keep their format.
    """
    scores, dtype, olds = kernel_operands(currents, scores, masks)
    new = _backends.of(*scores).magnitude_masks(amount, currents, scores, olds, masks)
    return [m if m.shape != s.shape else m.to(dtype) for m, s in zip(new, scores)]


def random_masks(amount, currents, scores, masks):
    """Random masks, as :func:`magnitude_masks` takes its arguments: one draw
    per candidate in concatenation order, exactly as the reference, then the
    k largest draws are pruned. On the meta device nothing is drawn. DTensors
    take draws keyed by global position instead (docs/distributed.md)."""
    scores, dtype, olds = kernel_operands(currents, scores, masks)
    new = _backends.of(*scores).random_masks(amount, currents, scores, olds, masks, dtype)
    return [m.to(dtype) for m in new]


def structured_dim(method, t):
    """The container's channel dim of a structured member, made non-negative."""
    if not hasattr(method, "dim"):
        raise AttributeError(
            'Pruning methods of PRUNING_TYPE "structured" need to have the '
            "attribute `dim` defined.")
    ndim = t.dim()
    dim = method.dim + ndim if method.dim < 0 else method.dim
    if dim < 0:
        raise IndexError(f"Index is out of bounds for tensor with dimensions {ndim}")
    return dim


def structured_keep(backend, method, t, live=None):
    """Which channels of ``t`` along ``method.dim`` a structured method keeps:
    one 0/1 per channel, or None when it prunes none (``backend``: ``t``'s).

    With ``live`` (one bool per channel), only the live channels take part, as
    if ``t`` were ``t[live]`` along the dim (the container's view): amounts,
    validation and random draws count the live channels; dead ones get 1.
    """
    dim = method.dim
    region = t
    if live is not None:
        shape = list(t.shape)
        shape[dim] = int(live.sum())
        region = torch.empty(shape, device="meta")  # for the checks and their messages
    _validate_structured_pruning(region)
    _validate_pruning_dim(region, dim)
    channels = region.shape[dim]
    k = _compute_nparams_toprune(method.amount, channels)
    _validate_pruning_amount(k, channels)
    if isinstance(method, _torch_prune.LnStructured):
        # One pass of the kernel for real n ('fro' on 2-D: the 2-norm), else
        # the reference's _compute_norm; float64 sums, so norms equal up to
        # rounding may rank differently than torch's.
        norms = backend.channel_norms(t, method.n, dim)
        if live is not None:
            norms = norms[live]
        if k == 0:
            return None
        # The k smallest norms go, ties to the lower channel index (NaN last).
        ones = torch.ones((), dtype=norms.dtype, device=norms.device).expand(channels)
        keep = ops.unstructured_mask(norms.detach(), ones, count=k)
    else:
        if k == 0:
            return None
        draws = torch.rand(channels)  # CPU default generator, as the reference
        draws = backend.shared_draws(t, draws)
        keep = draws > torch.kthvalue(draws, k=k).values
    if live is None:
        return keep
    full = torch.ones(t.shape[dim], dtype=t.dtype, device=t.device)
    full[live] = keep.to(device=t.device, dtype=t.dtype)
    return full


def structured_on_live(backend, method, t, mask, dim, live):
    """Container path for our structured methods: the last method ranks only
    the channels not yet all zero, without gathering ``t`` or the mask."""
    keep = structured_keep(backend, method, t, live)
    new = mask.to(dtype=t.dtype)
    if keep is None:
        return new
    return backend.scale_channels(t, dim, keep, new)


def segmented_select(t, mask, **kwargs):
    """:func:`fastprune.ops.segmented_mask` of ``|t|`` on ``mask``'s device,
    its live entries those at 1 (a complex mask, of a complex parameter, is
    read through them: the kernel takes real masks). Each rank's shard
    alone for a DTensor, where every group or slice lies in one shard."""
    _backends.check_like(mask, t, "the mask")
    return _backends.of(t, mask).per_segment(t, mask, kwargs["dim"], not kwargs.get("group"),
                                             lambda s, m: segment_kernel(s, m, **kwargs))


def segment_kernel(t, mask, **kwargs):
    scores = _backends.magnitude_scores(t)
    if scores.device != mask.device:
        scores = scores.to(mask.device)
    mask = mask.detach()
    if mask.is_complex():
        live = mask == 1
        kept = ops.segmented_mask(scores, live, **kwargs)
        return mask.masked_fill(live & ~kept, 0)
    return ops.segmented_mask(scores, mask, **kwargs)
