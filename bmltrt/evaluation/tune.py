"""Choose each method's post-processing on the validation split only.

The objective is the pooled whole-volume lesion Dice (all validation cases' voxels
counted together). The search runs on the cached anomaly maps (bmltrt.evaluation.maps):
the networks never run again. Opening and closing are done once per footprint pair in
grey-scale (they commute with thresholding), every floor and Otsu scope is then one
threshold, and the minimum-area choices are read off that mask's in-plane components.
The counts equal those of `mask_from_anomaly`, detect's own last step (tested); the
chosen parameters are then scored with `mask_from_anomaly` itself.

Search spaces (per method; `quick` is a smaller one for trials):
- ours and the autoencoder (both max(HE(x) - HE(reconstruction), 0)): floor 0.1-0.7 and
  Otsu per slice over the femur (the paper), one Otsu over the whole femur, or the floor
  alone;
- intensity (HE of the scan in the femur): a fixed threshold, 0.80-0.99;
- MKD (gradient maps, no natural scale): thresholds at quantiles of the validation femur
  scores.
Opening 0 / 0.8 / 1.2 mm, closing 0 / 1.2 / 2.0 mm, minimum area 0 / 4 / 10 mm^2 for all.
Ties go to the earlier grid point (smaller floor, per-slice Otsu first, lighter morphology).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy import ndimage as ndi

from bmltrt.evaluation.maps import MAX_CLOSING_MM, MapCache, SplitMaps
from bmltrt.postprocess import PostConfig
from bmltrt.postprocess.lesion import disk_footprint, scoped_otsu

_INPLANE8 = np.zeros((3, 3, 3), bool)
_INPLANE8[1] = True


@dataclass(frozen=True)
class SearchSpace:
    floors: tuple[float, ...]
    scopes: tuple[str, ...] = ("slice", "volume", "none")
    openings: tuple[float, ...] = (0.0, 0.8, 1.2)
    closings: tuple[float, ...] = (0.0, 1.2, 2.0)
    min_areas: tuple[float, ...] = (0.0, 4.0, 10.0)
    quantile_floors: bool = False  # floors are quantiles of the validation femur scores

    @property
    def size(self) -> int:
        return (len(self.floors) * len(self.scopes) * len(self.openings) * len(self.closings)
                * len(self.min_areas))

    def to_dict(self) -> dict:
        return asdict(self)


_HE_FLOORS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
SPACES = {
    "full": {
        "ours": SearchSpace(_HE_FLOORS),
        "autoencoder": SearchSpace(_HE_FLOORS),
        "intensity": SearchSpace((0.80, 0.85, 0.90, 0.93, 0.95, 0.97, 0.98, 0.99), ("none",)),
        "mkd": SearchSpace((0.90, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999), ("none", "slice"), quantile_floors=True),
    },
    "quick": {
        "ours": SearchSpace((0.2, 0.35, 0.5, 0.65), ("slice", "none"), (0.0, 1.2), (0.0, 1.2), (0.0, 4.0)),
        "autoencoder": SearchSpace((0.2, 0.35, 0.5, 0.65), ("slice", "none"), (0.0, 1.2), (0.0, 1.2), (0.0, 4.0)),
        "intensity": SearchSpace((0.85, 0.9, 0.95, 0.98), ("none",), (0.0, 1.2), (0.0, 1.2), (0.0, 4.0)),
        "mkd": SearchSpace((0.95, 0.99, 0.995, 0.999), ("none",), (0.0, 1.2), (0.0, 1.2), (0.0, 4.0),
                           quantile_floors=True),
    },
}


def component_counts(mask: np.ndarray, lesion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sizes, true-positive voxels) of every in-plane 8-connected component of `mask`
    (the components `remove_small_islands` weighs)."""
    labels, n = ndi.label(mask, structure=_INPLANE8)
    flat = labels.ravel()
    sizes = np.bincount(flat, minlength=n + 1)[1:]
    tps = np.bincount(flat, weights=lesion.ravel().astype(np.float64), minlength=n + 1)[1:]
    return sizes, tps.astype(np.int64)


def _min_pixels(min_area_mm2: float, pixel_mm) -> int:
    return int(round(min_area_mm2 / (pixel_mm[0] * pixel_mm[1])))


