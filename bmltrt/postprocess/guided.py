"""Guided filter (He, Sun and Tang, "Guided Image Filtering", 2013), in-plane, per slice.

The femur segmenter sees 1.6 mm pixels and its probability is upsampled linearly to the
scan's grid, so the mask's border is a 1.6 mm staircase that ignores the edge the scan
shows. Filtering the probability with the scan slice as the guide makes it locally a
linear function of the scan's intensity: where a window straddles the bone's edge the
probability follows that edge; where it does not (deep in marrow, far outside) it stays
as it was. Box filters only: the same code on numpy (scipy) and cupy (cupyx), no host sync.
"""

from __future__ import annotations

import numpy as np

from bmltrt.arrays import array_module, ndimage_of


def guided_filter(guide, p, radius_px: tuple[int, int], eps: float, passes: int = 1):
    """`p` filtered in-plane (axes 1 and 2 of (S, H, W)) with `guide` as the guide image;
    windows of (2 r + 1) pixels, `eps` the regulariser in guide intensity squared (larger:
    closer to a plain box blur of p), `passes` times (each pass clipped to [0, 1]: `p` is a
    probability). float32 in and out."""
    xp = array_module(p)
    nd = ndimage_of(xp)
    size = (1, 2 * int(radius_px[0]) + 1, 2 * int(radius_px[1]) + 1)
    guide = guide.astype(xp.float32, copy=False)
    p = p.astype(xp.float32, copy=False)

    def box(v):
        return nd.uniform_filter(v, size, mode="nearest")

    mean_i = box(guide)  # the guide's window statistics serve every pass
    var_i = box(guide * guide) - mean_i * mean_i + xp.float32(eps)
    for _ in range(int(passes)):
        mean_p = box(p)
        a = (box(guide * p) - mean_i * mean_p) / var_i
        b = mean_p - a * mean_i
        p = xp.clip(box(a) * guide + box(b), 0.0, 1.0)
    return p


def guided_filter_near(guide, p, radius_px: tuple[int, int], eps: float, passes: int = 1, floor: float = 0.01):
    """guided_filter where `p` exceeds `floor` (and as far around as the passes reach);
    elsewhere `p` as it is. On numpy the work is cropped to that box (the femur fills about
    a third of a scan: ~3x faster on a CPU); on cupy the whole volume is filtered, since
    finding the box would wait for the device."""
    xp = array_module(p)
    if xp is not np:
        return guided_filter(guide, p, radius_px, eps, passes)
    hot = p > floor
    idx = [np.flatnonzero(hot.any(axis=tuple(j for j in range(3) if j != i))) for i in range(3)]
    if any(len(i) == 0 for i in idx):
        return p
    reach = (0, 2 * int(passes) * int(radius_px[0]) + 1, 2 * int(passes) * int(radius_px[1]) + 1)
    box = tuple(slice(max(0, i[0] - m), min(n, i[-1] + m + 1)) for i, m, n in zip(idx, reach, p.shape))
    out = p.astype(np.float32, copy=True)
    out[box] = guided_filter(guide[box], p[box], radius_px, eps, passes)
    return out
