"""Choose each method's post-processing on the validation split only.

The objective is the pooled whole-volume lesion Dice (all validation cases' voxels
counted together). The search runs on the cached anomaly maps (bmltrt.evaluation.maps):
the networks never run again. For every threshold setting (floor x Otsu scope), opening
and closing, `mask_from_anomaly` — detect's own last step — makes the mask once; the
minimum-area choices are then read off its in-plane components.

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

from bmltrt.evaluation.maps import MapCache, SplitMaps, mask_of
from bmltrt.postprocess import PostConfig
from bmltrt.postprocess.lesion import scoped_otsu

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


def grid_counts(maps: SplitMaps, cache: MapCache, method_key: str, models: str, space: SearchSpace,
                floors: list[float], progress=None) -> tuple[dict, int]:
    """{(floor, scope, opening, closing, min_area): [tp, predicted voxels]} pooled over
    the split's cases, and the number of true lesion voxels."""
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
            done: dict[tuple, dict] = {}  # same thresholds on every slice -> same masks
            for scope, floor in itertools.product(space.scopes, floors):
                t = np.maximum(scoped_otsu(amap.score, amap.otsu, crop.femur, scope), np.float32(floor))
                tkey = t.tobytes()
                if tkey not in done:
                    res = {}
                    for op, cl in itertools.product(space.openings, space.closings):
                        cfg = PostConfig(floor=float(floor), otsu_scope=scope, opening_mm=op, closing_mm=cl,
                                         min_area_mm2=0.0)
                        sizes, tps = component_counts(mask_of(amap, crop, px, cfg), lesion)
                        for ma in space.min_areas:
                            keep = sizes >= max(1, _min_pixels(ma, px))
                            res[(op, cl, ma)] = (int(tps[keep].sum()), int(sizes[keep].sum()))
                    done[tkey] = res
                for (op, cl, ma), v in done[tkey].items():
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
    floors = resolve_floors(space, maps, cache, method.key, method.models)
    counts, n_truth = grid_counts(maps, cache, method.key, method.models, space, floors, progress)
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
