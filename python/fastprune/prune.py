"""Drop-in replacement for ``torch.nn.utils.prune`` backed by fastprune kernels.

``import fastprune.prune as prune`` behaves like ``import torch.nn.utils.prune
as prune`` (same classes, functions, hooks, buffers, dtypes, amounts, errors),
with these differences (docs/behaviour.md §Differences says why):

* unstructured masks come from one selection kernel
  (:func:`fastprune.ops.unstructured_mask`) that reads masks and scores in
  place; among equal scores the lower row-major index is pruned first;
* non-contiguous and channels_last tensors work everywhere, and masks keep the
  memory format ``torch.ones_like(param)`` would give;
* a failed prune leaves the module exactly as it was (hooks and hook order
  included), ``PruningContainer`` accepts several methods,
  ``global_unstructured`` accepts any iterable, keeps no model-sized tensor
  alive, and works on the meta device and above 2**31 elements;
* ``copy.deepcopy`` works on modules pruned under grad mode;
* parameters of FSDP2 (``fully_shard``) models, and any parameter inside
  :func:`fastprune.in_place`, are pruned in place, without ``<name>_orig``
  (see :mod:`fastprune._in_place`); :func:`mask_of` reads any layout's mask.

Every class here also derives from its namesake in ``torch.nn.utils.prune``
(``isinstance(fastprune.prune.L1Unstructured(1), torch.nn.utils.prune.L1Unstructured)``),
so both libraries' ``is_pruned``/``remove`` accept either library's hooks, and
pruning one tensor with both libraries composes into one container. A
replacement of torch's ``compute_mask`` (e.g. ``mock.patch(
"torch.nn.utils.prune.L1Unstructured.compute_mask")``) also takes effect here,
so tests written against torch's module pass with only the import changed.

The method classes live in :mod:`fastprune._methods` and the global prune in
:mod:`fastprune._global`; this module is the drop-in surface.
"""
from . import _global, _layouts
from ._methods import (  # noqa: F401  (re-exported)
    BasePruningMethod,
    ChannelwiseL1Unstructured,
    CustomFromMask,
    Identity,
    L1SemiStructured,
    L1Unstructured,
    LnStructured,
    PruningContainer,
    RandomStructured,
    RandomUnstructured,
    _AnyMethod,
)
from ._twins import (  # noqa: F401  (torch's helper names, kept on this module)
    _check_count,
    _checked_count,
    _compute_nparams_toprune,
    _compute_norm,
    _validate_int,
    _validate_pruning_amount,
    _validate_pruning_amount_init,
    _validate_pruning_dim,
    _validate_structured_pruning,
)

__all__ = [
    "BasePruningMethod",
    "PruningContainer",
    "Identity",
    "RandomUnstructured",
    "L1Unstructured",
    "RandomStructured",
    "LnStructured",
    "CustomFromMask",
    "L1SemiStructured",
    "ChannelwiseL1Unstructured",
    "identity",
    "random_unstructured",
    "l1_unstructured",
    "random_structured",
    "ln_structured",
    "global_unstructured",
    "custom_from_mask",
    "l1_semi_structured",
    "channelwise_l1_unstructured",
    "remove",
    "is_pruned",
    "mask_of",
]

# The classes' public home, as their repr and pickles name them.
for _cls in (BasePruningMethod, PruningContainer, Identity, RandomUnstructured, L1Unstructured, RandomStructured,
             LnStructured, CustomFromMask, L1SemiStructured, ChannelwiseL1Unstructured):
    _cls.__module__ = __name__
del _cls


def identity(module, name):
    """Reparametrize ``module.<name>`` with a mask of ones, pruning nothing.

    Args:
        module (nn.Module): module holding the tensor.
        name (str): name of the parameter.

    Returns:
        nn.Module: ``module``.
    """
    Identity.apply(module, name)
    return module


def random_unstructured(module, name, amount):
    """Prune random entries of ``module.<name>``.

    Args:
        module (nn.Module): module holding the tensor.
        name (str): name of the parameter.
        amount (int or float): count, or fraction in [0, 1], of the entries
            still unpruned.

    Returns:
        nn.Module: ``module``.
    """
    RandomUnstructured.apply(module, name, amount)
    return module


def l1_unstructured(module, name, amount, importance_scores=None):
    """Prune the entries of ``module.<name>`` with the smallest magnitude.

    Args:
        module (nn.Module): module holding the tensor.
        name (str): name of the parameter.
        amount (int or float): count, or fraction in [0, 1], of the entries
            still unpruned.
        importance_scores (torch.Tensor, optional): scores to rank instead of
            the parameter, same shape.

    Returns:
        nn.Module: ``module``.
    """
    L1Unstructured.apply(module, name, amount=amount, importance_scores=importance_scores)
    return module


def random_structured(module, name, amount, dim):
    """Prune random channels of ``module.<name>`` along ``dim``.

    Args:
        module (nn.Module): module holding the tensor.
        name (str): name of the parameter.
        amount (int or float): count, or fraction in [0, 1], of the channels
            still unpruned.
        dim (int): dimension that indexes the channels.

    Returns:
        nn.Module: ``module``.
    """
    RandomStructured.apply(module, name, amount, dim)
    return module