def resolve_floors(space: SearchSpace, maps: SplitMaps, cache: MapCache, method_key: str, models: str) -> list[float]:
    """Absolute floors: as given, or the asked quantiles of the validation femur scores."""
    if not space.quantile_floors:
        return list(space.floors)
    vals = []
    for case in maps.cases:
        crop = maps.crops[(models, case)]
        if crop.slices:
            a = maps.amap(cache, method_key, case)
            v = a.score[crop.femur]
            vals.append(v[:: max(1, v.size // 200_000)])
    pool = np.concatenate(vals) if vals else np.zeros(1, np.float32)
    return [float(np.quantile(pool, q)) for q in space.floors]


def open_close(score: np.ndarray, opening_mm: float, closing_mm: float, pixel_mm) -> np.ndarray:
    """Grey-scale opening then closing of the anomaly map with post-processing's footprints.

    Flat footprints commute with thresholding: (open_close(d) > t) is exactly the binary
    opening and closing of (d > t) for every t >= 0 (outside the array counts as 0, as
    the binary operations' border does), so one grey-scale pass serves every floor and
    Otsu scope, and only the thresholding is repeated.
    """
    g = score
    fp = disk_footprint(opening_mm, pixel_mm)
    if fp is not None:
        g = ndi.grey_erosion(g, footprint=fp, mode="constant", cval=0.0)
        g = ndi.grey_dilation(g, footprint=fp, mode="constant", cval=0.0)
    fp = disk_footprint(closing_mm, pixel_mm)
    if fp is not None:  # padded like the binary closing, then cropped
        py, px = fp.shape[1] // 2, fp.shape[2] // 2
        padded = np.pad(g, ((0, 0), (py, py), (px, px)))
        padded = ndi.grey_dilation(padded, footprint=fp, mode="constant", cval=0.0)
        padded = ndi.grey_erosion(padded, footprint=fp, mode="constant", cval=0.0)
        g = padded[:, py:py + g.shape[1], px:px + g.shape[2]]
    return g


def _counts_by_min_area(mask: np.ndarray, lesion: np.ndarray, min_areas, pixel_mm) -> dict:
    """{min_area: (tp, predicted voxels)} after dropping smaller in-plane islands."""
    if not mask.any():
        return {ma: (0, 0) for ma in min_areas}
    # Components never cross slices, so only the mask's bounding box needs labelling.
    s = np.flatnonzero(mask.any(axis=(1, 2)))
    y = np.flatnonzero(mask.any(axis=(0, 2)))
    x = np.flatnonzero(mask.any(axis=(0, 1)))
    box = (slice(s[0], s[-1] + 1), slice(y[0], y[-1] + 1), slice(x[0], x[-1] + 1))
    sizes, tps = component_counts(mask[box], lesion[box])
    out = {}
    for ma in min_areas:
        keep = sizes >= max(1, _min_pixels(ma, pixel_mm))
        out[ma] = (int(tps[keep].sum()), int(sizes[keep].sum()))
    return out


def grid_counts(maps: SplitMaps, cache: MapCache, method_key: str, models: str, space: SearchSpace,
                floors: list[float], progress=None) -> tuple[dict, int]:
    """{(floor, scope, opening, closing, min_area): [tp, predicted voxels]} pooled over
    the split's cases, and the number of true lesion voxels."""
    if min(floors) < 0:
        raise ValueError("floors must be >= 0")
    counts: dict[tuple, list[int]] = {}
    n_truth = 0
    for k, case in enumerate(maps.cases):
        if progress:
            progress(k, len(maps.cases), case)
        truth = maps.truths[case]
        n_truth += int(truth.lesion.sum())
        crop = maps.crops[(models, case)]
        per_case: dict[tuple, tuple[int, int]] = {}
        if crop.slices:
            amap = maps.amap(cache, method_key, case)
            lesion = crop.crop(truth.lesion)
            px = truth.pixel_mm
            thresholds = {}
            for scope in space.scopes:
                base = np.asarray(scoped_otsu(amap.score, amap.otsu, crop.femur, scope), np.float32)
                for floor in floors:
                    thresholds[(floor, scope)] = np.maximum(base, np.float32(floor))
            for op, cl in itertools.product(space.openings, space.closings):
                if cl > MAX_CLOSING_MM:
                    raise ValueError(f"closing {cl} mm is larger than the crop margin ({MAX_CLOSING_MM} mm)")
                g = open_close(amap.score, op, cl, px)
                done: dict[bytes, dict] = {}  # the same thresholds on every slice: the same mask
                for (floor, scope), t in thresholds.items():
                    tkey = t.tobytes()
                    if tkey not in done:
                        done[tkey] = _counts_by_min_area((g > t[:, None, None]) & crop.femur, lesion,
                                                         space.min_areas, px)
                    for ma, v in done[tkey].items():
                        per_case[(floor, scope, op, cl, ma)] = v
        for key in itertools.product(floors, space.scopes, space.openings, space.closings, space.min_areas):
            tp, pred = per_case.get(key, (0, 0))
            c = counts.setdefault(key, [0, 0])
            c[0] += tp
            c[1] += pred
    if progress:
        progress(len(maps.cases), len(maps.cases), "done")
    return counts, n_truth


def pooled_dice(tp: int, pred: int, n_truth: int) -> float:
    return 1.0 if pred + n_truth == 0 else 2.0 * tp / (pred + n_truth)


def tune_method(maps: SplitMaps, cache: MapCache, method, space: SearchSpace, progress=None) -> dict:
    """Best parameters of one method on `maps` (a validation split), and the top of the grid."""
    floors = resolve_floors(space, maps, cache, method.key, method.femur_label)
    counts, n_truth = grid_counts(maps, cache, method.key, method.femur_label, space, floors, progress)
    order = {k: i for i, k in enumerate(counts)}
    ranked = sorted(counts.items(), key=lambda kv: (-pooled_dice(kv[1][0], kv[1][1], n_truth), order[kv[0]]))

    def cfg_of(key) -> PostConfig:
        floor, scope, op, cl, ma = key
        return replace(PostConfig(), floor=round(float(floor), 6), otsu_scope=scope, opening_mm=op,
                       closing_mm=cl, min_area_mm2=ma)

    top = [{"dice": pooled_dice(tp, pred, n_truth), **_short(cfg_of(k))} for k, (tp, pred) in ranked[:10]]
    best_key, (tp, pred) = ranked[0]
    default = method.default_params()
    dkey = (default.floor, default.otsu_scope, default.opening_mm, default.closing_mm, default.min_area_mm2)
    return {"method": method.key, "split": maps.split, "cases": len(maps.cases), "true_voxels": n_truth,
            "objective": "pooled whole-volume Dice", "space": space.to_dict(), "floors": floors,
            "grid_points": len(counts), "best": cfg_of(best_key).to_dict(),
            "dice": pooled_dice(tp, pred, n_truth),
            "default": _short(default), "default_dice": (pooled_dice(*counts[dkey], n_truth) if dkey in counts else None),
            "top": top}


def _short(cfg: PostConfig) -> dict:
    d = cfg.to_dict()
    d.pop("nbins", None)
    return d
