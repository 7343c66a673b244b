"""The pruning method classes of :mod:`fastprune.prune`, each holding its
own routing to the kernels.

Every class derives from its namesake in ``torch.nn.utils.prune`` and is the
forward pre-hook of the tensor it prunes. :meth:`BasePruningMethod.apply`
asks the storage layout (:mod:`fastprune._layouts`) once and lets it install,
store and publish; a class's ``_kernel`` (:mod:`fastprune._kernel_paths`)
says how the kernels serve it, and :func:`_kernel_path` is the one answer to
"may the kernel serve this method object?" (our exact class, its
``compute_mask`` not replaced: anything else takes the reference's
algorithm, as :func:`_honours_torch_replacement` arranges).
"""
import copy
import functools
import numbers
import weakref
from abc import abstractmethod

import torch
from torch.nn.utils import prune as _torch_prune

from . import _backends, _kernel_paths, _layouts, ops
from ._twins import (_check_count, _checked_count, _compute_nparams_toprune, _validate_int,
                     _validate_pruning_amount, _validate_pruning_amount_init, _validate_pruning_dim)

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
            # A method that ignores the region (Identity) or covers it all
            # ("global") runs on the whole tensor; the backend refuses others.
            if method.PRUNING_TYPE == "global" or _is_plain(method, (Identity,)):
                return method.compute_mask(t, default_mask=mask).to(dtype=t.dtype)
            raise backend.unsupported_container_step(method, t)

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