def ln_structured(module, name, amount, n, dim, importance_scores=None):
    """Prune the channels of ``module.<name>`` with the smallest L``n`` norm.

    Args:
        module (nn.Module): module holding the tensor.
        name (str): name of the parameter.
        amount (int or float): count, or fraction in [0, 1], of the channels
            still unpruned.
        n (int, float, inf, -inf, 'fro', 'nuc'): the norm, as ``p`` of
            :func:`torch.norm`.
        dim (int): dimension that indexes the channels.
        importance_scores (torch.Tensor, optional): scores to rank instead of
            the parameter, same shape.

    Returns:
        nn.Module: ``module``.
    """
    LnStructured.apply(module, name, amount, n, dim, importance_scores=importance_scores)
    return module


def l1_semi_structured(module, name, n=2, m=4, dim=-1, importance_scores=None):
    """Prune ``module.<name>`` to at most ``n`` nonzeros in every group of
    ``m`` consecutive entries along ``dim`` (N:M sparsity; 2:4 by default).

    Args:
        module (nn.Module): module holding the tensor.
        name (str): name of the parameter.
        n (int): entries that may stay in each group, ``0 <= n < m``.
        m (int): entries per group; ``module.<name>.shape[dim]`` must be a
            multiple of it.
        dim (int): the dimension the groups run along. Default: -1.
        importance_scores (torch.Tensor, optional): scores to rank instead of
            the parameter, same shape.

    Returns:
        nn.Module: ``module``.
    """
    L1SemiStructured.apply(module, name, n=n, m=m, dim=dim, importance_scores=importance_scores)
    return module


def channelwise_l1_unstructured(module, name, amount, dim=0, importance_scores=None):
    """Prune the same share of every slice of ``module.<name>`` along ``dim``:
    the entries with the smallest magnitude in each (Wanda's per-row rule).

    Args:
        module (nn.Module): module holding the tensor.
        name (str): name of the parameter.
        amount (int or float): count, or fraction in [0, 1], of each slice's
            entries still unpruned.
        dim (int): the dimension that indexes the slices (0: the output rows
            of a Linear weight). Default: 0.
        importance_scores (torch.Tensor, optional): scores to rank instead of
            the parameter, same shape (Wanda: ``|W| * input norm``).

    Returns:
        nn.Module: ``module``.
    """
    ChannelwiseL1Unstructured.apply(module, name, amount=amount, dim=dim, importance_scores=importance_scores)
    return module


def global_unstructured(parameters, pruning_method, importance_scores=None, **kwargs):
    """Prune several tensors together, ranking all their entries at once.

    The amount counts the entries still unpruned across all the tensors. Each
    tensor is then pruned with its share of the result through
    :func:`custom_from_mask`, so each hook holds only its own tensor's mask.
    All or nothing: if pruning any tensor fails, every module is left as it was.

    Args:
        parameters (Iterable[tuple[nn.Module, str]]): the ``(module, name)``
            pairs to prune; any iterable, generators included.
        pruning_method (type): an ``"unstructured"`` pruning method class of
            either library, e.g. :class:`L1Unstructured`.
        importance_scores (dict, optional): maps ``(module, name)`` to scores
            shaped like that parameter; default: the parameters themselves.
        **kwargs: arguments of ``pruning_method``, e.g. ``amount``.

    Returns:
        None
    """
    _global.global_unstructured(parameters, pruning_method, importance_scores, kwargs)


def custom_from_mask(module, name, mask):
    """Prune ``module.<name>`` with a given mask.

    Args:
        module (nn.Module): module holding the tensor.
        name (str): name of the parameter.
        mask (torch.Tensor): the mask, shaped like the parameter; it is
            combined with any earlier mask and cast to the mask dtype.

    Returns:
        nn.Module: ``module``.
    """
    CustomFromMask.apply(module, name, mask)
    return module


def remove(module, name):
    """Make the pruning of ``module.<name>`` permanent and drop its hook.

    Args:
        module (nn.Module): module holding the pruned tensor.
        name (str): name of the parameter.

    Returns:
        nn.Module: ``module``, with ``<name>`` a plain Parameter again.
    """
    hooks = module._forward_pre_hooks
    for key, hook in hooks.items():
        if isinstance(hook, _AnyMethod) and hook._tensor_name == name:
            hook.remove(module)
            del hooks[key]
            return module
    raise ValueError(
        f"Parameter '{name}' of module {module} has to be pruned before pruning can be removed")


def mask_of(module, name):
    """The mask of the pruned tensor ``module.<name>`` as a bool tensor of its
    shape (a DTensor for a DTensor parameter), whatever its layout: the
    reference's ``<name>_mask`` or an in-place bits or bool mask.

    Args:
        module (nn.Module): module holding the pruned tensor.
        name (str): name of the parameter.

    Returns:
        torch.Tensor: a new bool tensor, True where the entry is kept.
    """
    if not any(isinstance(hook, _AnyMethod) and hook._tensor_name == name
               for hook in module._forward_pre_hooks.values()):
        raise ValueError(f"Parameter '{name}' of module {module} has to be pruned to have a mask")
    return _layouts.of(module, name).mask(module, name) != 0


def is_pruned(module):
    """Whether ``module`` or any submodule has a pruning hook (of either library).

    Args:
        module (nn.Module): the module to inspect.

    Returns:
        bool: True if some forward pre-hook is a pruning method.
    """
    return any(isinstance(hook, _AnyMethod)
               for _, sub in module.named_modules()
               for hook in sub._forward_pre_hooks.values())
