"""torch's extension autoload hook for fastprune (entry point group
``torch.backends``): ``import torch`` calls :func:`autoload` in every process
of an environment where fastprune is installed. With ``FASTPRUNE_PATCH=1`` it
imports fastprune, which patches ``torch.nn.utils.prune``, so that processes
that never import fastprune themselves (workers of ``torch.multiprocessing``
or ``torchrun``, scripts run by a launcher) are patched too. Otherwise it
does nothing, and this module stays outside the ``fastprune`` package so
that nothing of fastprune is loaded."""
import os


def autoload():
    """Import fastprune (and so patch) when ``FASTPRUNE_PATCH=1``."""
    if os.environ.get("FASTPRUNE_PATCH", "") == "1":
        import fastprune  # noqa: F401  (patches at import)
