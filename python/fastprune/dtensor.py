"""DTensor parameters in the drop-in API: the kernel paths of
``fastprune.prune`` call here when a tensor is a DTensor.

Each DTensor becomes a :class:`fastprune._crossrank.Piece` (its local shard,
where the shard sits in the full tensor, and whether this rank counts it: of
the ranks that hold a replica, the one at coordinate 0 of every ``Replicate``
mesh dimension), the exact cross-rank select of :mod:`fastprune._crossrank`
runs over the mesh's process groups, and the local masks come back as
DTensors with the parameter's mesh and placements. No full tensor is built.

Structured methods reduce one float64 per channel across the mesh (partial
norms of the local blocks, combined with SUM/MAX/MIN) and every rank selects
the same channels from the same full vector. Random methods agree on rank 0's
draws (see docs/distributed.md, "Random draws"). Every prune that runs
collectives first checks, with one ``all_gather_object``, that all ranks made
the same call (:func:`agree`), so a mismatch raises everywhere instead of
hanging.
"""
import math
import numbers
import sys

import torch
import torch.distributed as dist

from . import _crossrank, ops


def is_dtensor(t):
    """Whether ``t`` is a DTensor. Without importing DTensor support (a second
    of imports, sympy included): while nothing has imported it, no DTensor
    exists."""
    cls = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return cls is not None and isinstance(t, cls)


def ones_like(t):
    """A DTensor of ones with ``t``'s mesh, placements, shape and dtype."""
    local = torch.ones((), dtype=t.dtype, device=t.to_local().device).expand(t.to_local().shape)
    return _like(local, t)


def assign(param, value):
    """Write ``value``'s local shard into the DTensor parameter ``param``'s."""
    with torch.no_grad():
        param.to_local().copy_(value.detach().to_local())


def _like(local, t):
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, t.device_mesh, t.placements, run_check=False, shape=t.shape,
                              stride=t.stride())


def with_local(local, t, shape):
    """A DTensor of the local block ``local``, placed like ``t``, of global
    shape ``shape`` (contiguous): a mask stored in another format than ``t``'s."""
    from torch.distributed.tensor import DTensor

    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, t.device_mesh, t.placements, run_check=False, shape=torch.Size(shape),
                              stride=stride)


def packs_like(t):
    """Whether a packed mask (bytes along the last dim) can be placed like
    ``t``: its last dim is not cut, or cut by ``Shard`` into whole bytes (its
    size a multiple of 8 times the number of pieces); a ``_StridedShard`` of
    the last dim interleaves, so it cannot."""
    parts = 1
    for mesh_dim, p in enumerate(t.placements):
        if _sharded(p) and p.dim % max(t.dim(), 1) == t.dim() - 1:
            if not p.is_shard() or type(p).__name__ != "Shard":
                return False
            parts *= t.device_mesh.size(mesh_dim)
    return parts == 1 or t.shape[-1] % (8 * parts) == 0


def _mesh_of(tensors):
    mesh = tensors[0].device_mesh
    for t in tensors[1:]:
        if t.device_mesh != mesh:
            raise ValueError(
                "fastprune: DTensors on different device meshes cannot be pruned together, got "
                f"{mesh} and {t.device_mesh}")
    return mesh


def _comm(mesh, device):
    groups = [mesh.get_group(d) for d in range(mesh.ndim)]
    return _crossrank.Comm(groups, "cpu" if device.type == "cpu" else device)


def _sharded(p):
    """Whether placement ``p`` cuts a tensor dim (``Shard``, and the
    ``_StridedShard`` of FSDP2 over tensor parallelism, which is no Shard)."""
    return p.is_shard() or isinstance(getattr(p, "dim", None), int)


