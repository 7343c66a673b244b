"""What kind of tensor a prune works on: the tensor backends.

The methods of :mod:`fastprune.prune` ask :func:`of` once per call and call
the few operations that differ between a tensor held whole by this process
(:data:`LOCAL`) and a DTensor spread over a device mesh (:data:`SHARDED`,
which runs the cross-rank select of :mod:`fastprune.dtensor`): unstructured
selects (one tensor, several, random), channel norms, live channels,
channel masks, per-segment selects, shared random draws, the ones of a first
prune, and the check that every rank made the same call. Nothing else in the
drop-in surface knows about DTensors.
"""
import numbers

import torch

from . import _crossrank, _in_place, dtensor, ops
from ._twins import _check_count, _check_draws, _checked_count, _compute_nparams_toprune, _compute_norm, \
    _validate_pruning_amount

KERNEL_SCORE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def magnitude_scores(t):
    """``t`` detached, as a tensor whose magnitudes the kernel can rank."""
    t = t.detach()
    if t.dtype in KERNEL_SCORE_DTYPES:
        return t
    # torch.abs as in the reference: real for complex, and a bool tensor
    # fails here with the reference's error.
    magnitudes = torch.abs(t)
    return magnitudes if magnitudes.dtype in KERNEL_SCORE_DTYPES else magnitudes.to(torch.float64)


def count_ones(mask):
    """Number of entries equal to 1 (None on the meta device, where it is unknown)."""
    if mask.device.type == "meta":
        return None
    return int((mask == 1).sum())


def check_like(t, param, what):
    """Raise ValueError unless ``t`` and ``param`` are of one backend (and,
    for DTensors, one mesh and placements): see :func:`fastprune.dtensor.check_like`."""
    dtensor.check_like(t, param, what)


def first_sharded(tensors):
    """The first DTensor of ``tensors`` (their mesh is the call's), or None."""
    return next((t for t in tensors if dtensor.is_dtensor(t)), None)


def check_one_mesh(tensors):
    """Raise ValueError for tensors of both backends, or on several meshes."""
    dtensor.check_one_mesh(tensors)


