"""The cross-rank select engine: exact global selects over tensors spread
over processes, with only histograms, counts and a few ints on the wire.

An internal leaf module (it imports only the ops): the public entry points
are :mod:`fastprune.distributed` (rank-partitioned plain tensors) and the
DTensor adapter :mod:`fastprune.dtensor`, which describe each rank's tensors
as :class:`Piece` s and call :func:`select`. docs/distributed.md has the
design.
"""
import dataclasses
import math
import numbers
import pickle
import struct
from typing import List, Sequence

import torch
import torch.distributed as dist

from . import ops

_INT64_MAX = 2 ** 63 - 1
_BINS = 2 ** ops.PASS_DIGIT_BITS

_TRAFFIC = {"collectives": 0, "bytes": 0}


def traffic() -> dict:
    """What this process has sent through fastprune's collectives so far.

    Returns:
        dict with ``collectives`` (calls made) and ``bytes`` (payload bytes this
        rank contributed: a histogram all-reduce counts its 16 KiB once per
        process group it is summed over; an object gather, the pickle of what
        this rank sends).
    """
    return dict(_TRAFFIC)


def reset_traffic():
    """Set the :func:`traffic` counters to zero."""
    _TRAFFIC.update(collectives=0, bytes=0)


class DistributedPruningError(RuntimeError):
    """The ranks disagree about a call, or one of them failed before pruning."""


class Comm:
    """The ranks taking part in one prune: a chain of process groups whose
    product is all of them (one group, or the groups of a device mesh's
    dimensions); sums and gathers run over each in turn.

    Args:
        groups: the process groups (None: the default group).
        device: where collective buffers live (the CPU for gloo).
    """

    def __init__(self, groups, device):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "fastprune.distributed: no initialized process group on this rank; call "
                "torch.distributed.init_process_group (or build the DeviceMesh) first")
        self.groups = [g or dist.group.WORLD for g in groups]
        self.device = torch.device(device)

    def sum_(self, t):
        """Sum ``t`` in place across all ranks."""
        return self.reduce_(t, dist.ReduceOp.SUM)

    def reduce_(self, t, op):
        """Reduce ``t`` in place across all ranks with ``op`` (a ``ReduceOp``)."""
        for g in self.groups:
            dist.all_reduce(t, op=op, group=g)
            _TRAFFIC["collectives"] += 1
            _TRAFFIC["bytes"] += t.numel() * t.element_size()
        return t

    def gather_objects(self, obj):
        """Every rank's ``obj``, as one flat list (same order on every rank)."""
        items = [obj]
        for g in reversed(self.groups):
            out = [None] * dist.get_world_size(g)
            dist.all_gather_object(out, items, group=g)
            _TRAFFIC["collectives"] += 1
            _TRAFFIC["bytes"] += len(pickle.dumps(items))  # what all_gather_object sends
            items = [x for part in out for x in part]
        return items

    def agree(self, signature, error, extra=None):
        """Check that every rank made the same call.

        Args:
            signature: a tuple every rank must share (a picklable value).
            error: the exception this rank hit while preparing, or None.
            extra: anything picklable this rank tells the others.

        Returns:
            every rank's ``extra``, in gather order (for one group: its ranks' order).

        Raises:
            the local ``error`` itself; or DistributedPruningError naming the
            first failing rank or the first mismatch, on every rank.
        """
        rank = dist.get_rank()
        entries = self.gather_objects((rank, signature, None if error is None else repr(error), extra))
        if error is not None:
            raise error
        for other, sig, err, _ in entries:
            if err is not None:
                raise DistributedPruningError(
                    f"fastprune.distributed: rank {other} failed, so no rank pruned: {err}")
        for other, sig, _, _ in entries:
            if sig != entries[0][1]:
                raise DistributedPruningError(
                    "fastprune.distributed: the ranks made different calls "
                    f"(rank {entries[0][0]}: {_describe(entries[0][1])}; rank {other}: {_describe(sig)})")
        return [e[3] for e in entries]


class Alone:
    """The comm of a select that one process runs over tensors it holds whole
    through the separable passes (their packed masks, in place): nothing to
    sum or gather.

    Args:
        device: the tensors' device.
    """

    def __init__(self, device):
        self.device = torch.device(device)

    def sum_(self, t):
        return t

    def gather_objects(self, obj):
        return [obj]


def whole(scores, masks):
    """Pieces of tensors held whole, ranked in list order."""
    pieces, start = [], 0
    for s, m in zip(scores, masks):
        pieces.append(Piece(s, m, start, tuple(s.shape), tuple(range(n) for n in s.shape)))
        start += s.numel()
    return pieces


