"""fastprune: fast pruning masks, a drop-in for ``torch.nn.utils.prune``.

``import fastprune.prune as prune`` replaces ``import torch.nn.utils.prune as
prune``; the kernels are the ops in ``torch.ops.fastprune``.
"""
import torch

from . import _C  # noqa: F401  (loads the kernels and their schemas)
from . import _meta  # noqa: F401  (fake kernels for torch.compile / opcheck)
from . import ops, prune
from .prune import *  # noqa: F401,F403

__version__ = "0.1.0"