def _layout(t):
    """Where ``t``'s local block sits in the full tensor and whether this rank
    counts it (of the replicas, the one at coordinate 0 of every
    ``Replicate`` mesh dimension).

    The place is one index per dim: the global indices of the local slices
    along it, a ``range`` where they are contiguous (``Shard``), else an int64
    tensor (a ``_StridedShard`` interleaves the slices of several shards)."""
    mesh = t.device_mesh
    if any(p.is_partial() for p in t.placements):
        raise NotImplementedError(f"fastprune: DTensors with Partial placements cannot be pruned, got {t.placements}")
    from torch.distributed.tensor._utils import _get_shard_size_and_offsets

    coord = mesh.get_coordinate()
    sizes, index = list(t.shape), {}
    for mesh_dim, p in enumerate(t.placements):
        if _sharded(p):
            # torch's own per-dim walk (compute_local_shape_and_global_offset
            # keeps only the first offset of each dim)
            size, offsets = _get_shard_size_and_offsets(sizes[p.dim], mesh.size(mesh_dim), coord[mesh_dim], p,
                                                         index.get(p.dim), t.shape[p.dim], False)
            sizes[p.dim], index[p.dim] = size, offsets[:size]
    owner = all(coord[d] == 0 for d, p in enumerate(t.placements) if p.is_replicate())
    return tuple(_as_range(index[d]) if d in index else range(t.shape[d]) for d in range(t.dim())), owner


def _as_range(offsets):
    n = offsets.numel()
    first = int(offsets[0]) if n else 0
    return range(first, first + n) if n == 0 or int(offsets[-1]) - first == n - 1 else offsets


def _at(index):
    """A ``_layout`` index as something to index a full-length vector with."""
    return slice(index.start, index.stop) if isinstance(index, range) else index


def check_like(t, param, what):
    """Raise ValueError unless ``t`` is a DTensor on ``param``'s mesh with its
    placements (or neither is a DTensor).

    Plain full-size tensors are refused rather than sliced or scattered: which
    rank's copy would count is ambiguous, and a ``distribute_tensor`` would
    hide a collective in a call that may have none."""
    if not (is_dtensor(t) or is_dtensor(param)):
        return
    if not (is_dtensor(t) and is_dtensor(param)):
        raise ValueError(
            f"fastprune: {what} of a DTensor parameter must be a DTensor with its mesh and placements "
            "(e.g. distribute_tensor(x, param.device_mesh, param.placements)), and those of a plain "
            f"parameter a plain tensor; got {type(t).__name__} for a {type(param).__name__}")
    if t.device_mesh != param.device_mesh or tuple(t.placements) != tuple(param.placements):
        raise ValueError(
            f"fastprune: {what} must have the parameter's mesh and placements, got {t.device_mesh} "
            f"{t.placements} for {param.device_mesh} {param.placements} (redistribute it first)")


def _piece(scores, mask, start):
    if not is_dtensor(scores) or (is_dtensor(mask) and mask.placements != scores.placements):
        raise ValueError("fastprune: scores and masks of a DTensor must be DTensors with its placements")
    index, owner = _layout(scores)
    local = scores.to_local().detach()
    local_mask = mask.to_local().detach() if is_dtensor(mask) else torch.ones(
        (), dtype=mask.dtype, device=local.device).expand(local.shape)
    return _crossrank.Piece(local, local_mask, start, tuple(scores.shape), index, owner)


def select_masks(scores, masks, count_of, *, only_ones=False, largest=False, random=False):
    """The exact select over DTensors ranked as one concatenation.

    Args:
        scores: DTensors of one dtype on one mesh.
        masks: their current masks (DTensors alike, or a broadcast one).
        count_of: maps the global number of candidates to k (validating it).
        random: rank :func:`fastprune._crossrank.uniform_draws` instead of
            ``scores`` (which then only give the layout), keyed by ranking
            position with rank 0's seed: the draws of an entry do not depend
            on how the tensors are sharded.

    Returns:
        One DTensor mask per tensor (the mask's dtype, the scores' placements).
    """
    mesh = _mesh_of(scores)
    pieces, start = [], 0
    for s, m in zip(scores, masks):
        pieces.append(_piece(s, m, start))
        start += s.numel()
    comm = _comm(mesh, pieces[0].scores.device)
    if random:
        seed = int(_from_first(mesh, comm, torch.tensor([_crossrank.draw_seed()]))[0])
        for p in pieces:
            p.scores = _crossrank.uniform_draws(seed, p.positions()).view(p.scores.shape).to(p.mask.device)
    new = _crossrank.select(pieces, comm, count_of, only_ones=only_ones, largest=largest, total=start)
    return [_like(m, s) for m, s in zip(new, scores)]