def _describe(sig):
    return ", ".join(f"{k}={v}" for k, v in sig)


@dataclasses.dataclass
class Piece:
    """One rank's part of one ranked tensor.

    Attributes:
        scores: the local scores (a kernel dtype), any shape.
        mask: the local current mask, same shape (a broadcast one is fine).
        start: the ranking position of the full tensor's first entry.
        shape: the full tensor's shape.
        index: per dim, the global indices of the local slices along it: a
            ``range`` (a contiguous block) or an int64 tensor (interleaved
            slices, e.g. a ``_StridedShard``).
        owner: whether this rank counts the piece (False for a replica that
            another rank counts).
    """

    scores: torch.Tensor
    mask: torch.Tensor
    start: int
    shape: tuple
    index: tuple
    owner: bool = True

    def run_start(self):
        """The ranking position of the local flat index 0 when the local block
        is one contiguous run of the full tensor's row-major order, else None."""
        if not all(isinstance(ix, range) for ix in self.index):
            return None
        partial = [d for d, ix in enumerate(self.index) if len(ix) != self.shape[d]]
        if partial and (math.prod(self.shape[:partial[0]]) > 1 or partial[1:]):
            return None  # rows of a block cut along a later dim, or cut along two dims
        pos, stride = self.start, 1
        for ix, n in zip(reversed(self.index), reversed(self.shape)):
            pos += ix.start * stride
            stride *= n
        return pos

    def positions(self, flat=None):
        """Ranking positions of the local entries at local flat indices
        ``flat`` (int64), or of every local entry (in local row-major order)."""
        local = tuple(self.scores.shape)
        if flat is None:
            flat = torch.arange(math.prod(local), dtype=torch.int64)
        pos = torch.full_like(flat, self.start)
        rest, stride = flat.clone(), 1
        for d in reversed(range(len(local))):
            ix, at = self.index[d], rest % local[d]
            pos += (ix.start + at if isinstance(ix, range) else ix[at]) * stride
            rest //= local[d]
            stride *= self.shape[d]
        return pos


def select(pieces: Sequence[Piece], comm: Comm, count_of, *, only_ones=False, largest=False,
           dtype=None, total=None) -> List[torch.Tensor]:
    """The exact global select over every rank's pieces: new local masks.

    Args:
        pieces: this rank's pieces, in ranking order.
        comm: the ranks.
        count_of: maps the global number of candidates n to k, the number to
            prune (it validates the amount and raises as the single-process
            API does; it runs on every rank with the same n).
        only_ones: candidates are the entries whose mask is 1.
        largest: prune the largest ``|scores|`` instead.
        dtype: the scores' dtype (needed when this rank has no pieces).
        total: the ranking's length (needed for ties in non-run pieces).

    Returns:
        One new mask per piece (the mask's dtype), identical to the
        single-process select over the concatenated full tensors.
    """
    scores = [p.scores for p in pieces]
    masks = [p.mask for p in pieces]
    counted = [i for i, p in enumerate(pieces) if p.owner]
    dtype = scores[0].dtype if scores else dtype

    def histogram(d, prefix):
        """Digit d's counts over every rank's candidates under ``prefix``, on the CPU."""
        if counted:
            h = ops.radix_histogram([scores[i] for i in counted], [masks[i] for i in counted], d, prefix,
                                    only_ones=only_ones, largest=largest).to(comm.device)
        else:
            h = torch.zeros(_BINS, dtype=torch.int64, device=comm.device)
        return comm.sum_(h).cpu()  # radix_step reads the counts on the host

    # The radix descent of csrc/common/select.h: a histogram pass, its sum
    # over the ranks, and radix_step's arithmetic, digit by digit.
    hist = histogram(0, 0)
    k = count_of(int(hist.sum()))
    if k == 0:
        return _write(scores, masks, 0, 0, only_ones, largest)
    d, step = 0, ops.radix_step(hist, 0, 0, k, dtype)
    while not step.last:
        d += 1
        step = ops.radix_step(histogram(d, step.prefix), d, step.prefix, step.rank, dtype)
    if step.rank == step.count:  # every tie goes: no order needed
        return _write(scores, masks, step.prefix, _INT64_MAX, only_ones, largest)
    return _split_ties(pieces, comm, step.prefix, step.rank, only_ones, largest, total)


def _write(scores, masks, key, take, only_ones, largest):
    return ops.masks_at_threshold(scores, masks, key, take=take, only_ones=only_ones, largest=largest)


