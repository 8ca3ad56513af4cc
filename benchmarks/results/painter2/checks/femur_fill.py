"""One-off check (2026-12-06): do the femur mask's hole filling and notch filling still pay on
painter 2? Painted-OAI val at 256, same segmenter probability, four femur masks: shipped, no
in-plane hole filling, no notch fill, neither. Run from the repository root:

    python benchmarks/results/painter2/checks/femur_fill.py DATA --params export/postprocess.json -o OUT
"""
import dataclasses
import json
import sys

import numpy as np

sys.path.insert(0, "scripts")
import _painted  # noqa: E402
import bmltrt.pipeline as pipeline  # noqa: E402
from bmltrt.morphology import largest_component  # noqa: E402


def main():
    a = _painted.parser(__doc__, "val").parse_args()
    det = _painted.detector(a)
    filled = pipeline.largest_component_filled

    def unfilled(mask):
        return largest_component(mask, pipeline.FULL_3D)

    no_notch = dataclasses.replace(det.config, notch_fill_mm=0.0)
    variants = {"shipped": (filled, det.config), "no hole filling": (unfilled, det.config),
                "no notch fill": (filled, no_notch), "neither": (unfilled, no_notch)}
    acc = {k: [0, 0, 0] for k in variants}
    dice = {k: [] for k in variants}
    try:
        for cid, scan, norm, tf, truth in _painted.cases(a):
            prob = det.femur_probability(norm, scan.spacing)
            for k, (fill, cfg) in variants.items():
                pipeline.largest_component_filled = fill  # femur_mask looks it up at call time
                d = pipeline.Detector(det.backend, cfg)
                femur = d.femur_mask(prob, scan.spacing)
                dice[k].append(float(2 * (femur & tf).sum() / (femur.sum() + tf.sum())))
                comp, keep = d.inpaint(norm, femur, scan.spacing)
                _painted.add_counts(acc[k], d.postprocess(norm, comp, femur, keep, scan.spacing), truth)
            print(cid, flush=True)
    finally:
        pipeline.largest_component_filled = filled
    res = {k: {"femur_dice_mean": float(np.mean(dice[k])), **_painted.pooled(*acc[k])} for k in variants}
    _painted.write(a, det, "../benchmarks/results/painter2/checks/femur_fill.py", "femur_fill_val.json", results=res)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
