"""One-off check (2026-12-06): would 3D hysteresis recover the faint edge slices of a lesion?
Seeds: the shipped rule (difference > max(per-slice Otsu, floor), 1.2 mm opening, inside the
femur). Grown (26-connected) into voxels above FACTOR x that threshold, opened the same way.
Painted-OAI val at 256, from `bmltrt evaluate`'s map cache (the shipped models' maps). Run
from the repository root:

    python benchmarks/results/painter2/checks/hysteresis.py DATA --cache CACHE -o OUT
"""
import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

import bmltrt.cli  # noqa: F401  (the evaluation CLI registers itself on import)
from bmltrt.evaluation.cli import _plan
from bmltrt.evaluation.evaluate import compute_split
from bmltrt.evaluation.maps import MapCache
from bmltrt.morphology import binary_opening
from bmltrt.postprocess.lesion import disk_footprint, scoped_otsu

FACTORS = (1.0, 0.85, 0.7, 0.55)  # 1.0: the shipped rule (no growth)
FLOORS = (0.3, 0.4, 0.5)


def grown(diff, otsu, femur, pixel_mm, factor, floor):
    t = np.maximum(scoped_otsu(diff, otsu, femur, "slice"), np.float32(floor))[:, None, None]
    fp = disk_footprint(1.2, pixel_mm)
    strong = binary_opening(diff > t, fp) & femur
    if factor >= 1:
        return strong
    weak = binary_opening(diff > factor * t, fp) & femur
    labels, n = ndi.label(weak | strong, np.ones((3, 3, 3), bool))
    keep = np.bincount(labels[strong], minlength=n + 1) > 0
    keep[0] = False
    return keep[labels]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("-o", "--out", type=Path, required=True)
    a = ap.parse_args()
    plan = _plan(None, "256", "onnxruntime", "cpu", None, None, True)
    cache = MapCache(a.cache)
    maps = compute_split(a.data, a.split, [(m.label, m.first) for m in plan.model_sets], plan.methods, cache, None,
                         lambda *x: None)
    m = plan.methods[0]
    acc = {(f, fl): [0, 0, 0] for fl in FLOORS for f in FACTORS}
    for case in maps.cases:
        truth, crop = maps.truths[case], maps.crops[(m.femur_label, case)]
        amap = maps.amap(cache, m.key, case)
        for (f, fl), c in acc.items():
            pred = np.zeros(truth.shape, bool)
            if amap.score.size and crop.slices:
                pred = crop.paste(grown(amap.score, amap.otsu, crop.femur.astype(bool), truth.pixel_mm, f, fl),
                                  truth.shape)
            c[0] += int((pred & truth.lesion).sum())
            c[1] += int(pred.sum())
            c[2] += int(truth.lesion.sum())
    rows = [{"factor": f, "floor": fl, "dice": 2 * tp / max(1, p + t), "tp": tp, "pred": p, "true": t}
            for (f, fl), (tp, p, t) in acc.items()]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "hysteresis_val.json").write_text(json.dumps(
        {"data": str(a.data), "split": a.split, "resolution": 256, "method": m.key, "date": dt.date.today().isoformat(),
         "machine": "AMD EPYC, 2 cores", "backend": "onnxruntime cpu fp32",
         "command": "python benchmarks/results/painter2/checks/hysteresis.py " + " ".join(sys.argv[1:]), "rows": rows},
        indent=1))
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
