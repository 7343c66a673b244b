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
"""
import copy
import dataclasses
import functools
import numbers
import weakref
from abc import abstractmethod
from collections.abc import Iterable
from typing import Optional

import torch
from torch.nn.utils import prune as _torch_prune

from . import _backends, _kernel_paths, _layouts, ops
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

# Either library's classes: hooks and container members may come from both.
_AnyMethod = _torch_prune.BasePruningMethod
_AnyContainer = _torch_prune.PruningContainer

# id(hook) -> weakref to the module the hook was last applied to or called on,
# so that the hook's __deepcopy__ can find the module's cached pruned tensor.
# Entries leave with their hook (weakref.finalize).
_HOOK_MODULES = {}


def _remember_module(hook, module):
    key = id(hook)
    ref = _HOOK_MODULES.get(key)
    if ref is not None and ref() is module:
        return
    if ref is None:
        try:
            weakref.finalize(hook, _HOOK_MODULES.pop, key, None)
        except TypeError:  # not weak-referenceable (a user subclass with __slots__)
            return
    _HOOK_MODULES[key] = weakref.ref(module)


def _remembered_module(hook):
    ref = _HOOK_MODULES.get(id(hook))
    return None if ref is None else ref()


class BasePruningMethod(_torch_prune.BasePruningMethod):
    """Abstract base of the pruning methods; subclasses define ``compute_mask``.

    A method object is also the forward pre-hook of the tensor it prunes: before
    every forward it recomputes ``module.<name>`` as ``<name>_mask * <name>_orig``.
    It is an instance of ``torch.nn.utils.prune.BasePruningMethod``.
    """

    _tensor_name: str

    def __call__(self, module, inputs):
        """Forward pre-hook: store the masked tensor as ``module.<name>``.

        Args:
            module (nn.Module): the module holding the pruned tensor.
            inputs: the forward inputs (unused).
        """
        _layouts.of(module, self._tensor_name).refresh(module, self._tensor_name, self)
        _remember_module(self, module)

    @abstractmethod
    def compute_mask(self, t, default_mask):
        """Compute the new mask of ``t``.

        Args:
            t (torch.Tensor): importance scores of the tensor to prune.
            default_mask (torch.Tensor): mask of earlier prunes (ones on a first
                prune), same shape as ``t``; entries it zeroes stay zero.

        Returns:
            torch.Tensor: the mask, same shape as ``t``.
        """

    def apply_mask(self, module):
        """Multiply the stored mask into the stored original tensor.

        Args:
            module (nn.Module): the module holding ``<name>_orig`` and ``<name>_mask``.

        Returns:
            torch.Tensor: ``<name>_mask`` (cast to the parameter dtype) times
            ``<name>_orig``; differentiable with respect to ``<name>_orig``.
        """
        if self._tensor_name is None:
            raise AssertionError(f"Module {module} has to be pruned")
        name = self._tensor_name
        layout = _layouts.of(module, name)
        orig = layout.values(module, name)
        return _masked_product(layout.mask(module, name).to(dtype=orig.dtype), orig)

    @classmethod
    def apply(cls, module, name, *args, importance_scores=None, **kwargs):
        """Prune ``module.<name>`` with ``cls(*args, **kwargs)`` and keep it pruned.

        On a first prune the parameter moves to ``<name>_orig`` (same Parameter
        object), the mask becomes the buffer ``<name>_mask`` and the method the
        forward pre-hook. On later prunes the existing hook and the new method
        are combined in a :class:`PruningContainer` that prunes only what is
        still unpruned. The hook goes to the end of the hook order. If anything
        fails, the module is left exactly as it was, and the error propagates.

        Args:
            module (nn.Module): module holding the tensor to prune.
            name (str): name of the parameter to prune.
            *args: positional arguments of ``cls``.
            importance_scores (torch.Tensor, optional): scores with the shape of
                the parameter; default: the current ``module.<name>``.
            **kwargs: keyword arguments of ``cls``.

        Returns:
            BasePruningMethod: the hook now registered: the new method, or the
            container holding it.
        """
        hooks = module._forward_pre_hooks
        found = [key for key, hook in hooks.items()
                 if isinstance(hook, _AnyMethod) and hook._tensor_name == name]
        current = module.__dict__.get(name, module._parameters.get(name))
        layout = _layouts.for_prune(module, name)
        if cls not in (Identity, CustomFromMask):
            # Methods that may run collectives: every rank must make the same call.
            chain = [type(hook).__name__ for key in found for hook in
                     getattr(hooks[key], "_pruning_methods", (hooks[key],))]
            _backends.of(current).agree(current, [("method", cls.__name__), ("args", args), *sorted(kwargs.items()),
                                    ("importance_scores", importance_scores), ("tensor", current),
                                    ("hooks", chain)])
        if len(found) > 1:
            raise AssertionError(
                f"Avoid adding multiple pruning hooks to the same tensor {name} "
                f"of module {module}. Use a PruningContainer.")
        saved = _layouts.Snapshot(module, [name])
        old = hooks.pop(found[0]) if found else None
        assigned = False
        try:
            method = new = cls(*args, **kwargs)
            method._tensor_name = name
            if isinstance(old, _AnyContainer):
                old.add_pruning_method(method)
                method = old
            elif old is not None:
                container = PruningContainer(old)
                container.add_pruning_method(method)
                method = container

            orig = getattr(module, name)
            if importance_scores is None:
                importance_scores = orig
            elif importance_scores.shape != orig.shape:
                raise AssertionError(
                    f"importance_scores should have the same shape as parameter {name} "
                    f"of {module}, got {importance_scores.shape} vs {orig.shape}")
            else:
                _backends.check_like(importance_scores, orig, "importance_scores")

            if not isinstance(method, _AnyContainer):
                layout.install(module, name, orig)
            mask = _final_mask(new, layout)
            if mask is None:
                mask = method.compute_mask(importance_scores, default_mask=_default_mask(
                    method, layout, module, name, orig, importance_scores))
            layout.store(module, name, mask)
            assigned = True
            layout.publish(module, name, method)
            module.register_forward_pre_hook(method)
        except BaseException:
            saved.restore(reassigned=[name] if assigned else ())
            raise
        layout.finish(module, name)  # last: in place, it changes the values
        _remember_module(method, module)
        return method

    def prune(self, t, default_mask=None, importance_scores=None):
        """Return ``t`` times the mask this method computes for it.

        Args:
            t (torch.Tensor): tensor to prune.
            default_mask (torch.Tensor, optional): mask of earlier prunes;
                default: ones.
            importance_scores (torch.Tensor, optional): scores with the shape
                of ``t``; default: ``t``.

        Returns:
            torch.Tensor: the pruned copy of ``t``.
        """
        if importance_scores is None:
            importance_scores = t
        elif importance_scores.shape != t.shape:
            raise AssertionError(
                "importance_scores should have the same shape as tensor t, "
                f"got {importance_scores.shape} vs {t.shape}")
        if default_mask is None:
            default_mask = torch.ones_like(t)
        return t * self.compute_mask(importance_scores, default_mask=default_mask)

    def remove(self, module):
        """Make the pruning permanent and drop the reparametrization.

        ``<name>_orig`` gets the masked values and becomes ``<name>`` again (the
        same Parameter object, appended at the end of the parameters);
        ``<name>_mask`` is deleted. The caller removes the hook itself.

        Args:
            module (nn.Module): the module holding the pruned tensor.
        """
        if self._tensor_name is None:
            raise AssertionError(
                f"Module {module} has to be pruned before pruning can be removed")
        _layouts.of(module, self._tensor_name).remove(module, self._tensor_name, self)

    def __deepcopy__(self, memo):
        """Deep-copy the hook, making its module's cached pruned tensor copyable.

        ``module.<name>`` is ``mask * orig``, a non-leaf tensor under grad mode,
        which ``torch.Tensor.__deepcopy__`` refuses (pytorch#37322). A module's
        ``__dict__`` lists ``_forward_pre_hooks`` before that attribute, so when
        the module is being deep-copied, this hook is copied first and enters
        a detached copy of the cached tensor into ``memo``; the module's copy
        then holds the same values, as if it had been pruned under
        ``torch.no_grad()``, until its next forward recomputes them.

        Args:
            memo (dict): the ``copy.deepcopy`` memo.

        Returns:
            BasePruningMethod: the copy.
        """
        module = _remembered_module(self)
        copying_module = module is not None and id(module) in memo
        if copying_module:
            cached = module.__dict__.get(getattr(self, "_tensor_name", None))
            if isinstance(cached, torch.Tensor) and not cached.is_leaf and id(cached) not in memo:
                memo[id(cached)] = cached.detach().clone()
                memo.setdefault(id(memo), []).append(cached)
        new = copy._reconstruct(self, memo, *self.__reduce_ex__(4))
        if copying_module:
            _remember_module(new, memo[id(module)])
        return new


def _honours_torch_replacement(torch_cls):
    """Decorate our ``compute_mask`` that stands in for ``torch_cls.compute_mask``.

    While ``torch_cls.compute_mask`` is torch's own function, ours runs. Once
    something replaces torch's (``mock.patch("torch.nn.utils.prune.L1Unstructured
    .compute_mask")``, a monkeypatch), our method calls the replacement instead,
    as the reference would, so code written against ``torch.nn.utils.prune``
    keeps working with only its import changed.
    """
    stock = vars(torch_cls)["compute_mask"]

    def decorate(fast):
        @functools.wraps(fast)
        def compute_mask(self, t, default_mask):
            current = vars(torch_cls)["compute_mask"]
            if current is not stock:
                bind = getattr(type(current), "__get__", None)
                replacement = current if bind is None else bind(current, self, type(self))
                return replacement(t, default_mask=default_mask)
            return fast(self, t, default_mask)
        return compute_mask
    return decorate


def _unpatched(cls):
    """Whether ``cls.compute_mask`` and its torch twin's are still the originals."""
    ours, twin, theirs = _ORIGINAL_COMPUTE_MASK[cls]
    return vars(cls).get("compute_mask") is ours and vars(twin).get("compute_mask") is theirs


def _is_plain(method, classes):
    """Whether ``method`` is exactly one of our ``classes``, its ``compute_mask`` unreplaced."""
    cls = type(method)
    return (cls in classes and _unpatched(cls)
            and "compute_mask" not in getattr(method, "__dict__", ()))


def _kernel_path(method):
    """The kernel path of ``method`` (its class's ``_kernel``, see
    :mod:`fastprune._kernel_paths`) when ``method`` is exactly one of our
    classes with its ``compute_mask`` unreplaced, else None: a subclass, or a
    replaced ``compute_mask``, takes the reference's algorithm."""
    path = vars(type(method)).get("_kernel")
    return path if path is not None and _is_plain(method, (type(method),)) else None


def _container_path(container, t, mask):
    """The kernel path ``container.compute_mask(t, mask)`` takes, or None.

    A kernel path never writes into ``mask``, so ``apply`` need not clone it.
    """
    if (not _unpatched(PruningContainer)
            or type(container).compute_mask is not vars(PruningContainer)["compute_mask"]
            or "compute_mask" in container.__dict__
            or not container._pruning_methods
            or t.shape != mask.shape or t.device != mask.device):
        return None
    path = _kernel_path(container._pruning_methods[-1])
    return path if path is not None and path.accepts(t, mask) else None


def _final_mask(method, layout):
    """The new mask itself when the method just added knows it, else None
    (compute it). A global prune's share (:meth:`CustomFromMask._apply_owned`)
    is the whole new mask where the layout's masks are binary: it was selected
    among the live entries only, so it already holds the earlier mask's zeros
    (and is in the layout's format, packed or not)."""
    if (type(method) is CustomFromMask and _unpatched(CustomFromMask) and layout.binary_masks
            and getattr(method.mask, "_fastprune_owned", False)):
        return method.mask
    return None


def _default_mask(method, layout, module, name, orig, scores):
    """The ``default_mask`` of a prune: the current mask (a copy when the
    container's step may write into it), or :func:`_first_mask`."""
    if not isinstance(method, _AnyContainer):
        return _first_mask(method, orig, scores)
    current = layout.mask(module, name)
    return current if _container_path(method, scores, current) is not None else current.clone()


def _masked_product(mask, orig):
    """``mask * orig``, the pruned tensor.

    A large plain CPU tensor (from the block cache's ``min_bytes`` on, see
    :func:`fastprune.cache_info`) is written into memory from fastprune's
    block cache, whose pages are already mapped: a fresh one costs more to
    fault in than the product itself, and every forward builds it again.
    Under autograd it is ``orig`` copied there, then multiplied in place by
    ``mask``: the same bits (the product commutes), ``grad_fn`` ``MulBackward0``
    and the same gradient for ``orig``, with one more node (``CopyBackwards``)
    in the graph; without autograd it is one ``torch.mul`` into that memory.
    """
    if (type(orig) in (torch.Tensor, torch.nn.Parameter) and type(mask) is torch.Tensor
            and orig.device.type == "cpu" and orig.is_floating_point()
            and mask.dtype == orig.dtype and mask.shape == orig.shape and not mask.requires_grad
            and orig.is_contiguous() and mask.is_contiguous()
            and orig.nbytes >= ops.cache_info()["min_bytes"]
            and not torch.compiler.is_compiling()):
        out = ops.cached_empty_like(orig)
        if orig.requires_grad and torch.is_grad_enabled():
            return out.copy_(orig).mul_(mask)
        return torch.mul(mask, orig, out=out)
    return mask * orig


def _first_mask(method, orig, scores):
    """Default mask of a first prune: ``torch.ones_like(orig)``.

    Our unstructured methods get a stride-0 view of a single one instead (the
    kernel reads it in place and returns a fresh mask in the scores' format,
    which for contiguous tensors is the format of ``ones_like(orig)``), and so
    does our CustomFromMask when its mask is contiguous too (``ones * mask`` is
    then a plain copy of the mask; with ``ones_like(orig)`` first, the product
    takes the weight's format, as in the reference, whatever the mask's).
    """
    if type(method) is CustomFromMask and _unpatched(CustomFromMask):
        return _kernel_paths.unpruned_mask(orig, method.mask)
    path = _kernel_path(method)
    if path is not None and path.first_ones:
        return _kernel_paths.unpruned_mask(orig, scores)
    return torch.ones_like(orig)


class PruningContainer(BasePruningMethod, _torch_prune.PruningContainer):
    """The sequence of pruning methods applied, in order, to one tensor.

    Each new method prunes only what the earlier ones left: entries still at 1
    (unstructured), channels not yet all zero (structured), or everything
    (global). Members may come from either library. It is an instance of
    ``torch.nn.utils.prune.PruningContainer``.

    Args:
        *args (BasePruningMethod): initial members, all acting on the same
            tensor; the container takes the first one's ``_tensor_name``.
    """

    def __init__(self, *args):
        self._pruning_methods = ()
        if args:
            self._tensor_name = args[0]._tensor_name
        for method in args:
            self.add_pruning_method(method)

    @_honours_torch_replacement(_torch_prune.PruningContainer)
    def compute_mask(self, t, default_mask):
        """Apply the last member on what ``default_mask`` leaves unpruned.

        Args:
            t (torch.Tensor): importance scores of the tensor.
            default_mask (torch.Tensor): mask of the earlier members.

        Returns:
            torch.Tensor: the combined mask, with the dtype of ``t``.
        """
        return self._combine_masks(self._pruning_methods[-1], t, default_mask)

    def _combine_masks(self, method, t, mask):
        """``mask`` (as ``t``'s dtype) with ``method`` applied to its unpruned part.

        Args:
            method (BasePruningMethod): the member to apply.
            t (torch.Tensor): importance scores, same shape as ``mask``.
            mask (torch.Tensor): mask of the earlier members.

        Returns:
            torch.Tensor: the new mask, with the dtype of ``t``.
        """
        path = _container_path(self, t, mask)
        if path is not None:
            return path.step(method, t, mask)
        backend = _backends.of(t)
        if not backend.boolean_indexing:
            # No boolean indexing of DTensors: a method that ignores the
            # region (Identity) or covers it all ("global") runs on the whole.
            if method.PRUNING_TYPE == "global" or _is_plain(method, (Identity,)):
                return method.compute_mask(t, default_mask=mask).to(dtype=t.dtype)
            if method.PRUNING_TYPE == "structured" and t.dim() <= 1:
                raise NotImplementedError(
                    f"fastprune: {type(method).__name__} on a 1-D DTensor that is already pruned: the "
                    "reference then prunes a (1, n) view of it (a quirk of its boolean indexing), which "
                    "fastprune does not reproduce for DTensors; prune 1-D parameters with an unstructured "
                    "method")
            raise NotImplementedError(
                f"fastprune: {type(method).__name__} in a PruningContainer is not supported for DTensor "
                "parameters (supported: fastprune's own L1/Random Unstructured, Ln/Random Structured, "
                "Identity, CustomFromMask)")

        new_mask = mask.to(dtype=t.dtype)
        pruning_type = method.PRUNING_TYPE
        if pruning_type == "unstructured":
            region = mask == 1
        elif pruning_type == "structured":
            dim = _kernel_paths.structured_dim(method, t)
            region = [slice(None)] * t.dim()
            region[dim] = backend.live_channels(mask, dim)
            region = tuple(region)
        elif pruning_type == "global":
            region = (slice(None),) * t.dim()
        else:
            raise ValueError(f"Unrecognized PRUNING_TYPE {pruning_type}")
        partial = method.compute_mask(t[region], default_mask=mask[region])
        new_mask[region] = partial.to(dtype=new_mask.dtype)
        return new_mask


class Identity(BasePruningMethod, _torch_prune.Identity):
    """Prunes nothing: sets up the reparametrization with a mask of ones."""

    PRUNING_TYPE = "unstructured"

    @_honours_torch_replacement(_torch_prune.Identity)
    def compute_mask(self, t, default_mask):
        """Return ``default_mask`` itself.

        Args:
            t (torch.Tensor): importance scores (unused).
            default_mask (torch.Tensor): mask of earlier prunes.

        Returns:
            torch.Tensor: ``default_mask`` (the same object).
        """
        return default_mask

    @classmethod
    def apply(cls, module, name):
        """Reparametrize ``module.<name>`` without pruning anything.

        Args:
            module (nn.Module): module holding the tensor.
            name (str): name of the parameter.

        Returns:
            BasePruningMethod: the hook now registered.
        """
        return super().apply(module, name)


class RandomUnstructured(BasePruningMethod, _torch_prune.RandomUnstructured):
    """Prunes entries chosen uniformly at random.

    Args:
        amount (int or float): entries to prune: a count, or a fraction in
            [0, 1] of the entries (rounded half to even).
    """

    PRUNING_TYPE = "unstructured"
    _kernel = _kernel_paths.UnstructuredPath(_kernel_paths.random_masks, random=True)

    def __init__(self, amount):
        _validate_pruning_amount_init(amount)
        self.amount = amount

    @_honours_torch_replacement(_torch_prune.RandomUnstructured)
    def compute_mask(self, t, default_mask):
        """Zero k random entries of ``default_mask``.

        Draws ``t.numel()`` numbers with ``torch.rand_like(t)`` (row-major
        order, ``t``'s device generator) and prunes the k largest, as the
        reference does; entries may be ones ``default_mask`` already zeroes.

        Args:
            t (torch.Tensor): tensor giving the shape, dtype and device of the draws.
            default_mask (torch.Tensor): mask of earlier prunes.

        Returns:
            torch.Tensor: a new mask with ``default_mask``'s dtype.
        """
        n = t.nelement()
        k = _compute_nparams_toprune(self.amount, n)
        _validate_pruning_amount(k, n)
        if k == 0:
            return default_mask.clone()
        return _backends.of(t).random_mask(t, default_mask, k)

    @classmethod
    def apply(cls, module, name, amount):
        """Prune random entries of ``module.<name>``.

        Args:
            module (nn.Module): module holding the tensor.
            name (str): name of the parameter.
            amount (int or float): count or fraction of the unpruned entries.

        Returns:
            BasePruningMethod: the hook now registered.
        """
        return super().apply(module, name, amount=amount)


class L1Unstructured(BasePruningMethod, _torch_prune.L1Unstructured):
    """Prunes the entries with the smallest absolute value.

    Exactly k entries are pruned; among equal values the lower row-major index
    goes first; NaN ranks above infinity.

    Args:
        amount (int or float): entries to prune: a count, or a fraction in
            [0, 1] of the entries (rounded half to even).
    """

    PRUNING_TYPE = "unstructured"
    _kernel = _kernel_paths.UnstructuredPath(_kernel_paths.magnitude_masks, random=False)

    def __init__(self, amount):
        _validate_pruning_amount_init(amount)
        self.amount = amount

    @_honours_torch_replacement(_torch_prune.L1Unstructured)
    def compute_mask(self, t, default_mask):
        """Zero the entries of ``default_mask`` where ``|t|`` is among the k smallest.

        Args:
            t (torch.Tensor): importance scores.
            default_mask (torch.Tensor): mask of earlier prunes.

        Returns:
            torch.Tensor: a new mask with ``default_mask``'s dtype.
        """
        k = _checked_count(self.amount, t.nelement())
        if k == 0:
            return default_mask.clone()
        return _backends.of(t).select(_backends.magnitude_scores(t), default_mask, count=k)

    @classmethod
    def apply(cls, module, name, amount, importance_scores=None):
        """Prune the smallest-magnitude entries of ``module.<name>``.

        Args:
            module (nn.Module): module holding the tensor.
            name (str): name of the parameter.
            amount (int or float): count or fraction of the unpruned entries.
            importance_scores (torch.Tensor, optional): scores to rank instead
                of the parameter.

        Returns:
            BasePruningMethod: the hook now registered.
        """
        return super().apply(module, name, amount=amount, importance_scores=importance_scores)


class RandomStructured(BasePruningMethod, _torch_prune.RandomStructured):
    """Prunes whole channels chosen at random.

    Args:
        amount (int or float): channels to prune: a count, or a fraction in
            [0, 1] of the channels (rounded half to even).
        dim (int): dimension that indexes the channels. Default: -1.
    """

    PRUNING_TYPE = "structured"
    _kernel = _kernel_paths.StructuredPath()

    def __init__(self, amount, dim=-1):
        _validate_pruning_amount_init(amount)
        self.amount = amount
        self.dim = dim

    @_honours_torch_replacement(_torch_prune.RandomStructured)
    def compute_mask(self, t, default_mask):
        """Zero k random channels of ``default_mask``.

        Draws one number per channel with ``torch.rand`` on the CPU default
        generator (whatever ``t``'s device) and keeps the channels whose draw
        exceeds the k-th smallest, as the reference does.

        Args:
            t (torch.Tensor): tensor giving the shape, dtype and format.
            default_mask (torch.Tensor): mask of earlier prunes.

        Returns:
            torch.Tensor: the mask, with ``t``'s dtype (``default_mask`` itself
            when nothing is pruned).
        """
        backend = _backends.of(t, default_mask)
        keep = _kernel_paths.structured_keep(backend, self, t)
        return default_mask if keep is None else backend.channel_mask(t, self.dim, keep, default_mask)

    @classmethod
    def apply(cls, module, name, amount, dim=-1):
        """Prune random channels of ``module.<name>``.

        Args:
            module (nn.Module): module holding the tensor.
            name (str): name of the parameter.
            amount (int or float): count or fraction of the unpruned channels.
            dim (int): dimension that indexes the channels. Default: -1.

        Returns:
            BasePruningMethod: the hook now registered.
        """
        return super().apply(module, name, amount=amount, dim=dim)


class LnStructured(BasePruningMethod, _torch_prune.LnStructured):
    """Prunes the channels with the smallest L``n`` norm.

    Args:
        amount (int or float): channels to prune: a count, or a fraction in
            [0, 1] of the channels (rounded half to even).
        n (int, float, inf, -inf, 'fro', 'nuc'): the norm, as ``p`` of
            :func:`torch.norm`.
        dim (int): dimension that indexes the channels. Default: -1.
    """

    PRUNING_TYPE = "structured"
    _kernel = _kernel_paths.StructuredPath()

    def __init__(self, amount, n, dim=-1):
        _validate_pruning_amount_init(amount)
        self.amount = amount
        self.n = n
        self.dim = dim

    @_honours_torch_replacement(_torch_prune.LnStructured)
    def compute_mask(self, t, default_mask):
        """Zero the k channels of ``default_mask`` with the smallest norm of ``t``.

        Args:
            t (torch.Tensor): importance scores.
            default_mask (torch.Tensor): mask of earlier prunes.

        Returns:
            torch.Tensor: the mask, with ``t``'s dtype (``default_mask`` itself
            when nothing is pruned).
        """
        backend = _backends.of(t, default_mask)
        keep = _kernel_paths.structured_keep(backend, self, t)
        return default_mask if keep is None else backend.channel_mask(t, self.dim, keep, default_mask)

    @classmethod
    def apply(cls, module, name, amount, n, dim, importance_scores=None):
        """Prune the smallest-norm channels of ``module.<name>``.

        Args:
            module (nn.Module): module holding the tensor.
            name (str): name of the parameter.
            amount (int or float): count or fraction of the unpruned channels.
            n (int, float, inf, -inf, 'fro', 'nuc'): the norm.
            dim (int): dimension that indexes the channels.
            importance_scores (torch.Tensor, optional): scores to rank instead
                of the parameter.

        Returns:
            BasePruningMethod: the hook now registered.
        """
        return super().apply(module, name, amount=amount, n=n, dim=dim,
                             importance_scores=importance_scores)


class CustomFromMask(BasePruningMethod, _torch_prune.CustomFromMask):
    """Applies a given mask.

    Args:
        mask (torch.Tensor): the mask (kept as is, not copied).
    """

    PRUNING_TYPE = "global"

    def __init__(self, mask):
        self.mask = mask

    @_honours_torch_replacement(_torch_prune.CustomFromMask)
    def compute_mask(self, t, default_mask):
        """Multiply ``default_mask`` by the stored mask.

        Args:
            t (torch.Tensor): importance scores (unused).
            default_mask (torch.Tensor): mask of earlier prunes, same shape as
                the stored mask.

        Returns:
            torch.Tensor: the product, with ``default_mask``'s dtype.
        """
        if default_mask.shape != self.mask.shape:
            raise AssertionError(
                f"default_mask shape {default_mask.shape} must match "
                f"self.mask shape {self.mask.shape}")
        _backends.check_like(self.mask, default_mask, "the mask")
        if (getattr(self.mask, "_fastprune_owned", False) and self.mask.dtype == default_mask.dtype
                and ops.is_broadcast_one(default_mask)):  # (_apply_owned's mask, _first_mask's ones)
            return self.mask  # ones times the mask: the mask itself, not a copy
        return default_mask * self.mask.to(dtype=default_mask.dtype)

    @classmethod
    def apply(cls, module, name, mask):
        """Prune ``module.<name>`` with a given mask.

        Args:
            module (nn.Module): module holding the tensor.
            name (str): name of the parameter.
            mask (torch.Tensor): the mask, shaped like the parameter.

        Returns:
            BasePruningMethod: the hook now registered.
        """
        return super().apply(module, name, mask=mask)

    @classmethod
    def _apply_owned(cls, module, name, mask):
        """:meth:`apply` with a fresh mask that nobody else holds (a global
        prune's share of its select): on a first prune the buffer is then
        ``mask`` itself rather than ``ones * mask``, so one tensor, not two,
        holds it (with :func:`_share_mask` for the hook's copy). The
        mask is marked for the duration of this call only."""
        mask._fastprune_owned = True
        try:
            return cls.apply(module, name, mask)
        finally:
            del mask._fastprune_owned


class L1SemiStructured(BasePruningMethod):
    """N:M semi-structured pruning: in every group of ``m`` consecutive entries
    along ``dim`` (groups aligned at index 0), at most ``n`` stay nonzero.

    Of each group's live entries (mask still 1) those with the smallest
    absolute value are pruned, ties to the lower index, until ``n`` are left.
    Entries an earlier prune zeroed count among the pruned of their group: a
    group with at most ``n`` live entries loses nothing more. 2:4 along the
    last dim (``n=2, m=4, dim=-1``) is the pattern that
    ``torch.sparse.to_sparse_semi_structured`` and sparse tensor cores run.
    Not a torch method: no ``torch.nn.utils.prune`` twin, and not accepted by
    ``global_unstructured``.

    Args:
        n (int): entries that may stay in each group, ``0 <= n < m``. Default: 2.
        m (int): entries per group, ``m >= 1``. Default: 4.
        dim (int): the dimension the groups run along; its size must be a
            multiple of ``m``. Default: -1.
    """

    PRUNING_TYPE = "unstructured"
    _kernel = _kernel_paths.SegmentedPath()

    def __init__(self, n=2, m=4, dim=-1):
        _validate_int("n", n)
        _validate_int("m", m)
        _validate_int("dim", dim)
        if not 0 <= n < m:
            raise ValueError(f"n={n}, m={m}: N:M pruning needs integers 0 <= n < m")
        self.n, self.m, self.dim = n, m, dim

    def compute_mask(self, t, default_mask):
        """Zero, in every group of ``default_mask``, its live entries with the
        smallest ``|t|`` until at most ``n`` are left.

        Args:
            t (torch.Tensor): importance scores.
            default_mask (torch.Tensor): mask of earlier prunes; only its
                entries at 1 are live.

        Returns:
            torch.Tensor: a new mask with ``default_mask``'s dtype.
        """
        _validate_pruning_dim(t, self.dim)
        size = t.shape[self.dim]
        if size % self.m:
            raise ValueError(
                f"L1SemiStructured: the size of dim {self.dim} ({size}) must be a multiple "
                f"of m={self.m}, got a tensor of shape {tuple(t.shape)}")
        return _kernel_paths.segmented_select(t, default_mask, dim=self.dim, group=self.m, count=self.n, keep=True)

    @classmethod
    def apply(cls, module, name, n=2, m=4, dim=-1, importance_scores=None):
        """Prune ``module.<name>`` to at most ``n`` of every ``m`` along ``dim``.

        Args:
            module (nn.Module): module holding the tensor.
            name (str): name of the parameter.
            n (int): entries that may stay in each group.
            m (int): entries per group.
            dim (int): the dimension the groups run along.
            importance_scores (torch.Tensor, optional): scores to rank instead
                of the parameter.

        Returns:
            BasePruningMethod: the hook now registered.
        """
        _check_not_in_reference_container(cls, module, name)
        return super().apply(module, name, n=n, m=m, dim=dim, importance_scores=importance_scores)


class ChannelwiseL1Unstructured(BasePruningMethod):
    """Per-channel exact-k magnitude pruning (Wanda's per-output-row rule):
    every slice along ``dim`` loses the same share of its live entries.

    Each slice ``t.select(dim, i)`` (an output row of a Linear weight for
    ``dim=0``) loses exactly ``round(amount * its live entries)`` (ties to
    even; an int amount: that many in every slice) of its live entries (mask
    still 1) with the smallest absolute value, ties to the lower index. As
    with :class:`L1Unstructured`, amounts are relative to what is still
    unpruned, here per slice. Not a torch method: no ``torch.nn.utils.prune``
    twin, and not accepted by ``global_unstructured``.

    Args:
        amount (int or float): entries to prune in every slice: a count, or a
            fraction in [0, 1] of its live entries.
        dim (int): the dimension that indexes the slices. Default: 0.
    """

    PRUNING_TYPE = "unstructured"
    _kernel = _kernel_paths.SegmentedPath()

    def __init__(self, amount, dim=0):
        _validate_pruning_amount_init(amount)
        _validate_int("dim", dim)
        self.amount = amount
        self.dim = dim

    def compute_mask(self, t, default_mask):
        """Zero, in every slice of ``default_mask`` along ``dim``, its k live
        entries with the smallest ``|t|``.

        Args:
            t (torch.Tensor): importance scores.
            default_mask (torch.Tensor): mask of earlier prunes; only its
                entries at 1 are live.

        Returns:
            torch.Tensor: a new mask with ``default_mask``'s dtype.
        """
        _validate_pruning_dim(t, self.dim)
        channels = t.shape[self.dim]
        if not isinstance(self.amount, numbers.Integral):
            return _kernel_paths.segmented_select(t, default_mask, dim=self.dim, fraction=float(self.amount))
        _validate_pruning_amount(self.amount, t.numel() // channels if channels else 0)
        _check_count(self.amount)
        return _kernel_paths.segmented_select(t, default_mask, dim=self.dim, count=self.amount)

    @classmethod
    def apply(cls, module, name, amount, dim=0, importance_scores=None):
        """Prune the smallest-magnitude entries of every slice of ``module.<name>``.

        Args:
            module (nn.Module): module holding the tensor.
            name (str): name of the parameter.
            amount (int or float): count or fraction of each slice's live entries.
            dim (int): the dimension that indexes the slices.
            importance_scores (torch.Tensor, optional): scores to rank instead
                of the parameter.

        Returns:
            BasePruningMethod: the hook now registered.
        """
        _check_not_in_reference_container(cls, module, name)
        return super().apply(module, name, amount=amount, dim=dim, importance_scores=importance_scores)


def _check_not_in_reference_container(cls, module, name):
    """A torch.nn.utils.prune container gathers the live entries into 1-D
    before calling its last member, which would lose the groups and slices of
    ``cls``: refuse before anything changes."""
    for hook in module._forward_pre_hooks.values():
        if (isinstance(hook, _AnyContainer) and not isinstance(hook, PruningContainer)
                and hook._tensor_name == name):
            raise TypeError(
                f"{cls.__name__} cannot join the torch.nn.utils.prune.PruningContainer of "
                f"{name}: it gathers the unpruned entries into 1-D, losing the groups and slices")


_ORIGINAL_COMPUTE_MASK = {
    cls: (vars(cls)["compute_mask"], twin, vars(twin)["compute_mask"])
    for cls, twin in ((PruningContainer, _torch_prune.PruningContainer),
                      (L1Unstructured, _torch_prune.L1Unstructured),
                      (RandomUnstructured, _torch_prune.RandomUnstructured),
                      (CustomFromMask, _torch_prune.CustomFromMask),
                      (Identity, _torch_prune.Identity),
                      (LnStructured, _torch_prune.LnStructured),
                      (RandomStructured, _torch_prune.RandomStructured),
                      # no torch twin: a class is its own, so only its own compute_mask counts
                      (L1SemiStructured, L1SemiStructured),
                      (ChannelwiseL1Unstructured, ChannelwiseL1Unstructured))
}


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
    prepared = _prepare_global_agreed(parameters, importance_scores, pruning_method, kwargs)
    currents, scores, method = prepared.currents, prepared.scores, prepared.method
    path = _kernel_path(method)
    if path is not None and all(path.accepts(s, m) for s, m in zip(scores, prepared.masks_or_ones)):
        writable = prepared.writable_masks() if path.reads_live_sets else None
        if writable is not None:
            return _global_in_place(prepared, writable)
        masks = prepared.live_sets() if path.reads_live_sets else prepared.masks()
        own_masks = path.global_masks(method, currents, scores, masks)
    else:
        own_masks = _global_reference_masks(prepared.container, currents, scores, prepared.masks())
    _apply_global_masks(prepared.parameters, own_masks, prepared.firsts)


def _global_in_place(prepared, masks):
    """A global magnitude prune whose pairs are all pruned in place (bits or
    bool masks, local tensors): :func:`fastprune.ops.prune_in_place_` selects
    among the live entries and, in its last pass, clears the pruned entries'
    mask bits and zeroes their values; the masks are the stored ones (for a
    first prune, new ones with every entry live), nothing else is allocated.
    The amount is checked, and every pair installed, before it runs."""
    scores, _ = _kernel_paths.promoted_scores([_backends.magnitude_scores(s) for s in prepared.scores])
    n = sum(c.numel() if first else layout.count_live(m) for c, m, first, layout in
            zip(prepared.currents, masks, prepared.firsts, prepared.layouts))
    k = _checked_count(prepared.method.amount, n)
    values = [module._parameters[name].detach() for module, name in prepared.parameters]
    _apply_global_masks(prepared.parameters, list(masks), prepared.firsts,
                        prune_values=lambda: ops.prune_in_place_(values, scores, masks, k))


def _prepare_global_agreed(parameters, importance_scores, pruning_method, kwargs):
    """:func:`_prepare_global`, the layouts' checks (an FSDP2 parameter held
    gathered or tied raises), and with DTensor parameters the check that
    every rank of their mesh made the same call. Every check that can fail
    on one rank only (a misspelled name, an extra plain pair, scores of
    another shape) runs before that agreement, which reports it to every
    rank: no rank is left waiting in a collective for a peer that raised."""
    if isinstance(parameters, Iterable):
        parameters = list(parameters)
    mesh_tensor = _backends.first_sharded(_named_tensors(parameters))
    prepared, error, call = None, None, []
    try:
        prepared = _prepare_global(parameters, importance_scores, pruning_method, kwargs)
        _backends.check_one_mesh(prepared.currents)
        call = [("method", getattr(pruning_method, "__name__", pruning_method)), *sorted(kwargs.items()),
                ("parameters", prepared.currents), ("importance_scores", prepared.scores),
                ("pruned", [not first for first in prepared.firsts])]
    except Exception as e:  # reported to every rank by agree()
        error = e
    _backends.of(mesh_tensor).agree(mesh_tensor, call, error)
    return prepared


def _named_tensors(parameters):
    """The tensors the pairs name, skipping malformed pairs and missing
    names (:func:`_prepare_global` raises the reference's errors for them)."""
    out = []
    for pair in parameters if isinstance(parameters, list) else ():
        try:
            module, name = pair
            out.append(getattr(module, name))
        except Exception:
            continue
    return out


@dataclasses.dataclass
class _PreparedGlobal:
    """The checked arguments of a global prune (see :func:`_prepare_global`)."""

    parameters: list  # the (module, name) pairs
    layouts: list  # each pair's layout (see fastprune._layouts.for_prune)
    currents: list  # each pair's current tensor (``module.<name>``)
    scores: list  # each pair's importance scores
    firsts: list  # whether each pair is unpruned
    masks_or_ones: list  # each pair's mask buffer, or its tensor where unpruned (device checks)
    method: BasePruningMethod  # the pruning method, made from the kwargs
    container: PruningContainer  # a one-member container of it (the reference algorithm)
    dtype: Optional[torch.dtype]  # the scores' promoted dtype (None: no pairs)
    device: Optional[torch.device]  # the scores' device (None: no pairs)

    def masks(self):
        """Each pair's mask as a tensor of its shape, None where unpruned."""
        return [None if first else layout.mask(module, name)
                for (module, name), layout, first in zip(self.parameters, self.layouts, self.firsts)]

    def writable_masks(self):
        """Each pair's mask for a select that prunes in place
        (:meth:`fastprune._layouts.InPlace.writable_mask`), or None unless
        every pair has one."""
        masks = [layout.writable_mask(module, name) for (module, name), layout in zip(self.parameters, self.layouts)]
        return None if not masks or any(m is None for m in masks) else masks

    def live_sets(self):
        """Each pair's mask as its layout stores it, for a select that reads
        every stored format (None: unpruned in the reference's layout)."""
        return [layout.live_set(module, name, current) for (module, name), layout, current
                in zip(self.parameters, self.layouts, self.currents)]


def _prepare_global(parameters, importance_scores, pruning_method, kwargs, allow_empty=False):
    """Check the arguments of :func:`global_unstructured` as the reference does
    and gather what the masks need: each pair's layout, current tensor and
    scores, the method and its one-member container. ``allow_empty`` accepts
    no pairs (a rank of a distributed prune)."""
    if not isinstance(parameters, Iterable):
        raise TypeError("global_unstructured(): parameters is not an Iterable")
    if importance_scores is None:
        importance_scores = {}
    if not isinstance(importance_scores, dict):
        raise TypeError("global_unstructured(): importance_scores must be of type dict")
    parameters = list(parameters)

    currents, scores, buffers = [], [], []
    for module, name in parameters:
        current = getattr(module, name)
        currents.append(current)
        scores.append(importance_scores.get((module, name), current))
        buffers.append(getattr(module, name + "_mask", None))
    _check_same_device(scores)
    for (module, name), score, current in zip(parameters, scores, currents):
        if score.shape != current.shape:
            # The reference does not check: it fails later with an IndexError,
            # or silently misaligns the scores when the total size agrees.
            raise IndexError(
                f"global_unstructured(): importance_scores for parameter {name} of {module} "
                f"should have its shape {tuple(current.shape)}, got {tuple(score.shape)}")
        _backends.check_like(score, current, "importance_scores")
    masks_or_ones = [current if mask is None else mask for mask, current in zip(buffers, currents)]
    _check_same_device(masks_or_ones)
    if not parameters and not allow_empty:
        raise ValueError("torch.cat(): expected a non-empty list of Tensors")
    layouts = [_layouts.for_prune(module, name) for module, name in parameters]

    method = pruning_method(**kwargs)
    method._tensor_name = "temp"
    if method.PRUNING_TYPE != "unstructured":
        raise TypeError(
            'Only "unstructured" PRUNING_TYPE supported for the `pruning_method`. '
            f"Found method {pruning_method} of type {method.PRUNING_TYPE}")
    container = PruningContainer()
    container._tensor_name = "temp"
    container.add_pruning_method(method)
    dtype = functools.reduce(torch.promote_types, [s.dtype for s in scores]) if scores else None
    return _PreparedGlobal(parameters=parameters, layouts=layouts, currents=currents, scores=scores,
                           firsts=[b is None for b in buffers], masks_or_ones=masks_or_ones, method=method,
                           container=container, dtype=dtype, device=scores[0].device if scores else None)


def _apply_global_masks(parameters, own_masks, firsts, prune_values=None):
    """Prune each pair with its mask through :func:`custom_from_mask`; all or
    nothing: if one fails, every module is put back as it was.

    ``firsts`` says for each pair whether it was unpruned. ``prune_values``,
    when given, runs once every pair is installed: it computes the masks in
    place and prunes the values (the pairs are then held without masking
    them again)."""
    names = {}
    for module, name in parameters:
        names.setdefault(id(module), (module, []))[1].append(name)
    saved = {key: _layouts.Snapshot(module, module_names) for key, (module, module_names) in names.items()}
    done = []
    try:
        with _layouts.finished_together(masked=prune_values is not None):  # values change last
            for i, (module, name) in enumerate(parameters):
                CustomFromMask._apply_owned(module, name, own_masks[i])
                own_masks[i] = None
                _share_mask(module, name, first=firsts[i])
                done.append((module, name))
            if prune_values is not None:
                prune_values()
    except BaseException:
        # All or nothing: undo the parameters pruned before the failure.
        for key, snapshot in saved.items():
            snapshot.restore(reassigned=[name for module, name in done if id(module) == key])
        raise


def _share_mask(module, name, first):
    """After a prune by :class:`CustomFromMask` with a global prune's share,
    let the method hold the buffer itself where the layout says the buffer
    has its values (see :meth:`~fastprune._layouts.Reparametrized.shares_buffer`),
    so a second copy of the mask need not stay alive."""
    hook = next(hook for hook in module._forward_pre_hooks.values()
                if isinstance(hook, _AnyMethod) and hook._tensor_name == name)
    method = hook._pruning_methods[-1] if isinstance(hook, _AnyContainer) else hook
    buffer = getattr(module, name + "_mask")
    if type(method) is CustomFromMask and _layouts.of(module, name).shares_buffer(method.mask, buffer, first):
        method.mask = buffer


def _global_reference_masks(container, currents, scores, masks):
    """The reference algorithm (any unstructured method): one concatenated mask,
    split into one copy per parameter so that no hook keeps the whole."""
    flat_scores = torch.cat([s.detach().reshape(-1) for s in scores])
    default_mask = torch.cat([
        (torch.ones_like(current) if mask is None else mask.detach()).reshape(-1)
        for mask, current in zip(masks, currents)])
    final = container.compute_mask(flat_scores, default_mask)
    del flat_scores, default_mask
    own_masks, start = [], 0
    for current in currents:
        stop = start + current.numel()
        own = torch.empty_like(current, dtype=final.dtype)
        own_masks.append(own.copy_(final[start:stop].view(current.shape)))
        start = stop
    return own_masks


def _check_same_device(tensors):
    devices = [t.device for t in tensors]  # a None parameter fails here, as in the reference
    if any(d != devices[0] for d in devices[1:]):
        raise TypeError("Found two parameters on different devices, this is currently not supported.")


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