class Local:
    """Tensors this process holds whole: the kernels of :mod:`fastprune.ops`."""

    boolean_indexing = True  # the reference's generic container step works
    selects_in_place = True  # fastprune.ops.prune_in_place_ serves in-place global prunes

    def agree(self, t, call, error=None):
        """Nothing to agree with: raise ``error`` if there is one."""
        if error is not None:
            raise error

    def assign(self, param, value):
        """Give the parameter ``param`` the values of ``value``."""
        param.data = value.data

    def mask_format(self, param, fmt):
        """The in-place mask format ``param`` gets when ``fmt`` is asked for."""
        return fmt

    def stored_mask(self, mask, fmt, param):
        """The computed ``mask`` of ``param`` in format ``fmt`` (see
        :mod:`fastprune._in_place`)."""
        return _in_place.stored(mask, fmt, param)

    def live_set(self, buffer, fmt, param):
        """The in-place mask ``buffer`` as a select reads it (all live where
        None); the local selects read every format."""
        return _in_place.all_live(fmt, param) if buffer is None else buffer

    def unpacked_mask(self, buffer, param):
        """The stored mask ``buffer`` of ``param`` as a tensor of its shape."""
        return _in_place.unpacked(buffer, param.shape)

    def ones_like(self, orig, scores):
        """All ones shaped like ``orig``, for a kernel: a stride-0 view of a
        single one where the result's layout (the scores') is
        ``ones_like(orig)``'s too. Anything else (a None parameter too) goes
        to ``torch.ones_like``, which fails on it as the reference does."""
        if (isinstance(orig, torch.Tensor) and isinstance(scores, torch.Tensor) and orig.numel() > 1
                and orig.is_contiguous() and scores.is_contiguous()):
            return torch.ones((), dtype=orig.dtype, device=orig.device).expand(orig.shape)
        return torch.ones_like(orig)

    def select(self, scores, mask, **kwargs):
        """:func:`fastprune.ops.unstructured_mask` on ``mask``'s device."""
        if scores.device != mask.device:
            scores = scores.to(mask.device)
        if mask.is_complex():  # (a complex parameter) the kernel takes real masks
            ones = torch.ones((), dtype=scores.dtype, device=mask.device).expand(mask.shape)
            kept = ops.unstructured_mask(scores, ones, **kwargs)
            return mask.detach().masked_fill(kept == 0, 0)
        return ops.unstructured_mask(scores, mask.detach(), **kwargs)

    def random_mask(self, t, mask, k):
        """Zero k random entries of ``mask``: ``torch.rand_like(t)`` drawn as
        the reference draws, the k largest pruned."""
        draws = torch.rand_like(t, memory_format=torch.contiguous_format)
        _check_draws(draws, k)
        return self.select(draws, mask, count=k, largest=True)

    def magnitude_masks(self, amount, currents, scores, olds, masks):
        """L1 masks of several tensors ranked together with one multi-tensor
        select (see :func:`fastprune._kernel_paths.magnitude_masks`)."""
        scores = [magnitude_scores(s) for s in scores]
        if any(_in_place.is_packed(o, s) for o, s in zip(olds, scores)):
            # Packed masks (in place, mask="bits"): the separable passes read
            # them as the live set and answer in them, with no unpacked copy.
            return _crossrank.select(_crossrank.whole(scores, olds), _crossrank.Alone(scores[0].device),
                                     lambda n: _checked_count(amount, n), only_ones=True)
        if isinstance(amount, float) and 0.0 <= amount <= 1.0:
            # The kernel computes round(amount * candidates) exactly as Python does.
            return ops.global_unstructured_masks(scores, olds, fraction=amount, only_ones=True)
        k, _, _ = _candidate_count(amount, currents, masks)
        _check_count(k)
        return ops.global_unstructured_masks(scores, olds, count=k, only_ones=True)

    def random_masks(self, amount, currents, scores, olds, masks, dtype):
        """Random masks of several tensors: one draw per candidate in
        concatenation order, exactly as the reference, then the k largest
        draws are pruned. On the meta device nothing is drawn."""
        k, n, counts = _candidate_count(amount, currents, masks)
        if n is None:
            _check_count(k)  # else after the draws below, where the reference's topk fails
        new = [m.to(dtype, copy=True) for m in olds]
        if n is None or k == 0:
            return new
        draws = torch.rand(n, dtype=dtype, device=scores[0].device)
        _check_draws(draws, k)
        if all(m is None for m in masks):
            # Every entry is a candidate: the draws are in concatenation order, so
            # each parameter's share is a plain view and nothing is scattered.
            shares, start = [], 0
            for c in currents:
                shares.append(draws[start:start + c.numel()].view(c.shape))
                start += c.numel()
            return ops.global_unstructured_masks(shares, olds, count=k, largest=True)
        ones = torch.ones((), dtype=dtype, device=draws.device).expand(n)
        kept = self.select(draws, ones, count=k, largest=True)
        start = 0
        for mask, old, count in zip(new, olds, counts):
            mask[old == 1] = kept[start:start + count]
            start += count
        return new

    def channel_norms(self, t, n, dim):
        """Norms that rank ``t``'s channels: one pass of the kernel for real
        ``n`` (and ``'fro'`` on 2-D tensors, the 2-norm there), else the
        reference's ``_compute_norm`` (its errors included). The kernel
        accumulates in float64, so norms equal up to rounding may rank
        differently than torch's."""
        p = 2 if isinstance(n, str) and n == "fro" and t.dim() == 2 else n
        if (isinstance(p, numbers.Real) and not isinstance(p, bool)
                and t.dtype in KERNEL_SCORE_DTYPES and t.numel() > 0):
            return ops.channel_norms(t.detach(), dim, p)
        return _compute_norm(t, n, dim)

    def live_channels(self, mask, dim):
        """The reference's live channels, ``mask.sum(dim=<all but dim>) != 0``.

        Sums the leading dims first and then the trailing ones: torch reduces
        all but a middle dim of a contiguous tensor in one go several times
        slower. The order of the additions cannot change which sums are zero
        unless the mask has negative entries. A 1-D mask (whose full sum the
        reference's ``dim=[]`` gives: a 0-dim result), a dim out of range or
        not an int take the reference's expression, so that they fail or
        index as there."""
        if not (isinstance(dim, int) and 0 <= dim < mask.dim() and mask.dim() > 1):
            return mask.sum(dim=[d for d in range(mask.dim()) if d != dim]) != 0
        if dim > 0:
            mask = mask.sum(dim=list(range(dim)))
        return (mask.sum(dim=list(range(1, mask.dim()))) if mask.dim() > 1 else mask) != 0

    def channel_mask(self, t, dim, keep, mask):
        """A fresh mask of ``t``'s dtype and format: ``mask`` times
        ``keep[channel]`` along ``dim``, written in one pass."""
        shape = [1] * t.dim()
        shape[dim] = -1
        keep = keep.to(device=t.device, dtype=t.dtype).view(shape)
        out = ops.cached_empty_like(t) if t.device.type == "cpu" else torch.empty_like(t)
        return torch.mul(mask.to(dtype=t.dtype), keep, out=out)

    def scale_channels(self, t, dim, keep, mask):
        """``mask`` (``t``'s dtype, its own format) times ``keep[channel]``."""
        shape = [1] * t.dim()
        shape[dim] = -1
        return mask * keep.view(shape)

    def shared_draws(self, t, draws):
        """The draws every rank uses: this process's own."""
        return draws

    def per_segment(self, t, mask, dim, whole_slices, select):
        """``select(t, mask)`` (N:M groups or slices: all of them are here)."""
        return select(t, mask)