def _split_ties(pieces, comm, key, need, only_ones, largest, total):
    """Masks that prune every candidate below ``key`` and the first ``need``
    candidates equal to it in ranking order."""
    scores = [p.scores for p in pieces]
    masks = [p.mask for p in pieces]
    local = ops.count_at_key(scores, masks, key, only_ones=only_ones, largest=largest).tolist() if pieces else []
    mine = [(p.run_start(), n) for p, n in zip(pieces, local)]
    everyone = comm.gather_objects([(s, n) for (s, n), p in zip(mine, pieces) if p.owner and n > 0])
    flat = [x for part in everyone for x in part]
    if all(s is not None for s, _ in flat) and all(s is not None for s, n in mine if n > 0):
        # Runs: the ties before a run are those of the runs that start earlier.
        take = 0
        for s, n in mine:
            if n > 0:
                before = sum(m for t, m in flat if t < s)
                take += min(max(need - before, 0), n)
        return _write(scores, masks, key, take, only_ones, largest)
    return _split_ties_by_position(pieces, comm, key, need, only_ones, largest, total)


def _split_ties_by_position(pieces, comm, key, need, only_ones, largest, total):
    """The tie split for pieces that are not runs (shards along a later dim):
    a radix select over the ties' ranking positions, 2048 bins a round."""
    below = _write([p.scores for p in pieces], [p.mask for p in pieces], key, 0, only_ones, largest)
    tie_index, tie_pos = [], []
    for p in pieces:
        ones = torch.ones((), dtype=p.mask.dtype, device=p.mask.device).expand(p.scores.shape)
        keep_ties, drop_ties = (ops.masks_at_threshold([p.scores], [ones], key, take=t, largest=largest)[0]
                                for t in (0, _INT64_MAX))
        tie = keep_ties != drop_ties
        if only_ones:
            tie &= p.mask == 1
        idx = tie.reshape(-1).nonzero().reshape(-1).cpu()
        tie_index.append(idx)
        tie_pos.append(p.positions(idx))
    counted = torch.cat([pos for pos, p in zip(tie_pos, pieces) if p.owner] or [torch.zeros(0, dtype=torch.int64)])
    lo, hi, rank = 0, total, need
    while hi - lo > 1:
        width = -(-(hi - lo) // _BINS)
        inside = counted[(counted >= lo) & (counted < hi)]
        hist = torch.bincount((inside - lo) // width, minlength=_BINS).to(comm.device)
        comm.sum_(hist)
        cum = hist.cumsum(0)
        b = int(torch.searchsorted(cum, torch.tensor(rank, device=cum.device)))
        rank -= int(cum[b] - hist[b])
        lo, hi = lo + b * width, min(hi, lo + (b + 1) * width)
    for m, idx, pos in zip(below, tie_index, tie_pos):
        cut = idx[pos <= lo]
        if cut.numel():
            m[torch.unravel_index(cut.to(m.device), m.shape)] = 0
    return below


def signature_of_amount(amount):
    """A picklable, exactly comparable summary of an amount (a float by its bits)."""
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        return ("other", repr(amount))
    if isinstance(amount, numbers.Integral):
        return ("int", int(amount))
    return ("float", struct.pack("<d", float(amount)).hex())


def uniform_draws(seed: int, positions: torch.Tensor) -> torch.Tensor:
    """Random draws in [0, 1) (float64, 53 random bits) keyed by ranking
    position: splitmix64 of ``seed + position * golden``, so a rank draws
    the numbers of its own entries without drawing anyone else's, and the
    draws of an entry do not depend on how many ranks there are."""
    def shr(z, s):  # logical shift of int64 bits
        return (z >> s) & ((1 << (64 - s)) - 1)

    def wrap(c):
        return c - (1 << 64) if c >= 1 << 63 else c

    z = positions.to(torch.int64) * wrap(0x9E3779B97F4A7C15) + wrap(seed % (1 << 64))
    z = (z ^ shr(z, 30)) * wrap(0xBF58476D1CE4E5B9)
    z = (z ^ shr(z, 27)) * wrap(0x94D049BB133111EB)
    z = z ^ shr(z, 31)
    return shr(z, 11).to(torch.float64) * 2.0 ** -53


def draw_seed():
    """This rank's candidate seed for a random prune: one draw from the
    default CPU generator (every rank draws, so generators stay in step)."""
    return int(torch.randint(0, 2 ** 62, (1,)))


def comm_device(group, device):
    """Where collective buffers live: the CPU for gloo; else the tensors'
    device, or for a rank with none, the current CUDA device under NCCL."""
    backend = dist.get_backend(group)
    if backend == "gloo":
        return torch.device("cpu")
    if device is not None:
        return device
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
