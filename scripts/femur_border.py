"""Does a different femur border give back the lesions the segmenter carves out? Femur Dice,
the share of lesion voxels inside the femur, and pooled lesion Dice of one split for
femur masks made from the same probability map with other thresholds and an in-plane
closing (radius in mm) before the inpainter, the closing optionally gated (it adds only
voxels whose femur probability exceeds the gate); same inpainter, same post-processing.

    python scripts/femur_border.py DATA --params benchmarks/results/oai_painted_test/postprocess.json \
        --split val --thresholds 0.5,0.3 --closing-mm 0,3,5 --gates 0,0.15 -o benchmarks/results/femur_border

Writes femur_border_<split>.json. Shipped models (or --models) on ONNX Runtime CPU.
"""

from __future__ import annotations

import _painted
import numpy as np


def disc(r_mm: float, spacing) -> np.ndarray:
    ry, rx = max(1, int(round(r_mm / spacing[1]))), max(1, int(round(r_mm / spacing[2])))
    yy, xx = np.ogrid[-ry:ry + 1, -rx:rx + 1]
    return ((yy / ry) ** 2 + (xx / rx) ** 2 <= 1)[None]


def main(argv=None) -> int:
    from bmltrt.morphology import binary_closing, fill_holes_inplane
    from bmltrt.pipeline import largest_component_filled

    ap = _painted.parser(__doc__, "val")
    ap.add_argument("--thresholds", default="0.5")
    ap.add_argument("--closing-mm", default="0")
    ap.add_argument("--gates", default="0")
    ap.add_argument("--edge-fraction", type=float, default=0.3, help="the pipeline's edge_slice_fraction")
    a = ap.parse_args(argv)
    # the variants below are the femur clean-ups: the pipeline's own fill and slice rule off
    det = _painted.detector(a, edge_slice_fraction=a.edge_fraction, notch_fill_mm=0.0, femur_min_slice_fraction=0.0)
    variants = [(float(t), float(r), float(g)) for t in a.thresholds.split(",") for r in a.closing_mm.split(",")
                for g in (a.gates.split(",") if float(r) > 0 else ["0"])]
    acc = {v: {"tp": 0, "pred": 0, "true": 0, "in_femur": 0, "dice": []} for v in variants}
    for cid, scan, norm, true_femur, truth in _painted.cases(a):
        prob = det.femur_probability(norm, scan.spacing)
        for t, r, g in variants:
            femur = largest_component_filled(prob > t)
            if r > 0:
                closed = fill_holes_inplane(binary_closing(femur, disc(r, scan.spacing)))
                femur = femur | (closed & (prob > g)) if g > 0 else closed
            composite, keep = det.inpaint(norm, femur, scan.spacing)
            mask = det.postprocess(norm, composite, femur, keep, scan.spacing)
            s = acc[(t, r, g)]
            s["tp"] += int((mask & truth).sum())
            s["pred"] += int(mask.sum())
            s["true"] += int(truth.sum())
            s["in_femur"] += int((femur & truth).sum())
            s["dice"].append(float(2 * (femur & true_femur).sum() / max(1, femur.sum() + true_femur.sum())))
        print(cid, " ".join(f"t{t}/r{r}/g{g}:{s['tp']}/{s['pred']}" for (t, r, g), s in acc.items()), flush=True)
    rows = [{"femur_threshold": t, "closing_mm": r, "closing_gate": g, "femur_dice_mean": float(np.mean(s["dice"])),
             "femur_dice_min": float(np.min(s["dice"])), "lesion_in_femur": s["in_femur"] / max(1, s["true"]),
             "lesion_dice": 2 * s["tp"] / max(1, s["pred"] + s["true"]),
             "lesion_sensitivity": s["tp"] / max(1, s["true"]), "lesion_precision": s["tp"] / max(1, s["pred"]),
             "tp": s["tp"], "pred": s["pred"], "true": s["true"]} for (t, r, g), s in acc.items()]
    _painted.write(a, det, "femur_border.py", f"femur_border_{a.split}.json", edge_slice_fraction=a.edge_fraction,
                   variants=rows)
    for row in rows:
        print(f"t={row['femur_threshold']} closing={row['closing_mm']} mm gate {row['closing_gate']}: "
              f"femur Dice {row['femur_dice_mean']:.3f} (min {row['femur_dice_min']:.3f}), "
              f"lesion in femur {row['lesion_in_femur']:.2f}, lesion Dice {row['lesion_dice']:.3f} "
              f"(sens {row['lesion_sensitivity']:.3f}, prec {row['lesion_precision']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