def _from_first(mesh, comm, x):
    """The value ``x`` has on the mesh's first rank (coordinate 0 everywhere),
    on every rank: a sum to which the other ranks add zeros."""
    first = all(c == 0 for c in mesh.get_coordinate())
    x = x.to(comm.device).clone() if first else torch.zeros_like(x, device=comm.device)
    return comm.sum_(x).cpu()


def shared_draws(t, draws):
    """Rank 0's ``draws`` (a small CPU tensor every rank drew the same way),
    on every rank of ``t``'s mesh: random structured pruning then equals the
    single-process result under rank 0's generator, even if the ranks' seeds
    differ."""
    return _from_first(t.device_mesh, _comm(t.device_mesh, t.to_local().device), draws)


# Per-channel reductions: a full-length float64 vector per rank (the identity
# outside its block), reduced across the mesh; the bits of |x| >= 0 order as
# int64, so MAX/MIN run on them and NaN (above inf) wins MAX; for MIN it is
# mapped to -1 first.
_IDENTITY = {"sum": 0.0, "max": 0.0, "min": math.inf}


def _channel_reduce(t, dim, partial, kind):
    index, owner = _layout(t)
    comm = _comm(t.device_mesh, t.to_local().device)
    full = torch.full((t.shape[dim],), _IDENTITY[kind], dtype=torch.float64, device=comm.device)
    if owner and partial.numel():
        full[_at(index[dim])] = partial.to(comm.device)
    if kind == "sum":
        return comm.sum_(full).cpu()
    bits = full.view(torch.int64).clone()
    if kind == "min":
        bits[full.isnan()] = -1
    comm.reduce_(bits, dist.ReduceOp.MAX if kind == "max" else dist.ReduceOp.MIN)
    return bits.cpu().view(torch.float64)  # -1 is a NaN


def _local_channel_values(local, dim, p, kind_identity):
    if local.numel() == 0:
        return torch.full((local.shape[dim],), kind_identity, dtype=torch.float64)
    return ops.channel_norms(local, dim, p)


def channel_norms(t, n, dim):
    """The L``n`` norm of every channel of the DTensor ``t`` along ``dim``
    (a plain float64 tensor, the same on every rank), as the single-process
    kernel computes it: local partial sums of ``|x|^p`` (counts for p = 0,
    max/min for +-inf) combined across the mesh, then the root. Equal to the
    unsharded norms up to the order of the float64 additions."""
    p = 2 if isinstance(n, str) and n == "fro" and t.dim() == 2 else n
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise NotImplementedError(
            f"fastprune: ln_structured of a DTensor takes a real n ('fro' on 2-D tensors), got {n!r}")
    p, dim = float(p), dim % t.dim()
    local = t.to_local().detach()
    if local.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        local = local.abs().to(torch.float64)
    if p in (math.inf, -math.inf):
        kind = "max" if p > 0 else "min"
        return _channel_reduce(t, dim, _local_channel_values(local, dim, p, _IDENTITY[kind]), kind)
    if p == 0 or p == 1:
        return _channel_reduce(t, dim, _local_channel_values(local, dim, p, 0.0), "sum")
    # The kernel's terms: x*x in float64 for p = 2, else |x|^p in float
    # (double for float64), summed in float64 by the p = 1 kernel.
    if p == 2:
        terms = local.to(torch.float64).square()
    elif local.dtype == torch.float64:
        terms = local.abs().pow(p)
    else:
        terms = local.float().abs().pow(p)
    sums = _channel_reduce(t, dim, _local_channel_values(terms, dim, 1.0, 0.0), "sum")
    return sums.sqrt() if p == 2 else sums.pow(1.0 / p)


def live_channels(mask, dim):
    """Which channels of the DTensor ``mask`` along ``dim`` hold a non-zero
    entry somewhere on the mesh (bool, the same on every rank)."""
    dim %= mask.dim()
    local = mask.to_local().detach()
    if not local.is_floating_point():
        local = local.to(torch.float64)
    return _channel_reduce(mask, dim, _local_channel_values(local, dim, 0.0, 0.0), "sum") != 0


