"""The paper's post-processing as one code path over numpy or cupy.

All functions work on stacks of slices (N, H, W) at once (batched histograms via
bincount, morphology with in-plane footprints), in float32, with no host round trip
and no device synchronisation (bmltrt.morphology): the array module is taken from the
input, so the same lines run on the GPU.

x' = HE(x), x~' = HE(x~)         histogram equalisation per slice
d  = max(x' - x~', 0)            lesions are brighter than the healthy marrow painted in
t  = max(Otsu(d | femur), floor) per slice, over the femur region only (otsu_scope
                                 "slice"; "volume": one Otsu over the femur of every
                                 slice; "none": the floor alone)
mask = close(open(d > t))        footprints in millimetres; small islands removed
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

import numpy as np

from bmltrt.arrays import array_module
from bmltrt.morphology import bincount_fixed, binary_closing, binary_opening, remove_small_islands  # noqa: F401


OTSU_SCOPES = ("slice", "volume", "none")
MAX_FOOTPRINT_MM = 20.0  # opening and closing radii (the CLI's range too)
MAX_MIN_AREA_MM2 = 10_000.0


@dataclass
class PostConfig:
    nbins: int = 256
    # Floor on the difference (HE units, 0..1): Otsu always splits something, so a
    # healthy slice would get "lesions" without it. Chosen on the phantom validation split.
    floor: float = 0.5
    opening_mm: float = 1.2  # removes specks thinner than ~2.4 mm
    closing_mm: float = 1.2  # fills holes narrower than ~2.4 mm
    min_area_mm2: float = 4.0  # per-slice islands smaller than this are dropped
    otsu_scope: str = "slice"  # where Otsu's threshold is taken: slice, volume or none

    def __post_init__(self):
        # A file can hold anything (a hand-edited postprocess.json): a NaN floor or a
        # negative footprint would quietly find nothing, so every field is checked here.
        if self.otsu_scope not in OTSU_SCOPES:
            raise ValueError(f"otsu_scope {self.otsu_scope!r} is not one of {', '.join(OTSU_SCOPES)}")
        if isinstance(self.nbins, bool) or not isinstance(self.nbins, numbers.Integral) or not 2 <= self.nbins <= 65536:
            raise ValueError(f"nbins {self.nbins!r} is not a whole number from 2 to 65536")
        for name, hi in (("floor", None), ("opening_mm", MAX_FOOTPRINT_MM), ("closing_mm", MAX_FOOTPRINT_MM),
                         ("min_area_mm2", MAX_MIN_AREA_MM2)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0 \
                    or (hi is not None and v > hi):
                raise ValueError(f"{name} {v!r} is not a number " + (f"from 0 to {hi:g}" if hi else "of 0 or more"))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PostConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def equalize_hist(stack, nbins: int = 256, mask=None):
    """Per-slice histogram equalisation of (N, H, W) -> float32 in [0, 1].

    Like skimage.exposure.equalize_hist (CDF of a `nbins` histogram over each slice's
    range, looked up per pixel), but float32 and batched. `mask` limits the pixels that
    build the histogram.
    """
    xp = array_module(stack)
    n = stack.shape[0]
    flat = stack.reshape(n, -1).astype(xp.float32, copy=False)
    lo = flat.min(axis=1, keepdims=True)
    hi = flat.max(axis=1, keepdims=True)
    scale = nbins / xp.maximum(hi - lo, 1e-12)
    bins = xp.clip(((flat - lo) * scale).astype(xp.int32), 0, nbins - 1)
    offset = (xp.arange(n, dtype=xp.int32) * nbins)[:, None]
    idx = bins + offset
    if mask is not None:  # pixels outside the mask go to one extra bin, dropped
        idx = xp.where(mask.reshape(n, -1).astype(bool), idx, n * nbins)
    hist = bincount_fixed(idx, n * nbins + 1)[:n * nbins].reshape(n, nbins).astype(xp.float32)
    cdf = xp.cumsum(hist, axis=1)
    cdf /= xp.maximum(cdf[:, -1:], 1e-12)
    out = xp.take_along_axis(cdf, bins, axis=1)
    return out.reshape(stack.shape).astype(xp.float32)


def otsu_thresholds(values, region, nbins: int = 256):
    """Otsu's threshold per slice of `values` (N, H, W), from the pixels in `region`.

    Returns (N,) thresholds; a slice without region pixels or without spread gets +inf
    (nothing passes). Pixels strictly above the threshold are foreground.
    """
    xp = array_module(values)
    n = values.shape[0]
    v = values.reshape(n, -1).astype(xp.float32, copy=False)
    r = region.reshape(n, -1).astype(bool)
    big = xp.float32(3.0e38)
    has = r.any(axis=1, keepdims=True)
    lo = xp.where(has, xp.where(r, v, big).min(axis=1, keepdims=True), 0.0)
    hi = xp.where(has, xp.where(r, v, -big).max(axis=1, keepdims=True), 1.0)
    width = xp.maximum(hi - lo, 1e-12)
    bins = xp.clip(((v - lo) / width * nbins).astype(xp.int32), 0, nbins - 1)
    offset = (xp.arange(n, dtype=xp.int32) * nbins)[:, None]
    idx = xp.where(r, bins + offset, n * nbins)  # pixels outside the region: an extra bin, dropped
    hist = bincount_fixed(idx, n * nbins + 1)[:n * nbins].reshape(n, nbins).astype(xp.float64)
    centers = lo + (xp.arange(nbins, dtype=xp.float32)[None, :] + 0.5) * width / nbins
    w0 = xp.cumsum(hist, axis=1)
    w1 = w0[:, -1:] - w0
    m0 = xp.cumsum(hist * centers, axis=1)
    m1 = m0[:, -1:] - m0
    mu0 = m0 / xp.maximum(w0, 1e-12)
    mu1 = m1 / xp.maximum(w1, 1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2
    idx = xp.argmax(between, axis=1)
    t = xp.take_along_axis(centers, idx[:, None], axis=1)[:, 0]
    ok = (r.sum(axis=1) > 1) & ((hi - lo)[:, 0] > 1e-6)
    return xp.where(ok, t, xp.float32(xp.inf)).astype(xp.float32)


def disk_footprint(radius_mm: float, pixel_mm: tuple[float, float]):
    """In-plane elliptical footprint (1, h, w) of the given radius in mm, or None.

    A host (numpy) array: its offsets are known without asking the device."""
    ry, rx = radius_mm / pixel_mm[0], radius_mm / pixel_mm[1]
    if max(ry, rx) < 0.5:
        return None
    ny, nx = int(ry), int(rx)
    yy = np.arange(-ny, ny + 1, dtype=np.float32)[:, None]
    xx = np.arange(-nx, nx + 1, dtype=np.float32)[None, :]
    fp = (yy / max(ry, 1e-6)) ** 2 + (xx / max(rx, 1e-6)) ** 2 <= 1.0
    return fp[None]


def lesion_mask(x, x_tilde, femur, pixel_mm: tuple[float, float], cfg: PostConfig | None = None,
                return_maps: bool = False):
    """Lesion mask (N, H, W) bool from slices `x`, their inpainted `x_tilde` and `femur`.

    x and x_tilde are normalised intensities on the same grid; `pixel_mm` is the
    in-plane pixel size (rows, cols). Otsu runs per slice over the femur region: outside
    it the difference is zero by construction (the composite keeps those pixels), and
    counting those zeros would make Otsu split "femur vs rest" instead of
    "lesion vs healthy marrow".
    """
    cfg = cfg or PostConfig()
    diff, otsu = anomaly_map(x, x_tilde, femur, cfg.nbins)
    mask = mask_from_anomaly(diff, otsu, femur, pixel_mm, cfg)
    if return_maps:
        return mask, {"diff": diff, "otsu": otsu}
    return mask


def anomaly_map(x, x_tilde, femur, nbins: int = 256):
    """max(HE(x) - HE(x~), 0) inside the femur, and its per-slice Otsu threshold."""
    xp = array_module(x)
    femur = femur.astype(bool)
    diff = xp.maximum(equalize_hist(x, nbins) - equalize_hist(x_tilde, nbins), 0.0) * femur
    return diff, otsu_thresholds(diff, femur, nbins)


def scoped_otsu(diff, otsu, femur, scope: str, nbins: int = 256):
    """Per-slice thresholds for `scope`: the per-slice Otsu (`otsu`), one Otsu over the
    femur of all slices, or none (-inf: the floor alone decides)."""
    xp = array_module(diff)
    if scope == "slice":
        return otsu
    if scope == "volume":
        t = otsu_thresholds(diff.reshape(1, -1), femur.reshape(1, -1), nbins)
        return xp.broadcast_to(t, otsu.shape)
    return xp.full(otsu.shape, -xp.inf, xp.float32)


def mask_from_anomaly(diff, otsu, femur, pixel_mm, cfg: PostConfig):
    """Threshold max(Otsu, floor), opening, closing, small islands out, inside the femur."""
    xp = array_module(diff)
    femur = femur.astype(bool)
    t = xp.maximum(scoped_otsu(diff, otsu, femur, cfg.otsu_scope, cfg.nbins), xp.float32(cfg.floor))
    mask = diff > t[:, None, None]
    fp = disk_footprint(cfg.opening_mm, pixel_mm)
    if fp is not None:
        mask = binary_opening(mask, fp)
    fp = disk_footprint(cfg.closing_mm, pixel_mm)
    if fp is not None:
        # Pad so the closing does not erode at the array border, then crop.
        p = (fp.shape[1] // 2, fp.shape[2] // 2)
        padded = xp.pad(mask, ((0, 0), (p[0], p[0]), (p[1], p[1])))
        mask = binary_closing(padded, fp)[:, p[0]:p[0] + mask.shape[1], p[1]:p[1] + mask.shape[2]]
    min_px = int(round(cfg.min_area_mm2 / (pixel_mm[0] * pixel_mm[1])))
    return remove_small_islands(mask & femur, min_px)
