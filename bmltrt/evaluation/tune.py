"""Choose the post-processing parameters on the validation split (pooled lesion Dice).

    python -m bmltrt.tune DATASET [--split val] [--resolution 256]

The networks run once per case; the grid over floor, opening, closing and minimum area
re-runs only the post-processing.
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np

from bmltrt.io import load_scan
from bmltrt.metrics import Counts, confusion, scores
from bmltrt.postprocess import PostConfig
from bmltrt.postprocess.lesion import anomaly_map, mask_from_anomaly
from bmltrt.runtime.preprocess import normalize_intensity
from bmltrt.synth.dataset import case_paths

GRID = {"floor": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "opening_mm": [0.0, 0.8, 1.2],
        "closing_mm": [0.0, 1.2, 2.0], "min_area_mm2": [0.0, 4.0, 10.0]}


def cache_cases(det, data, split):
    cached = []
    for case, img_p, _, les_p in case_paths(data, split):
        scan = load_scan(img_p)
        truth = load_scan(les_p, is_mask=True).data > 0
        norm = normalize_intensity(scan.data)
        femur = det.segment_femur(norm, scan.spacing)
        comp, slices = det.inpaint(norm, femur, scan.spacing)
        diff, otsu = anomaly_map(norm[slices], comp[slices], femur[slices])
        cached.append((case, scan.spacing, diff, otsu, femur[slices], truth, slices))
    return cached


def score(cached, cfg: PostConfig) -> float:
    total = Counts()
    for _, sp, diff, otsu, fem, truth, slices in cached:
        pred = np.zeros(truth.shape, bool)
        if slices:
            pred[slices] = mask_from_anomaly(diff, otsu, fem, (sp[1], sp[2]), cfg)
        total = total + confusion(pred, truth)
    return scores(total)["dice"]


def main(argv=None):
    from bmltrt.pipeline import DetectConfig, Detector
    from bmltrt.runtime.backends import make_backend

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("data")
    ap.add_argument("--split", default="val")
    ap.add_argument("--resolution", type=int, default=None)
    a = ap.parse_args(argv)
    be, _ = make_backend("onnxruntime", "cpu")
    det = Detector(be, DetectConfig(resolution=a.resolution))
    cached = cache_cases(det, a.data, a.split)
    results = []
    for vals in itertools.product(*GRID.values()):
        cfg = PostConfig(**dict(zip(GRID, vals)))
        results.append((score(cached, cfg), cfg.to_dict()))
    results.sort(key=lambda r: -r[0])
    print(json.dumps({"split": a.split, "resolution": det.resolution, "best": results[:5]}, indent=1))


if __name__ == "__main__":
    main()
