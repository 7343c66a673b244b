"""Typed, documented wrappers over the ``torch.ops.fastprune`` kernels."""
from typing import List, NamedTuple, Optional, Sequence

import torch


def is_broadcast_one(t: torch.Tensor) -> bool:
    """Whether ``t`` is one value broadcast over its whole shape (every stride
    0, more than one entry): the "all ones" mask a first prune passes, which
    the kernels read in place and answer with a fresh mask of the scores'
    layout."""
    return t.numel() > 1 and all(s == 0 for s in t.stride())


def _amount_args(count, fraction):
    if (count is None) == (fraction is None):
        raise ValueError("fastprune: give exactly one of count and fraction")
    return (-1 if count is None else int(count)), (0.0 if fraction is None else float(fraction))


def unstructured_mask(
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    count: Optional[int] = None,
    fraction: Optional[float] = None,
    only_ones: bool = False,
    largest: bool = False,
) -> torch.Tensor:
    """New unstructured mask: ``mask`` with exactly k candidates set to 0.

    Args:
        scores: floating-point importance scores (float16, bfloat16, float32,
            float64), any strides.
        mask: the current mask, same shape, any dtype and strides (a
            broadcast ``expand`` of one value is read without materializing it).
        count: prune exactly this many candidates. Give ``count`` or ``fraction``.
        fraction: prune ``round(fraction * candidates)`` (ties to even, as
            Python's ``round``).
        only_ones: candidates are the entries where ``mask == 1`` instead of
            all entries.
        largest: prune the largest ``|scores|`` instead of the smallest.

    Returns:
        A new tensor with ``mask``'s dtype and memory format (the scores' format
        when ``mask`` is a broadcast). Of the candidates, the k with the smallest
        ``|scores|`` (NaN above inf) are 0; ties at the threshold are pruned in
        increasing row-major flat index. Every other entry equals ``mask``.
    """
    return torch.ops.fastprune.unstructured_mask(scores, mask, *_amount_args(count, fraction), only_ones, largest)


def global_unstructured_masks(
    scores: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    *,
    count: Optional[int] = None,
    fraction: Optional[float] = None,
    only_ones: bool = False,
    largest: bool = False,
) -> List[torch.Tensor]:
    """:func:`unstructured_mask` over several tensors ranked together.

    The tensors are ranked as if flattened and concatenated in list order
    (ties: earlier tensor first, then lower flat index), but nothing is
    concatenated: each gets its own new mask. All ``scores`` must share one
    floating dtype and device; ``masks`` may have different dtypes. ``fraction``
    counts the candidates of all tensors together.

    Returns:
        One new mask per tensor, as :func:`unstructured_mask` would shape it.
    """
    scores, masks = list(scores), list(masks)
    count, fraction = _amount_args(count, fraction)
    if not scores and not masks:  # no tensor for the dispatcher to route by
        if count > 0:
            raise ValueError(f"fastprune: cannot prune {count} entries out of 0 candidates")
        return []
    return torch.ops.fastprune.global_unstructured_masks(scores, masks, count, fraction, only_ones, largest)


PASS_DIGIT_BITS = 11
"""Width of the digits :func:`radix_histogram` counts: 2048 bins per pass."""


