"""Exact global pruning of tensors spread over processes (torch.distributed).

How a sharded global L1 prune works, top to bottom:

1. :func:`global_unstructured` (rank-partitioned plain tensors) or the DTensor
   adapter (:mod:`fastprune.dtensor`) describes each rank's tensors as
   :class:`fastprune._crossrank.Piece` s: local scores and mask, and where the local entries sit in
   the one ranking every rank agrees on (the concatenation, in order, of the
   full tensors).
2. :meth:`fastprune._crossrank.Comm.agree` gathers a small signature of the call from every rank
   (method, amount, dtype, tensor counts, and any local error) so that a
   mismatch raises the same clear error on every rank before anything changes.
3. :func:`fastprune._crossrank.select` runs the radix passes of :func:`fastprune.ops.radix_histogram`
   on the local pieces, sums each 2048-bin histogram across ranks, and so every
   rank finds the same threshold key and the same count of ties to prune.
4. The ties at the threshold are split in the single-process order: pieces
   that are a contiguous run of the ranking exchange one tie count each;
   others (a shard along a later dimension) rank their ties' global positions
   with a few more summed histograms. Each rank then writes its own masks.

Only histograms, counts and a few ints travel; no rank ever holds another
rank's entries. See docs/distributed.md for the design.
"""
import torch
import torch.distributed as dist

from . import _backends, _crossrank, _global, _kernel_paths, _methods, dtensor, ops
from ._twins import _checked_count
from ._crossrank import DistributedPruningError, reset_traffic, traffic  # noqa: F401  (public names)

__all__ = ["global_unstructured", "traffic", "reset_traffic", "DistributedPruningError"]


def global_unstructured(parameters, pruning_method, importance_scores=None, group=None, **kwargs):
    """``fastprune.prune.global_unstructured`` over the tensors of all ranks.

    Each rank passes its own ``(module, name)`` pairs (any number, none
    included); they are ranked as if every rank's list were concatenated in
    rank order of ``group``. Every rank ends up with exactly the masks the
    single-process ``global_unstructured`` gives its tensors on that
    concatenation (L1). Must be called by every rank of ``group``.

    ``RandomUnstructured`` prunes exactly k candidates: those with the k
    largest draws of :func:`uniform_draws`, keyed by ranking position, with
    the seed drawn from the default CPU generator of the group's first rank
    (every rank draws one, so generators stay in step); the result depends on
    that seed, not on how the tensors are split over ranks.

    Args:
        parameters (Iterable[tuple[nn.Module, str]]): this rank's pairs.
        pruning_method (type): ``L1Unstructured`` or ``RandomUnstructured``
            (of either library).
        importance_scores (dict, optional): maps pairs to scores.
        group (ProcessGroup, optional): the ranks; default: the world.
        **kwargs: arguments of ``pruning_method``, e.g. ``amount``.

    Raises:
        DistributedPruningError: on every rank, when the ranks' calls differ
            (method, amount, dtype) or some rank failed before pruning.
    """
    comm = _crossrank.Comm([group], "cpu")
    prepared, error, dtype, device, random, seed = None, None, None, None, False, None
    try:
        prepared = _global._prepare_global(parameters, importance_scores, pruning_method, kwargs,
                                         allow_empty=True)
        if any(dtensor.is_dtensor(c) for c in prepared.currents):
            raise ValueError(
                "fastprune.distributed.global_unstructured ranks plain tensors that each rank holds whole; "
                "for DTensor and FSDP2 parameters call fastprune.prune.global_unstructured (every rank, "
                "the same pairs)")
        path = _methods._kernel_path(prepared.method)
        if not isinstance(path, _kernel_paths.UnstructuredPath):
            raise NotImplementedError(
                "fastprune.distributed.global_unstructured: only L1Unstructured and "
                f"RandomUnstructured, got {pruning_method}")
        random = path.random
        seed = _crossrank.draw_seed() if random else None  # L1 leaves the generator alone, as in one process
        dtype, device = prepared.dtype, prepared.device
    except Exception as e:  # reported to every rank by agree()
        error = e
    signature = (("method", getattr(pruning_method, "__name__", repr(pruning_method))),
                 ("amount", _crossrank.signature_of_amount(kwargs.get("amount"))))
    numels = [c.numel() for c in prepared.currents] if prepared else []
    ranks = comm.agree(signature, error, extra=(numels, None if dtype is None else str(dtype), seed))
    dtypes = [(r, d) for r, (n, d, _) in enumerate(ranks) if n]
    for r, d in dtypes:  # ranks without tensors have no dtype to compare
        if d != dtypes[0][1]:
            raise _crossrank.DistributedPruningError(
                "fastprune.distributed: the ranks made different calls "
                f"(rank {dtypes[0][0]}: dtype={dtypes[0][1]}; rank {r}: dtype={d})")
    me = dist.get_rank(group)
    start = sum(sum(n) for n, _, _ in ranks[:me])
    total = sum(sum(n) for n, _, _ in ranks)
    if not any(n for n, _, _ in ranks):
        raise ValueError("torch.cat(): expected a non-empty list of Tensors")
    comm.device = _crossrank.comm_device(comm.groups[0], device)
    dtype = torch.float64 if random else getattr(torch, dtypes[0][1].split(".")[1])
    pieces = []
    for c, s, m in zip(prepared.currents, prepared.scores, prepared.masks()):
        old = _kernel_paths.unpruned_mask(c, s) if m is None else m.detach()
        pieces.append(_crossrank.Piece(s.detach().to(prepared.dtype), old, start, (c.numel(),), (range(c.numel()),), True))
        start += c.numel()
    for p in pieces:
        p.scores = p.scores.reshape(-1)
        p.mask = p.mask.reshape(-1) if not ops.is_broadcast_one(p.mask) else torch.ones(
            (), dtype=p.mask.dtype, device=p.mask.device).expand(p.scores.shape)
        p.scores = _crossrank.uniform_draws(ranks[0][2], p.positions()).to(p.mask.device) if random else \
            _backends.magnitude_scores(p.scores)
    amount = kwargs.get("amount")
    new = _crossrank.select(pieces, comm, lambda n: _checked_count(amount, n), only_ones=True,
                 largest=random, dtype=dtype, total=total)
    own = [m.view(c.shape).to(prepared.dtype) for m, c in zip(new, prepared.currents)]
    _global._apply_global_masks(prepared.parameters, own, prepared.firsts)
