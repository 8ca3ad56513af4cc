"""numpy or cupy: one code path for both. Functions take arrays and find their module."""

from __future__ import annotations

from types import ModuleType

import numpy as np


def array_module(a) -> ModuleType:
    """numpy for numpy arrays, cupy for cupy arrays (without importing cupy otherwise)."""
    mod = type(a).__module__
    if mod.startswith("cupy"):
        import cupy

        return cupy
    return np


def ndimage_of(xp: ModuleType) -> ModuleType:
    if xp is np:
        from scipy import ndimage

        return ndimage
    from cupyx.scipy import ndimage

    return ndimage


def to_numpy(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)
