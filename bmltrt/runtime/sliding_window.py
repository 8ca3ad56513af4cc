"""3D sliding-window inference with Gaussian blending and batched patches (numpy/cupy).

Every backend runs the segmenter through this, so patch placement and blending are the
same on ONNX Runtime, TensorRT and torch.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from bmltrt.arrays import array_module


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    if size <= patch:
        return [0]
    step = max(1, int(round(patch * (1 - overlap))))
    n = int(np.ceil((size - patch) / step)) + 1
    # Spread the windows evenly so the last one ends at the border.
    return [int(round(i * (size - patch) / (n - 1))) for i in range(n)]


def gaussian_importance(patch, xp=np, sigma_scale: float = 0.125):
    grids = xp.meshgrid(*[xp.arange(p, dtype=xp.float32) - (p - 1) / 2 for p in patch], indexing="ij")
    g = xp.ones(patch, xp.float32)
    for ax, p in zip(grids, patch):
        s = max(p * sigma_scale, 1e-3)
        g *= xp.exp(-0.5 * (ax / s) ** 2)
    g /= g.max()
    return xp.maximum(g, 1e-3).astype(xp.float32)  # never zero: every voxel gets a weight


def sliding_window(vol, patch: tuple[int, int, int], predict: Callable, batch_size: int = 2,
                   overlap: float = 0.4, n_classes: int = 2, on_patch: Callable | None = None):
    """Softmax probabilities (n_classes, *vol.shape) of `predict` over overlapping patches.

    `predict` maps a (B, 1, *patch) float32 batch to (B, n_classes, *patch) logits.
    """
    xp = array_module(vol)
    shape = vol.shape
    pads = [(0, max(0, p - s)) for p, s in zip(patch, shape)]
    v = xp.pad(vol, pads, mode="constant") if any(b for _, b in pads) else vol
    full = v.shape
    starts = [window_starts(s, p, overlap) for s, p in zip(full, patch)]
    corners = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
    imp = gaussian_importance(patch, xp)
    acc = xp.zeros((n_classes,) + tuple(full), xp.float32)
    wsum = xp.zeros(tuple(full), xp.float32)
    for i in range(0, len(corners), batch_size):
        chunk = corners[i:i + batch_size]
        batch = xp.stack([v[a:a + patch[0], b:b + patch[1], c:c + patch[2]] for a, b, c in chunk])[:, None]
        logits = predict(xp.ascontiguousarray(batch.astype(xp.float32)))
        logits = logits - logits.max(axis=1, keepdims=True)
        e = xp.exp(logits)
        prob = e / e.sum(axis=1, keepdims=True)
        for (a, b, c), p in zip(chunk, prob):
            sl = (slice(a, a + patch[0]), slice(b, b + patch[1]), slice(c, c + patch[2]))
            acc[(slice(None),) + sl] += p * imp
            wsum[sl] += imp
        if on_patch:
            on_patch(i + len(chunk), len(corners))  # patches done so far, of all
    out = acc / wsum
    return out[(slice(None),) + tuple(slice(0, s) for s in shape)]
