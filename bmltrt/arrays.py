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


def masked_percentile(values, mask, q: float):
    """The q-th percentile (nearest rank below) of `values` where `mask` is true, as a 0-d
    array that never leaves the device (no host read, so the GPU loop does not wait);
    +inf where the mask is empty."""
    xp = array_module(values)
    ranked = xp.sort(xp.where(mask, values, xp.inf).ravel())
    n = mask.sum()
    rank = xp.maximum(xp.floor((n - 1) * (q / 100.0)), 0).astype(xp.int64)
    return ranked[rank]