class Sharded:
    """DTensors: the exact cross-rank selects of :mod:`fastprune.dtensor`."""

    boolean_indexing = False  # no boolean indexing of DTensors
    selects_in_place = False  # the cross-rank select writes new masks

    def agree(self, t, call, error=None):
        """Check that every rank of ``t``'s mesh made this call."""
        dtensor.agree(t, call, error)

    def assign(self, param, value):
        dtensor.assign(param, value)  # (`.data =` does not reach a DTensor's local shard)

    def unsupported_container_step(self, method, t):
        """The error of a container step the reference would run by boolean
        indexing, which DTensors do not have (for any other method than
        Identity and the "global" ones)."""
        if method.PRUNING_TYPE == "structured" and t.dim() <= 1:
            return NotImplementedError(
                f"fastprune: {type(method).__name__} on a 1-D DTensor that is already pruned: the "
                "reference then prunes a (1, n) view of it (a quirk of its boolean indexing), which "
                "fastprune does not reproduce for DTensors; prune 1-D parameters with an unstructured "
                "method")
        return NotImplementedError(
            f"fastprune: {type(method).__name__} in a PruningContainer is not supported for DTensor "
            "parameters (supported: fastprune's own L1/Random Unstructured, Ln/Random Structured, "
            "Identity, CustomFromMask)")

    def mask_format(self, param, fmt):
        """Bool where a packed mask cannot be placed like ``param``
        (:func:`fastprune.dtensor.packs_like`)."""
        return "bool" if fmt == "bits" and not dtensor.packs_like(param) else fmt

    def stored_mask(self, mask, fmt, param):
        if fmt == "dense":
            return mask
        shape = ops.packed_shape(param.shape) if fmt == "bits" else param.shape
        return dtensor.with_local(_in_place.stored(mask.to_local(), fmt, param.to_local()), param, shape)

    def live_set(self, buffer, fmt, param):
        """Cross-rank selects read dense masks: bits are unpacked (None: unpruned)."""
        return None if buffer is None else self.unpacked_mask(buffer, param)

    def unpacked_mask(self, buffer, param):
        if _in_place.format_of(buffer) != "bits":
            return buffer
        return dtensor.with_local(_in_place.unpacked(buffer.to_local(), param.to_local().shape), param, param.shape)

    def ones_like(self, orig, scores):
        return dtensor.ones_like(orig)

    def select(self, scores, mask, count, **kwargs):
        return dtensor.select_masks([scores], [mask], lambda n: count, **kwargs)[0]

    def random_mask(self, t, mask, k):
        """k entries chosen by draws keyed on their global position, with
        rank 0's seed (docs/distributed.md)."""
        _check_count(k)
        return dtensor.select_masks([t], [mask], lambda n: k, largest=True, random=True)[0]

    def magnitude_masks(self, amount, currents, scores, olds, masks):
        return dtensor.select_masks([magnitude_scores(s) for s in scores], olds,
                                    lambda n: _checked_count(amount, n), only_ones=True)

    def random_masks(self, amount, currents, scores, olds, masks, dtype):
        return dtensor.select_masks([magnitude_scores(s) for s in scores], olds,
                                    lambda n: _checked_count(amount, n), only_ones=True, largest=True,
                                    random=True)

    def channel_norms(self, t, n, dim):
        return dtensor.channel_norms(t, n, dim)

    def live_channels(self, mask, dim):
        if isinstance(dim, int) and 0 <= dim < mask.dim():
            return dtensor.live_channels(mask, dim)
        return LOCAL.live_channels(mask, dim)  # fails as the reference does

    def channel_mask(self, t, dim, keep, mask):
        return dtensor.channel_mask(t, dim, keep, mask)

    scale_channels = channel_mask

    def shared_draws(self, t, draws):
        return dtensor.shared_draws(t, draws)  # rank 0's, on every rank

    def per_segment(self, t, mask, dim, whole_slices, select):
        return dtensor.local_segments(t, mask, dim, whole_slices=whole_slices, select=select)


LOCAL = Local()
SHARDED = Sharded()


def of(*tensors):
    """The backend of a call on ``tensors``: :data:`SHARDED` if any is a DTensor."""
    return SHARDED if any(dtensor.is_dtensor(t) for t in tensors) else LOCAL


def _candidate_count(amount, currents, masks):
    """k, the candidates n (None on the meta device, where they are unknown
    and an integer amount cannot be checked) and each tensor's candidates."""
    counts = [c.numel() if m is None else count_ones(m) for c, m in zip(currents, masks)]
    if any(n is None for n in counts):
        return amount, None, counts
    n = sum(counts)
    k = _compute_nparams_toprune(amount, n)
    _validate_pruning_amount(k, n)
    return k, n, counts
