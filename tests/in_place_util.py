"""Helpers shared by the tests of pruning in place (test_in_place.py,
test_in_place_sharded.py): an independent pure-torch packing of masks, and
the checks of a mask buffer and of an in-place parameter against the
reference layout's ``<name>_orig * <name>_mask``."""
import math

import torch

BIT_WEIGHTS = [1 << j for j in range(8)]  # bit j of a byte is entry 8 * b + j of its row


def pack_reference(mask):
    """The packed mask of ``mask`` as the issue specifies it, in plain torch:
    uint8, shape ``(*shape[:-1], ceil(shape[-1] / 8))`` (``(1,)`` for 0-d),
    entry ``8*b+j`` of a row in bit j of byte b, set where the entry is
    nonzero, padding bits 0."""
    m = (mask.detach() != 0).reshape(1) if mask.dim() == 0 else mask.detach() != 0
    n, lead = m.shape[-1], m.shape[:-1]
    nbytes = (n + 7) // 8
    padded = torch.zeros(*lead, nbytes * 8, dtype=torch.int64)
    padded[..., :n] = m.to(torch.int64)
    bits = padded.reshape(*lead, nbytes, 8) * torch.tensor(BIT_WEIGHTS)
    return bits.sum(-1).to(torch.uint8)


def unpack_reference(packed, shape):
    """The bool mask of ``shape`` that the packed ``packed`` holds (plain torch)."""
    shape = tuple(shape)
    n = shape[-1] if shape else 1
    bits = (packed.to(torch.int64).unsqueeze(-1) & torch.tensor(BIT_WEIGHTS)) != 0
    return bits.flatten(-2)[..., :n].reshape(shape)


def packed_shape(shape):
    shape = tuple(shape)
    return (*shape[:-1], math.ceil(shape[-1] / 8)) if shape else (1,)


def stored_problems(buffer, mask, fmt):
    """What is wrong with a mask buffer (a plain tensor; a DTensor's full
    tensor) holding the bool mask ``mask`` in format ``fmt`` ("bits" or
    "bool"); [] when nothing is."""
    if fmt == "bool":
        if buffer.dtype != torch.bool or buffer.shape != mask.shape:
            return [f"bool mask stored as {buffer.dtype} {tuple(buffer.shape)} for shape {tuple(mask.shape)}"]
        return [] if torch.equal(buffer, mask) else [f"bool mask {buffer} != {mask}"]
    if buffer.dtype != torch.uint8 or tuple(buffer.shape) != packed_shape(mask.shape):
        return [f"packed mask stored as {buffer.dtype} {tuple(buffer.shape)} for shape {tuple(mask.shape)}"]
    expected = pack_reference(mask)
    return [] if torch.equal(buffer, expected) else [f"packed mask {buffer.tolist()} != {expected.tolist()}"]


def effective(module, name):
    """What the reference layout's forward uses for ``module.<name>``:
    ``<name>_orig * <name>_mask`` recomputed now (not the cached tensor),
    else the parameter."""
    orig = module._parameters.get(name + "_orig")
    if orig is None:
        return module._parameters[name].detach()
    return (orig * module._buffers[name + "_mask"].to(orig.dtype)).detach()


def in_place_problems(ref_module, module, name, fmt, param=None):
    """What differs between ``module.<name>`` pruned in place with mask
    format ``fmt`` and ``ref_module.<name>`` in the reference layout (or both
    unpruned): pruned or not, no ``<name>_orig``, the same Parameter object as
    ``param`` (when given), ``mask_of`` and the stored mask equal to the
    reference's mask, the values equal to its ``orig * mask``; [] when none."""
    import fastprune.prune as FAST

    out = []
    pruned = name + "_mask" in ref_module._buffers
    if (name + "_mask" in module._buffers) != pruned:
        return [f"{name}: pruned {not pruned} in place, {pruned} in the reference"]
    if name + "_orig" in module._parameters or name not in module._parameters:
        out.append(f"{name}: parameters {list(module._parameters)}")
        return out
    value = module._parameters[name]
    if param is not None and value is not param:
        out.append(f"{name}: no longer the same Parameter object")
    if pruned:
        ref_mask = ref_module._buffers[name + "_mask"] != 0
        if not torch.equal(FAST.mask_of(ref_module, name), ref_mask):
            out.append(f"{name}: mask_of differs from the reference layout's mask")
        got = FAST.mask_of(module, name)
        if got.dtype != torch.bool or not torch.equal(got, ref_mask):
            out.append(f"{name}: mask_of {got} != reference mask {ref_mask}")
        out += [f"{name}: {p}" for p in stored_problems(module._buffers[name + "_mask"], ref_mask, fmt)]
    expected = effective(ref_module, name)
    if value.dtype != expected.dtype or not torch.equal(value.detach(), expected):
        out.append(f"{name}: values {value.detach()} != reference {expected}")
    return out
