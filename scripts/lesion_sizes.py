"""Which true lesions a post-processing finds, by size: per lesion (3D component) its largest
area on one slice and its volume, whether the lesion mask touches it, and how much of it lies
inside the predicted femur; counts by size class. Maps come from the evaluation's cache.

    python scripts/lesion_sizes.py OAI_PAINTED --params benchmarks/results/oai_painted_test/postprocess.json \
        --split test --cache ~/.cache/bmltrt/maps -o benchmarks/results/lesion_sizes

The opening of the paper's post-processing (1.2 mm radius here) and the minimum area remove
any island narrower than the footprint, so a lesion smaller than that on every slice cannot
be found however the difference map looks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import _painted  # scripts/ is on sys.path when run

AREA_CLASSES_MM2 = (0.0, 5.0, 10.0, 20.0, float("inf"))


def main(argv=None) -> int:
    from scipy import ndimage as ndi

    from bmltrt.evaluation.maps import MapCache, OursMethod, compute_split, default_cache_dir, mask_of

    ap = _painted.parser(__doc__, "test")
    ap.add_argument("--cache", type=Path, default=None, help="anomaly-map cache (default: the evaluation's)")
    a = ap.parse_args(argv)
    det = _painted.detector(a)
    method = OursMethod(det, "models")
    cache = MapCache(a.cache or default_cache_dir())
    maps = compute_split(a.data, a.split, [("models", det)], [method], cache)
    lesions = []
    for case in maps.cases:
        crop, truth = maps.crops[("models", case)], maps.truths[case]
        pred = crop.paste(mask_of(maps.amap(cache, method.key, case), crop, truth.pixel_mm, det.config.post),
                          truth.shape)
        femur = crop.paste(crop.femur, truth.shape)
        labels, n = ndi.label(truth.lesion, np.ones((3, 3, 3), bool))
        px_mm2 = truth.pixel_mm[0] * truth.pixel_mm[1]
        for i in range(1, n + 1):
            c = labels == i
            lesions.append({"case": case, "largest_slice_mm2": round(float(c.sum(axis=(1, 2)).max() * px_mm2), 2),
                            "volume_mm3": round(float(c.sum() * truth.voxel_mm3), 2), "found": bool((pred & c).any()),
                            "inside_predicted_femur": round(float((c & femur).sum() / c.sum()), 3)})
    classes = []
    for lo, hi in zip(AREA_CLASSES_MM2[:-1], AREA_CLASSES_MM2[1:]):
        sel = [d for d in lesions if lo <= d["largest_slice_mm2"] < hi]
        classes.append({"largest_slice_mm2": [lo, None if hi == float("inf") else hi], "lesions": len(sel),
                        "found": sum(d["found"] for d in sel)})
        print(f"largest slice {lo:g}-{hi:g} mm2: {len(sel)} lesions, {classes[-1]['found']} found")
    path = _painted.write(a, det, "lesion_sizes.py", f"lesion_sizes_{a.split}_{a.resolution}.json",
                          lesions_total=len(lesions), found_total=sum(d["found"] for d in lesions),
                          by_largest_slice_area=classes, lesions=lesions)
    print(f"{sum(d['found'] for d in lesions)} of {len(lesions)} lesions found; {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
