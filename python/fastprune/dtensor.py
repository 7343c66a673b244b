"""DTensor parameters in the drop-in API: the kernel paths of
``fastprune.prune`` call here when a tensor is a DTensor.

Each DTensor becomes a :class:`fastprune.distributed.Piece` (its local shard,
where the shard sits in the full tensor, and whether this rank counts it: of
the ranks that hold a replica, the one at coordinate 0 of every ``Replicate``
mesh dimension), the exact cross-rank select of :mod:`fastprune.distributed`
runs over the mesh's process groups, and the local masks come back as
DTensors with the parameter's mesh and placements. No full tensor is built.
"""
import torch
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from . import distributed


def is_dtensor(t):
    return isinstance(t, DTensor)


def ones_like(t):
    """A DTensor of ones with ``t``'s mesh, placements, shape and dtype."""
    local = torch.ones((), dtype=t.dtype, device=t.to_local().device).expand(t.to_local().shape)
    return _like(local, t)


def assign(param, value):
    """Write ``value``'s local shard into the DTensor parameter ``param``'s."""
    with torch.no_grad():
        param.to_local().copy_(value.detach().to_local())


def _like(local, t):
    return DTensor.from_local(local, t.device_mesh, t.placements, run_check=False, shape=t.shape,
                              stride=t.stride())


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
    return distributed.Comm(groups, "cpu" if device.type == "cpu" else device)


def _piece(scores, mask, start):
    if not is_dtensor(scores) or (is_dtensor(mask) and mask.placements != scores.placements):
        raise ValueError("fastprune: scores and masks of a DTensor must be DTensors with its placements")
    mesh = scores.device_mesh
    _, offset = compute_local_shape_and_global_offset(scores.shape, mesh, scores.placements)
    coord = mesh.get_coordinate()
    owner = all(coord[d] == 0 for d, p in enumerate(scores.placements) if isinstance(p, Replicate))
    local = scores.to_local().detach()
    local_mask = mask.to_local().detach() if is_dtensor(mask) else torch.ones(
        (), dtype=mask.dtype, device=local.device).expand(local.shape)
    return distributed.Piece(local, local_mask, start, tuple(scores.shape), tuple(offset), owner)


def select_masks(scores, masks, count_of, *, only_ones=False, largest=False):
    """The exact select over DTensors ranked as one concatenation.

    Args:
        scores: DTensors of one dtype on one mesh.
        masks: their current masks (DTensors alike, or a broadcast one).
        count_of: maps the global number of candidates to k (validating it).

    Returns:
        One DTensor mask per tensor (the mask's dtype, the scores' placements).
    """
    mesh = _mesh_of(scores)
    pieces, start = [], 0
    for s, m in zip(scores, masks):
        pieces.append(_piece(s, m, start))
        start += s.numel()
    comm = _comm(mesh, pieces[0].scores.device)
    new = distributed.select(pieces, comm, count_of, only_ones=only_ones, largest=largest, total=start)
    return [_like(m, s) for m, s in zip(new, scores)]