def channel_mask(t, dim, keep, mask):
    """``mask`` (a DTensor, cast to ``t``'s dtype) times ``keep[channel]``
    along ``dim``: each rank multiplies its block by its own channels' part."""
    dim %= mask.dim()
    index, _ = _layout(mask)
    local = mask.to_local().detach().to(t.dtype)
    shape = [1] * local.dim()
    shape[dim] = -1
    part = keep[_at(index[dim])]
    return _like(local * part.to(device=local.device, dtype=t.dtype).view(shape), mask)


def local_segments(t, mask, dim, whole_slices, select):
    """The mask of the DTensor scores ``t`` (its current mask ``mask``, a
    DTensor alike) computed segment by segment where every segment lies in
    one rank's shard: ``select(scores, mask)`` on the local shards, no
    collective.

    Segments are runs along ``dim`` (N:M groups: ``dim`` must not be sharded)
    or whole slices ``t.select(dim, i)`` (only ``dim`` may be sharded): with
    ``Shard(0)`` (FSDP2's placement) both hold for 2:4 along the last dim and
    for per-row slices. A failure on one rank's shard raises on every rank.

    Returns:
        A DTensor with ``t``'s mesh and placements.
    """
    _layout(t)  # refuses Partial placements
    dim %= t.dim()
    sharded = {p.dim % t.dim() for p in t.placements if _sharded(p)}
    if (sharded - {dim}) if whole_slices else (dim in sharded):
        what = f"slices along dim {dim}" if whole_slices else f"groups along dim {dim}"
        raise NotImplementedError(
            f"fastprune: {what} would span several ranks' shards of a DTensor with placements "
            f"{t.placements}; N:M groups need their dim unsharded, per-channel slices every other "
            "dim unsharded (Shard(0) works for both along the usual dims)")
    try:
        local, error = select(t.to_local().detach(), mask.to_local().detach()), None
    except (ValueError, RuntimeError) as e:  # e.g. a slice with fewer live entries than an int amount
        local, error = None, e
    _agree_on_local_error(t, error)
    return _like(local, t)


def _agree_on_local_error(t, error):
    """Raise ``error`` where it happened and the same class, naming that
    rank, on every other rank of ``t``'s mesh (a prune with no other
    collective must not leave some ranks pruned and others not). One 4-byte
    all-reduce when no rank failed."""
    comm = _comm(t.device_mesh, t.to_local().device)
    failed = comm.reduce_(torch.tensor([error is not None], dtype=torch.int32, device=comm.device),
                          dist.ReduceOp.MAX)
    if not int(failed[0]):
        return
    reports = comm.gather_objects(None if error is None else (dist.get_rank(), type(error), str(error)))
    if error is not None:
        raise error
    rank, cls, message = next(r for r in reports if r is not None)
    raise cls(f"fastprune: rank {rank} could not prune its shard, so no rank pruned: {message}")


def describe(v):
    """A picklable, comparable summary of a call argument for :func:`agree`."""
    if is_dtensor(v):
        return ("DTensor", tuple(v.shape), str(v.dtype), str(tuple(v.placements)), str(v.device_mesh))
    if isinstance(v, torch.Tensor):
        return ("Tensor", tuple(v.shape), str(v.dtype))
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        return _crossrank.signature_of_amount(v)
    if isinstance(v, (list, tuple)):
        return tuple(describe(x) for x in v)
    return repr(v)


def agree(t, call, error=None):
    """Check that every rank of ``t``'s mesh made the same call.

    Args:
        t: a DTensor of the call (gives the mesh).
        call: ``(name, value)`` pairs describing the call (see :func:`describe`).
        error: the exception this rank hit while preparing, or None.

    Raises:
        ``error`` on its rank and DistributedPruningError on the others; or
        DistributedPruningError on every rank when the calls differ.
    """
    comm = _comm(t.device_mesh, t.to_local().device)
    comm.agree(tuple((k, describe(v)) for k, v in call), error)


def check_one_mesh(tensors):
    """Raise ValueError for DTensors on several meshes, or DTensors mixed
    with plain tensors (nothing is ranked across the two)."""
    found = [t for t in tensors if is_dtensor(t)]
    if found and len(found) != len(tensors):
        raise ValueError("fastprune: global_unstructured cannot rank DTensor and plain parameters together")
    if found:
        _mesh_of(found)
