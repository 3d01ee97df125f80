"""shortcut_ext: fused kernels and tools for training and analysing very deep residual networks.

See README.md; the science is "Demystifying ResNet" (Li, Jiao, Han, Weissman, arXiv:1611.01186).
"""
from __future__ import annotations

from ._build import NotBuiltError, build_info, is_built
from .models import PlainNet, ShortcutNet
from .ops import cache_stats, cuda_tf32, empty_cache, residual_stack, residual_stack_hvp
from .reference import ACTIVATIONS, LOSSES

__all__ = [
    "ACTIVATIONS",
    "LOSSES",
    "NotBuiltError",
    "PlainNet",
    "ShortcutNet",
    "build_info",
    "cache_stats",
    "cuda_tf32",
    "empty_cache",
    "is_built",
    "residual_stack",
    "residual_stack_hvp",
]
__version__ = "0.1.0"
