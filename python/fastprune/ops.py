"""Typed, documented wrappers over the ``torch.ops.fastprune`` kernels."""
from typing import List, Optional, Sequence

import torch


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


def advise_huge_pages(t: torch.Tensor) -> None:
    """Ask for transparent huge pages behind the not yet touched memory of ``t``.

    Only a hint to the OS (Linux ``madvise(MADV_HUGEPAGE)`` on the 2 MiB pages
    inside ``t``'s storage; nothing elsewhere). Values are unchanged. Call it
    on a fresh ``torch.empty`` result before writing it: a large tensor then
    costs a few times less to fault in. CPU tensors only.
    """
    torch.ops.fastprune.advise_huge_pages(t)
