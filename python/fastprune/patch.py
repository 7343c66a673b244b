"""Make ``torch.nn.utils.prune`` itself compute with fastprune.

:func:`patch` is for code that cannot change its import (frameworks that
prune through ``torch.nn.utils.prune``, unmodified scripts); :func:`unpatch`
puts back every object it replaced; :func:`patched` is both, as a context.
``python -m fastprune`` and ``FASTPRUNE_PATCH=1`` call :func:`patch` for you.

What the patch replaces (docs/behaviour.md §Patch says why):

* the module's functions and helpers (``l1_unstructured``,
  ``global_unstructured``, ``remove``, ``_compute_nparams_toprune``, ...):
  ``torch.nn.utils.prune.<name>`` becomes ``fastprune.prune.<name>``;
* ``torch.nn.utils.prune.BasePruningMethod.apply``: fastprune's, so that
  ``Cls.apply`` of torch's classes and of users' subclasses prunes as
  fastprune does;
* the ``__init__`` of torch's concrete classes: constructing exactly
  ``torch.nn.utils.prune.L1Unstructured`` (and the others) gives an instance
  of its fastprune twin, which derives from it.

torch's class objects stay in the module, unchanged apart from those methods,
so ``isinstance`` against them holds for hooks made before, during and after
the patch, pickles of either library's hooks name classes that exist, and
``compute_mask`` of torch's classes is never replaced (fastprune would take a
replaced one for a user's override and fall back to it).

The names :func:`patch` and :func:`unpatch` live on the package
(``fastprune.patch()``); this module is ``sys.modules["fastprune.patch"]``.
"""
import contextlib
import functools

from torch.nn.utils import prune as _torch_prune

from . import prune as _fast

# The module's functions: the public ones and the helpers its tests and
# users call (fastprune's own additions, which torch lacks, are left out).
_FUNCTIONS = tuple(name for name in _fast.__all__
                   if not isinstance(getattr(_fast, name), type) and hasattr(_torch_prune, name)) + (
    "_validate_pruning_amount_init", "_validate_pruning_amount", "_compute_nparams_toprune",
    "_validate_structured_pruning", "_validate_pruning_dim", "_compute_norm")

# torch's concrete classes and the fastprune class that an instance becomes.
_TWINS = {getattr(_torch_prune, name): getattr(_fast, name)
          for name in _fast.__all__
          if isinstance(getattr(_torch_prune, name, None), type) and name != "BasePruningMethod"}

_MISSING = object()

# While patched: [(owner, name, what owner's __dict__ held before, or _MISSING)].
_saved = None


def _constructing(torch_cls, fast_cls):
    """An ``__init__`` for ``torch_cls`` that turns a new instance of exactly
    ``torch_cls`` into one of ``fast_cls`` (a subclass with the same layout)
    and initializes it as such; subclasses of ``torch_cls`` (fastprune's own,
    users') initialize as before."""
    original = vars(torch_cls).get("__init__")

    def __init__(self, *args, **kwargs):
        if type(self) is torch_cls:
            self.__class__ = fast_cls
            fast_cls.__init__(self, *args, **kwargs)
        elif original is not None:
            original(self, *args, **kwargs)
        elif args or kwargs:  # object.__init__ would blame itself
            raise TypeError(f"{torch_cls.__name__}() takes no arguments")
        else:
            super(torch_cls, self).__init__()

    if original is not None:
        functools.update_wrapper(__init__, original)
    return __init__


def _replacements():
    """``[(owner, name, new value)]``: everything :func:`patch` assigns."""
    out = [(_torch_prune, name, getattr(_fast, name)) for name in _FUNCTIONS]
    out.append((_torch_prune.BasePruningMethod, "apply", vars(_fast.BasePruningMethod)["apply"]))
    out += [(torch_cls, "__init__", _constructing(torch_cls, fast_cls)) for torch_cls, fast_cls in _TWINS.items()]
    return out


def _put_back(saved):
    for owner, name, old in reversed(saved):
        if old is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, old)


def patch():
    """Make ``torch.nn.utils.prune`` compute with fastprune, until :func:`unpatch`.

    Code that imported the module before (``import torch.nn.utils.prune as
    prune``) sees the change too: the module's attributes are replaced in
    place. A name taken with ``from torch.nn.utils.prune import name`` before
    the patch keeps torch's object: classes and the per-tensor functions then
    still prune with fastprune (they go through the patched classes), but such
    an early ``global_unstructured`` runs torch's algorithm (with fastprune's
    methods inside). Calling it again while patched does nothing.
    """
    global _saved
    if _saved is not None:
        return
    saved = []
    try:
        for owner, name, new in _replacements():
            old = vars(owner).get(name, _MISSING)
            setattr(owner, name, new)
            saved.append((owner, name, old))
    except BaseException:
        _put_back(saved)
        raise
    _saved = saved


def unpatch():
    """Put back every object :func:`patch` replaced (the same objects).

    Hooks and methods made while patched stay fastprune's and keep working.
    Does nothing when not patched.
    """
    global _saved
    if _saved is None:
        return
    saved, _saved = _saved, None
    _put_back(saved)


def is_patched():
    """Whether ``torch.nn.utils.prune`` currently computes with fastprune.

    Returns:
        bool: True between :func:`patch` and :func:`unpatch`.
    """
    return _saved is not None


@contextlib.contextmanager
def patched():
    """Context manager: patched inside the block, as before after it.

    Nests: only the outermost block that did the patching undoes it, also
    when the block raises. Inside an explicit :func:`patch`, it leaves the
    patch on.
    """
    outermost = not is_patched()
    patch()
    try:
        yield
    finally:
        if outermost:
            unpatch()
