"""Intensity normalisation and resampling shared by training and every backend.

One code path for numpy and cupy: the array module is taken from the input, and
nothing here reads a device value back to the host (the GPU loop never waits).
"""

from __future__ import annotations

from bmltrt.arrays import array_module, ndimage_of

# Normalised intensities: robust range [p0.5, p99.5] -> [0, 1]; brighter voxels (fluid,
# lesions) keep values up to CLIP_HIGH rather than being flattened at 1.
P_LOW, P_HIGH, CLIP_HIGH = 0.5, 99.5, 1.5


def normalize_intensity(vol):
    xp = array_module(vol)
    v = vol.astype(xp.float32, copy=False)
    lo, hi = xp.percentile(v, [P_LOW, P_HIGH])  # q on the host: cupy does not sync
    # Divide by the range (an array, not float(): no device round trip), whatever its size: an
    # absolute floor on it made a scan stored at 1e-9 scale read differently from the same at 1.
    span = hi - lo
    span = xp.where(span > 0, span, xp.ones_like(span))
    return xp.clip((v - lo) / span, 0.0, CLIP_HIGH).astype(xp.float32)


def zoom_to(vol, shape, order: int = 1):
    """Resample `vol` to exactly `shape` (grid-mode: voxel centres, edges aligned)."""
    xp = array_module(vol)
    nd = ndimage_of(xp)
    if tuple(vol.shape) == tuple(shape):
        return vol
    factors = [t / s for t, s in zip(shape, vol.shape)]
    out = nd.zoom(vol.astype(xp.float32, copy=False), factors, order=order, mode="nearest",
                  grid_mode=True, prefilter=False)
    # zoom may round a size off by one; fix it by crop/edge-pad.
    if tuple(out.shape) != tuple(shape):
        pads = [(0, max(0, t - s)) for t, s in zip(shape, out.shape)]
        out = xp.pad(out, pads, mode="edge")[tuple(slice(0, t) for t in shape)]
    return out


def inplane_shape(shape, spacing, target_mm: float) -> tuple[int, int, int]:
    """Working-grid shape when rows and columns are resampled to `target_mm` pixels."""
    return (int(shape[0]),
            max(1, int(round(shape[1] * spacing[1] / target_mm))),
            max(1, int(round(shape[2] * spacing[2] / target_mm))))


def to_segmenter_grid(vol, spacing, target_mm: float, antialias: float = 0.0):
    """`vol` with rows and columns resampled to `target_mm` pixels (slices kept).

    With `antialias` > 0 each in-plane axis that shrinks by a factor f is first smoothed by a
    Gaussian of sigma antialias * (f - 1) / 2 input pixels (1 is scikit-image's
    anti-aliasing sigma). Why: the generated training scans are drawn on this grid, where a
    pixel averages its whole area; plain linear resampling of a 0.36 mm scan to 1.6 mm keeps
    the noise and aliasing of the fine pixels (benchmarks/results/segmenter_antialias/).
    """
    shape = inplane_shape(vol.shape, spacing, target_mm)
    if antialias > 0:
        sigma = [0.0] + [antialias * max(0.0, n / m - 1) / 2 for n, m in zip(vol.shape[1:], shape[1:])]
        if max(sigma) > 0:
            xp = array_module(vol)
            vol = ndimage_of(xp).gaussian_filter(vol.astype(xp.float32, copy=False), sigma, mode="nearest")
    return zoom_to(vol, shape)


def square_pad_box(h: int, w: int, pixel_mm=None) -> tuple[tuple[int, int], tuple[int, int]]:
    """The padded (rows, columns) that hold an h x w slice in a square field, and the slice's
    offset in it. With `pixel_mm` (row, column sizes) the field is square in mm, so that the
    resized slice has square pixels whatever the scan's; without it, square in pixels."""
    if pixel_mm is None or float(pixel_mm[0]) == float(pixel_mm[1]):
        hp = wp = max(h, w)
    else:
        sy, sx = float(pixel_mm[0]), float(pixel_mm[1])
        side_mm = max(h * sy, w * sx)
        hp, wp = max(h, int(round(side_mm / sy))), max(w, int(round(side_mm / sx)))
    return (hp, wp), ((hp - h) // 2, (wp - w) // 2)


def square_grid_pixel_mm(h: int, w: int, res: int, pixel_mm) -> float:
    """Side in mm of one pixel of the res x res grid that slices_to_square(..., pixel_mm=)
    makes of an h x w slice (the larger side where the padding rounds to whole pixels)."""
    (hp, wp), _ = square_pad_box(h, w, pixel_mm)
    return max(hp * float(pixel_mm[0]), wp * float(pixel_mm[1])) / res


def slices_to_square(slices, res: int, order: int = 1, pixel_mm=None):
    """(N, H, W) -> (N, res, res): centred zero-pad to a square field (in mm with `pixel_mm`,
    else in pixels), then resize (keeps the aspect)."""
    xp = array_module(slices)
    n, h, w = slices.shape
    (hp, wp), (oy, ox) = square_pad_box(h, w, pixel_mm)
    sq = xp.zeros((n, hp, wp), xp.float32)
    sq[:, oy:oy + h, ox:ox + w] = slices
    return zoom_to(sq, (n, res, res), order=order)


def square_to_slices(sq, h: int, w: int, order: int = 1, pixel_mm=None):
    """Inverse of slices_to_square."""
    n = sq.shape[0]
    (hp, wp), (oy, ox) = square_pad_box(h, w, pixel_mm)
    full = zoom_to(sq, (n, hp, wp), order=order)
    return full[:, oy:oy + h, ox:ox + w]
