"""Where do the lesion errors of one split lie? Every false-positive voxel is put in one place:
outside the true femur, within --rim-mm of a true lesion (the painted ill-defined rim), or
elsewhere in the true femur. Every missed lesion voxel: outside the predicted femur (never
repainted, so never searchable) or inside it. Per detected component (3D, 26-connected): its
size, true positives, share inside the true femur, depth below the predicted femur's edge.

    python scripts/lesion_errors.py DATA --params benchmarks/results/oai_painted_test/postprocess.json \
        --split val --resolution 256 -o benchmarks/results/painter2

DATA is a `bmltrt synth` dataset; --params a postprocess.json written by `bmltrt evaluate
--tune`. The shipped models (or --models) on ONNX Runtime CPU. Writes lesion_errors_<split>.json.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

import _painted

PLACES_FP = ("outside true femur", "lesion rim", "elsewhere in true femur")
PLACES_FN = ("outside predicted femur", "inside predicted femur")


def breakdown(lesion, truth, femur, true_femur, spacing, rim_mm: float):
    """Counts of false-positive and missed voxels by place, and one row per component."""
    fp = lesion & ~truth
    near = ndi.distance_transform_edt(~truth, sampling=spacing) <= rim_mm if truth.any() else np.zeros_like(truth)
    outside = fp & ~true_femur
    rim = fp & true_femur & near
    fp_counts = dict(zip(PLACES_FP, (int(outside.sum()), int(rim.sum()), int((fp & true_femur & ~near).sum()))))
    missed = truth & ~lesion
    fn_counts = dict(zip(PLACES_FN, (int((missed & ~femur).sum()), int((missed & femur).sum()))))
    # in-plane depth below the predicted femur's edge, mm
    depth = np.stack([ndi.distance_transform_edt(f, sampling=spacing[1:]) for f in femur])
    labels, n = ndi.label(lesion, np.ones((3, 3, 3), bool))
    rows = []
    for i, box in enumerate(ndi.find_objects(labels), 1):
        m = labels[box] == i
        d = depth[box][m]
        rows.append({"voxels": int(m.sum()), "true_positive": int(truth[box][m].sum()),
                     "in_true_femur": round(float(true_femur[box][m].mean()), 3),
                     "depth_mean_mm": round(float(d.mean()), 2), "depth_max_mm": round(float(d.max()), 2),
                     "slices": [int(box[0].start + z) for z in np.flatnonzero(m.any(axis=(1, 2)))]})
    return fp_counts, fn_counts, rows


def main(argv=None) -> int:
    ap = _painted.parser(__doc__, "val")
    ap.add_argument("--rim-mm", type=float, default=1.5)
    a = ap.parse_args(argv)
    det = _painted.detector(a)
    fp_total = dict.fromkeys(PLACES_FP, 0)
    fn_total = dict.fromkeys(PLACES_FN, 0)
    acc, cases = [0, 0, 0], {}
    for cid, scan, norm, true_femur, truth in _painted.cases(a):
        femur = det.segment_femur(norm, scan.spacing)
        composite, keep = det.inpaint(norm, femur, scan.spacing)
        lesion = det.postprocess(norm, composite, femur, keep, scan.spacing)
        _painted.add_counts(acc, lesion, truth)
        fp, fn, rows = breakdown(lesion, truth, femur, true_femur, scan.spacing, a.rim_mm)
        for k in fp:
            fp_total[k] += fp[k]
        for k in fn:
            fn_total[k] += fn[k]
        cases[cid] = {"false_positive": fp, "missed": fn, "components": rows}
        print(cid, fp, fn, flush=True)
    share = {"false_positive": {k: v / max(1, sum(fp_total.values())) for k, v in fp_total.items()},
             "missed": {k: v / max(1, sum(fn_total.values())) for k, v in fn_total.items()}}
    path = _painted.write(a, det, "lesion_errors.py", f"lesion_errors_{a.split}.json", rim_mm=a.rim_mm,
                          pooled_lesion=_painted.pooled(*acc), false_positive=fp_total, missed=fn_total,
                          shares=share, per_case=cases)
    print(f"pooled Dice {_painted.pooled(*acc)['dice']:.3f}")
    for what, d in share.items():
        print(what + ": " + ", ".join(f"{k} {v:.0%}" for k, v in d.items()))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
