"""A lead, not shipped: gate the difference map by the scan's own histogram-equalised
brightness (a BML is hyperintense on fat-suppressed scans), so that a lower floor can be
used. Scores pooled whole-volume lesion Dice and lesion-wise F1 (3D components) of one split
for every (gate, floor) pair, opening 1.2 mm, no closing, 10 mm^2 (the val-tuned settings).

    python scripts/he_gate.py /work/runs/oai_painted2 \
        --params benchmarks/results/oai_painted_test/postprocess.json --split val \
        -o benchmarks/results/he_gate

Writes he_gate_<split>.json. ONNX Runtime CPU, the shipped models (mirror averaging on).
"""

from __future__ import annotations

import itertools
import sys

import numpy as np

import _painted
from bmltrt.evaluation.metrics import f1_score, lesion_detection
from bmltrt.postprocess.lesion import PostConfig, equalize_hist, mask_from_anomaly, otsu_thresholds

GATES = (0.0, 0.6, 0.7, 0.8, 0.9)
FLOORS = (0.2, 0.25, 0.3, 0.35, 0.4)


def lesion_counts(pred, truth) -> list[int]:
    """[true lesions, detected, predicted lesions, predicted that touch a true one] (3D, 26-connected)."""
    d = lesion_detection(pred, truth)
    return [d["n_true"], d["detected"], d["n_pred"], d["true_positive_pred"]]


def main() -> int:
    a = _painted.parser(__doc__, "val").parse_args()
    det = _painted.detector(a)
    acc = {k: np.zeros(7, np.int64) for k in itertools.product(GATES, FLOORS)}
    for cid, scan, norm, _, truth in _painted.cases(a):
        femur = det.segment_femur(norm, scan.spacing)
        composite, keep = det.inpaint(norm, femur, scan.spacing)
        idx = np.flatnonzero(keep)
        he, fem, t = equalize_hist(norm[idx]), femur[idx], truth[idx]
        diff = np.maximum(he - equalize_hist(composite[idx]), 0) * fem
        rest = truth.sum() - t.sum()  # true lesion voxels on slices never searched
        for gate, floor in acc:
            d = diff * (he > gate)
            cfg = PostConfig(floor=floor, opening_mm=1.2, closing_mm=0.0, min_area_mm2=10.0, otsu_scope="slice")
            m = mask_from_anomaly(d, otsu_thresholds(d, fem), fem, tuple(scan.spacing[1:]), cfg)
            acc[(gate, floor)] += [(m & t).sum(), m.sum(), t.sum() + rest, *lesion_counts(m, t)]
        print(cid, flush=True)
    rows = []
    for (gate, floor), (tp, pred, true, nt, det_, npred, tpp) in acc.items():
        f1 = f1_score(det_ / max(nt, 1), tpp / max(npred, 1))
        rows.append({"gate": gate, "floor": floor, "dice": round(2 * tp / max(pred + true, 1), 4),
                     "tp": int(tp), "pred": int(pred), "true": int(true), "lesions_detected": f"{det_}/{nt}",
                     "lesion_f1": round(f1, 4)})
    rows.sort(key=lambda r: -r["dice"])
    for r in rows[:8]:
        print(r)
    path = _painted.write(a, det, "he_gate.py", f"he_gate_{a.split}.json", rows=rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
