"""Twins of the validation helpers of ``torch.nn.utils.prune`` (same names,
same checks, same exception classes and messages), and the checks of what
the reference's ``topk`` rejects, which fastprune's kernels must reject the
same way. :mod:`fastprune.prune` re-exports the torch-named ones."""
import numbers

import torch


def _validate_pruning_amount_init(amount):
    """Check the type and range of an amount, before the tensor is known.

    Args:
        amount (int or float): a non-negative count, or a fraction in [0, 1].

    Raises:
        TypeError: if ``amount`` is not a real number.
        ValueError: if it is a negative integer or a float outside [0, 1].
    """
    if not isinstance(amount, numbers.Real):
        raise TypeError(f"Invalid type for amount: {amount}. Must be int or float.")
    if isinstance(amount, numbers.Integral):
        invalid = amount < 0
    else:
        invalid = float(amount) > 1.0 or float(amount) < 0.0
    if invalid:
        raise ValueError(
            f"amount={amount} should either be a float in the range [0, 1] or a non-negative integer")


def _validate_pruning_amount(amount, tensor_size):
    """Check that an integer amount does not exceed the number of units.

    Args:
        amount (int or float): the amount (floats always pass).
        tensor_size (int): number of units (entries or channels) available.

    Raises:
        ValueError: if ``amount`` is an integer larger than ``tensor_size``.
    """
    if isinstance(amount, numbers.Integral) and amount > tensor_size:
        raise ValueError(
            f"amount={amount} should be smaller than the number of parameters to prune={tensor_size}")


def _validate_structured_pruning(t):
    """Check that ``t`` has channels, i.e. at least two dimensions.

    Args:
        t (torch.Tensor): the tensor to prune.

    Raises:
        ValueError: if ``t`` has fewer than two dimensions.
    """
    shape = t.shape
    if len(shape) <= 1:
        raise ValueError(
            "Structured pruning can only be applied to multidimensional tensors. "
            f"Found tensor of shape {shape} with {len(shape)} dims")


def _compute_nparams_toprune(amount, tensor_size):
    """Number of units to prune.

    Args:
        amount (int or float): a count (returned as is) or a fraction.
        tensor_size (int): number of units available.

    Returns:
        int: ``amount`` if it is an integer, else ``round(amount * tensor_size)``
        (Python's rounding, half to even).
    """
    if isinstance(amount, numbers.Integral):
        return amount
    return round(amount * tensor_size)


def _validate_pruning_dim(t, dim):
    """Check that ``dim`` is below the number of dimensions of ``t``.

    Args:
        t (torch.Tensor): the tensor to prune.
        dim (int): the channel dimension.

    Raises:
        IndexError: if ``dim >= t.dim()``.
    """
    if dim >= t.dim():
        raise IndexError(f"Invalid index {dim} for tensor of size {t.shape}")


def _compute_norm(t, n, dim):
    """L``n`` norm of every channel of ``t`` along ``dim``.

    Args:
        t (torch.Tensor): the tensor.
        n (int, float, inf, -inf, 'fro', 'nuc'): the norm, as ``p`` of
            :func:`torch.norm`.
        dim (int): the channel dimension.

    Returns:
        torch.Tensor: one norm per channel, shape ``(t.shape[dim],)``.
    """
    reduced = list(range(t.dim()))
    reduced.remove(reduced[dim] if dim < 0 else dim)
    return torch.norm(t, p=n, dim=reduced)


def _validate_int(name, value):
    """Reject a non-integer (or bool) ``value`` of argument ``name`` with a TypeError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"Invalid type for {name}: {value!r}. Must be int.")


def _check_count(k):
    """Reject the counts ``torch.topk`` rejects (a ``True`` amount, a negative one)."""
    if isinstance(k, bool) and k:
        raise TypeError("topk(): argument 'k' must be int, not bool")
    if k < 0:
        raise RuntimeError("selected index k out of range")


def _checked_count(amount, n):
    """k for ``amount`` of ``n`` candidates, validated as the reference's
    L1 prune does (its amount check, then what its ``topk`` rejects)."""
    k = _compute_nparams_toprune(amount, n)
    _validate_pruning_amount(k, n)
    _check_count(k)
    return k


def _check_draws(draws, k):
    """What the reference's ``topk`` over its random draws rejects, checked
    after drawing as there (so the RNG moves the same): a bad count, and
    complex draws (of a complex parameter), with torch's own error."""
    _check_count(k)
    if draws.is_complex():
        torch.topk(draws.reshape(-1)[:1], 1)  # raises "topk does not support complex dtypes"
