"""Does an edge-aware refinement of the femur probability at the scan's own resolution help?
The segmenter sees 1.6 mm pixels; its probability is upsampled linearly. A guided filter
(He et al. 2013) with the scan slice as guide pulls the upsampled probability onto the
scan's edges. Femur Dice and pooled lesion Dice of one split for several radii, eps and
passes, or for any other setting of the femur clean-up (DetectConfig fields).

    python scripts/femur_refine.py DATA --params benchmarks/results/oai_painted_test/postprocess.json \
        --split val -o benchmarks/results/femur_refine
"""

from __future__ import annotations

import numpy as np

import _painted


def variant_config(det, v: str):
    """A variant's DetectConfig: `none` (no refinement), RADIUS_MM:EPS[:PASSES] (the
    refinement), or FIELD=VALUE[;FIELD=VALUE...] (any femur clean-up field of DetectConfig)."""
    import dataclasses

    from bmltrt.pipeline import DetectConfig

    if v == "none":
        return dataclasses.replace(det.config, femur_refine_mm=0.0)
    if "=" in v:
        over = {}
        for kv in v.split(";"):
            k, val = kv.split("=")
            kind = type(getattr(det.config, k))
            over[k] = kind(float(val))
        return dataclasses.replace(det.config, femur_refine_mm=DetectConfig().femur_refine_mm, **over)
    r_mm, eps, *passes = (float(x) for x in v.split(":"))
    return dataclasses.replace(det.config, femur_refine_mm=r_mm, femur_refine_eps=eps,
                               femur_refine_passes=int(passes[0]) if passes else 1)


def main(argv=None) -> int:
    from bmltrt.pipeline import Detector

    ap = _painted.parser(__doc__, "val")
    ap.add_argument("--variants", default="none,2:0.01,2:0.001,4:0.01,4:0.001",
                    help="comma-separated: none, RADIUS_MM:EPS[:PASSES], or FIELD=VALUE[;FIELD=VALUE] of DetectConfig")
    a = ap.parse_args(argv)
    # the segmenter's own probability (no refinement), each variant's clean-up applied to it here
    det = _painted.detector(a, femur_refine_mm=0.0)
    variants = a.variants.split(",")
    dets = {v: Detector(det.backend, variant_config(det, v)) for v in variants}
    acc = {v: [0, 0, 0] for v in variants}
    dice = {v: [] for v in variants}
    for cid, scan, norm, true_femur, truth in _painted.cases(a):
        prob = det.femur_probability(norm, scan.spacing)
        for v, d in dets.items():
            femur = d.femur_mask(d.refine_probability(norm, prob, scan.spacing), scan.spacing)
            dice[v].append(2 * (femur & true_femur).sum() / max(1, femur.sum() + true_femur.sum()))
            composite, keep = d.inpaint(norm, femur, scan.spacing)
            _painted.add_counts(acc[v], d.postprocess(norm, composite, femur, keep, scan.spacing), truth)
        print(cid, {v: (round(dice[v][-1], 4), acc[v][:]) for v in variants}, flush=True)
    rows = [{"variant": v, "femur_dice_mean": float(np.mean(dice[v])), **_painted.lesion_row(*acc[v])}
            for v in variants]
    _painted.write(a, det, "femur_refine.py", f"femur_refine_{a.split}.json", variants=rows)
    for r in rows:
        print(f"{r['variant']}: femur {r['femur_dice_mean']:.4f} lesion {r['lesion_dice']:.3f} "
              f"(sens {r['lesion_sensitivity']:.3f} prec {r['lesion_precision']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