def pass_digits(dtype: torch.dtype) -> int:
    """Number of :func:`radix_histogram` digits of the keys of ``dtype`` scores
    (2 for float16/bfloat16, 3 for float32, 6 for float64)."""
    return -(-torch.finfo(dtype).bits // PASS_DIGIT_BITS)


def radix_histogram(
    scores: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    digit: int,
    prefix: int,
    *,
    only_ones: bool = False,
    largest: bool = False,
) -> torch.Tensor:
    """One radix pass of the select, for combining across processes.

    Keys are those :func:`unstructured_mask` ranks (the bits of ``|score|``
    with NaN above inf, mirrored when ``largest``): non-negative ints below
    2**63, of ``torch.finfo(dtype).bits`` bits, read as :data:`PASS_DIGIT_BITS`-bit
    digits from the most significant (the last one narrower).

    Args:
        scores: floating-point tensors of one dtype and device.
        masks: one per score tensor, same shape (any dtype; a broadcast
            ``expand`` is read in place).
        digit: which digit to count, in ``[0, pass_digits(dtype))``.
        prefix: a key whose digits above ``digit`` fix the candidates counted
            (its lower bits are ignored).
        only_ones: candidates are the entries where the mask is 1.
        largest: mirror the keys (rank the largest ``|scores|`` first).

    Returns:
        int64 tensor of ``2 ** PASS_DIGIT_BITS`` counts, on the scores' device.
    """
    return torch.ops.fastprune.radix_histogram(list(scores), list(masks), int(digit), int(prefix),
                                               only_ones, largest)


def count_at_key(
    scores: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    key: int,
    *,
    only_ones: bool = False,
    largest: bool = False,
) -> torch.Tensor:
    """Per tensor, the candidates whose key (see :func:`radix_histogram`) is ``key``.

    Returns:
        int64 tensor with one count per tensor, on the scores' device.
    """
    return torch.ops.fastprune.count_at_key(list(scores), list(masks), int(key), only_ones, largest)


def masks_at_threshold(
    scores: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    key: int,
    *,
    skip: int = 0,
    take: int = 0,
    only_ones: bool = False,
    largest: bool = False,
) -> List[torch.Tensor]:
    """The write pass: new masks for a threshold key found by the passes.

    Of the candidates, those with key below ``key`` are pruned; of those with
    key equal to it, numbered from 0 in concatenation order (earlier tensor,
    then lower row-major flat index), the ones numbered in ``[skip, skip +
    take)`` are pruned too. Every other entry keeps its mask value.

    Returns:
        One new mask per tensor, as :func:`global_unstructured_masks` shapes it.
    """
    scores, masks = list(scores), list(masks)
    if not scores and not masks:
        return []
    return torch.ops.fastprune.masks_at_threshold(scores, masks, int(key), int(skip), int(take),
                                                  only_ones, largest)


class RadixStep(NamedTuple):
    """What :func:`radix_step` finds."""

    prefix: int
    """The digits found so far (the given prefix's higher ones and this one's), lower bits 0."""
    rank: int
    """The wanted key's 1-based rank among the candidates whose key starts with ``prefix``."""
    count: int
    """Those candidates' number: the count of the histogram bin that holds the wanted key."""
    last: bool
    """The digit was the last: ``prefix`` is the wanted key, ``count`` its ties."""


def radix_step(hist: torch.Tensor, digit: int, prefix: int, rank: int, dtype: torch.dtype) -> RadixStep:
    """One step of the radix descent that :func:`radix_histogram` passes feed.

    The descent to the ``rank``-th smallest key goes digit by digit: count the
    digit over the candidates whose key starts with the digits found so far
    (:func:`radix_histogram`, summed over the processes that hold pieces of
    the ranking), then take this step, and count the next digit under its
    ``prefix``, until a step is the ``last``. The arithmetic is the one the
    single-process selects use (csrc/common/select.h), on the host.

    Args:
        hist: the ``2 ** PASS_DIGIT_BITS`` int64 counts of digit ``digit``
            (read on the host: pass a CPU tensor to avoid a copy).
        digit: the digit counted, in ``[0, pass_digits(dtype))``.
        prefix: the digits found by the earlier steps (lower bits ignored).
        rank: the wanted key's 1-based rank among the candidates counted.
        dtype: the scores' dtype (it fixes the keys' width).
    """
    prefix, rank, count, last = torch.ops.fastprune.radix_step(hist, int(digit), int(prefix), int(rank), dtype)
    return RadixStep(prefix, rank, count, bool(last))

def segmented_mask(
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    dim: int,
    group: int = 0,
    count: Optional[int] = None,
    fraction: Optional[float] = None,
    keep: bool = False,
) -> torch.Tensor:
    """New mask pruning inside segments: N:M groups, or every slice along a dim.

    Segments are every slice ``t.select(dim, i)`` when ``group`` is 0, else
    every run of ``group`` consecutive entries along ``dim`` (all other
    indices fixed; ``t.shape[dim]`` must be a multiple of ``group``). In each
    segment the live entries (``mask == 1``) with the smallest ``|scores|``
    are set to 0 (NaN ranks above inf; of equal scores the lower row-major
    position in the segment goes first); entries that are not live keep their
    mask value.

    Args:
        scores: floating-point importance scores (float16, bfloat16, float32,
            float64), any strides.
        mask: the current mask, same shape, any real dtype or bool, any
            strides (a broadcast ``expand`` of one value is read in place).
        dim: the dimension the segments are cut along.
        group: entries per group along ``dim``, or 0 for whole slices.
        count: with ``keep``, at most this many live entries stay in each
            segment (N:M: ``n``); without, exactly this many are pruned in
            each (a ValueError where a segment has fewer live entries).
        fraction: without ``keep``, prune ``round(fraction * live)`` in each
            segment (ties to even, as Python's ``round``). Give ``count`` or
            ``fraction``.
        keep: ``count`` is what stays rather than what goes.

    Returns:
        A new tensor with ``mask``'s dtype and memory format (the scores'
        format when ``mask`` is a broadcast).
    """
    count, fraction = _amount_args(count, fraction)
    return torch.ops.fastprune.segmented_mask(scores, mask, dim, group, count, fraction, keep)


def channel_norms(t: torch.Tensor, dim: int, p: float) -> torch.Tensor:
    """The ``p``-norm of every slice of ``t`` along ``dim``.

    The norms of ``torch.linalg.vector_norm(t, p, dim=<every other dim>)``,
    computed in one pass with float64 accumulation (so they may differ from
    torch's in the last bits; a general power of a float16/bfloat16/float32
    entry is taken in float, as torch does): ``p = inf`` is max ``|x|``, ``-inf`` min ``|x|``,
    ``0`` the count of non-zeros, any other ``p`` ``(sum |x|^p)^(1/p)``; NaN
    propagates.

    Args:
        t: floating-point tensor (float16, bfloat16, float32, float64), at
            least 1-D, any strides.
        dim: the channel dimension (negative counts from the end).
        p: the norm's order.

    Returns:
        float64 tensor of shape ``(t.shape[dim],)``.
    """
    return torch.ops.fastprune.channel_norms(t, dim, float(p))


def packed_shape(shape) -> tuple:
    """The shape of the packed mask of a tensor of shape ``shape``:
    ``(*shape[:-1], ceil(shape[-1] / 8))``, and ``(1,)`` for 0-d."""
    shape = tuple(shape)
    return (*shape[:-1], (shape[-1] + 7) // 8) if shape else (1,)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """The packed mask (``torch.uint8``, :func:`packed_shape`) of ``mask``.

    Rows of the last dimension pack into bytes: entry ``8*b + j`` of a row is
    bit ``j`` (least significant first) of the row's byte ``b``, set where the
    entry is nonzero; the padding bits of a row's last byte are 0.
    """
    return torch.ops.fastprune.pack_mask(mask)


def unpack_mask(packed: torch.Tensor, shape) -> torch.Tensor:
    """The bool mask of shape ``shape`` that ``packed`` holds (see :func:`pack_mask`)."""
    shape = tuple(shape)
    out = torch.ops.fastprune.unpack_mask(packed, shape[-1] if shape else 1)
    return out if shape else out.reshape(())


def mask_packed_(t: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Set the entries of ``t`` whose bit in ``packed`` is clear to exactly 0
    (NaN and inf too), in place; returns ``t``. A non-contiguous ``t`` goes
    through an unpacked copy."""
    if t.is_contiguous():
        torch.ops.fastprune.mask_packed_(t, packed)
    else:
        t.masked_fill_(unpack_mask(packed, t.shape).logical_not_(), 0)
    return t


def prune_in_place_(
    values: Sequence[torch.Tensor],
    scores: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    count: int,
    *,
    largest: bool = False,
) -> None:
    """The global magnitude select of the in-place layout, in place.

    Of the live entries of all tensors, ranked as one concatenation in list
    order, the ``count`` with the smallest ``|scores|`` (largest with
    ``largest``; NaN above inf; ties: lower position first, as in
    :func:`global_unstructured_masks`) are pruned: their mask entry is
    cleared and their value set to exactly 0.

    Args:
        values: contiguous tensors, written in place (may be the scores).
        scores: floating-point scores of one dtype, each of its values' shape.
        masks: per tensor a contiguous bool mask of its shape (live: True) or
            its packed mask (:func:`pack_mask`; live: bit set), written in
            place.
        count: entries to prune; more than the live entries is a ValueError,
            raised before anything is written.
    """
    torch.ops.fastprune.prune_in_place_(list(values), list(scores), list(masks), int(count), largest)


def cached_empty_like(t: torch.Tensor) -> torch.Tensor:
    """An uninitialized tensor like ``t`` (dtype, sizes and strides as
    ``torch.empty_like(t)``), never requiring grad.

    On the CPU, from the cache's ``min_bytes`` on, its memory is a block that an
    earlier large fastprune output gave back (see :func:`cache_info`): its
    pages are already mapped, so writing it costs no page faults. The block
    returns to the cache when the tensor's storage dies.
    """
    return torch.ops.fastprune.cached_empty_like(t.detach())


_CACHE_FIELDS = ("cached_bytes", "limit_bytes", "min_bytes", "hits", "misses")


def cache_info() -> dict:
    """The state of fastprune's CPU block cache.

    Large CPU outputs of fastprune (masks, and the pruned ``mask * orig`` the
    hooks keep, from ``min_bytes`` on) take their memory from this cache and
    give it back when they die, so that a process that prunes or runs forwards
    repeatedly does not fault in fresh pages each time.

    Returns:
        dict with ``cached_bytes`` (held now, free for reuse), ``limit_bytes``
        (the most it holds; 0: off), ``min_bytes`` (the smallest output it
        serves), ``hits`` and ``misses`` (allocations served from a cached block,
        and from the OS).
    """
    return dict(zip(_CACHE_FIELDS, torch.ops.fastprune.cache_info()))


def set_cache_limit(limit_bytes: Optional[int] = None, *, min_bytes: Optional[int] = None) -> dict:
    """Configure fastprune's CPU block cache (see :func:`cache_info`).

    Args:
        limit_bytes: the most freed memory the cache holds for reuse (default
            1 GiB; 0 turns the cache off). Cached blocks above a lower limit
            are freed at once, oldest first. None keeps the current limit.
        min_bytes: the smallest output served from the cache (default 32 MiB;
            below it glibc's own free lists recycle memory well). None keeps it.

    Returns:
        :func:`cache_info` as it was before the call.
    """
    old = torch.ops.fastprune.configure_cache(
        -1 if limit_bytes is None else _non_negative("limit_bytes", limit_bytes),
        -1 if min_bytes is None else _non_negative("min_bytes", min_bytes))
    return dict(zip(_CACHE_FIELDS, old))


def _non_negative(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"fastprune: {name} must be a non-negative int, got {value!r}")
    return value


def empty_cache() -> int:
    """Return every block fastprune's CPU block cache holds to the OS.

    Tensors still alive keep their memory; their blocks are freed when they
    die unless the cache takes them again. Returns the bytes freed.
    """
    return torch.ops.fastprune.empty_cache()
