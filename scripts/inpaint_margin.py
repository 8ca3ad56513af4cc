"""Is the lesion loss in the inpainting mask or in the search region? Pooled lesion Dice of
one split when the inpainter repaints the predicted femur grown by other margins, and two
diagnostics that swap in the TRUE femur for one of the two roles (repainted region or
searched region); same networks, same post-processing, the pipeline's femur clean-up.

    python scripts/inpaint_margin.py DATA --params benchmarks/results/oai_painted_test/postprocess.json \
        --split val --margins-mm 1,2,3 -o benchmarks/results/inpaint_margin

A lesion that pokes out of the repainted region is context to the inpainter, which then
continues it into the mask: the difference, and the lesion, vanish. Writes
inpaint_margin_<split>.json. Shipped models (or --models) on ONNX Runtime CPU.
"""

from __future__ import annotations

import dataclasses

import _painted


def main(argv=None) -> int:
    ap = _painted.parser(__doc__, "val")
    ap.add_argument("--margins-mm", default="1,2,3")
    ap.add_argument("--no-diagnostics", action="store_true")
    a = ap.parse_args(argv)
    det = _painted.detector(a)
    base = det.config
    # (name, margin, repaint the true femur?, search the true femur?)
    variants = [(f"margin {m} mm", float(m), False, False) for m in a.margins_mm.split(",")]
    if not a.no_diagnostics:
        variants += [("true femur repainted, predicted searched", base.mask_dilate_mm, True, False),
                     ("predicted repainted, true femur searched", base.mask_dilate_mm, False, True)]
    acc = {v[0]: [0, 0, 0] for v in variants}
    in_femur = [0, 0]
    for cid, scan, norm, true_femur, truth in _painted.cases(a):
        femur = det.segment_femur(norm, scan.spacing)
        in_femur[0] += int((femur & truth).sum())
        in_femur[1] += int(truth.sum())
        for name, margin, repaint_true, search_true in variants:
            det.config = dataclasses.replace(base, mask_dilate_mm=margin)
            composite, keep = det.inpaint(norm, true_femur if repaint_true else femur, scan.spacing)
            if repaint_true or search_true:  # the searched slices are the predicted femur's
                keep = det.slice_plan(femur, scan.spacing)
            mask = det.postprocess(norm, composite, true_femur if search_true else femur, keep, scan.spacing)
            _painted.add_counts(acc[name], mask, truth)
        det.config = base
        print(cid, {k: v[:] for k, v in acc.items()}, flush=True)
    rows = [{"variant": name, "margin_mm": margin, "repainted": "true femur" if rt else "predicted femur",
             "searched": "true femur" if st else "predicted femur",
             **_painted.lesion_row(*acc[name])}
            for name, margin, rt, st in variants]
    _painted.write(a, det, "inpaint_margin.py", f"inpaint_margin_{a.split}.json",
                   lesion_in_predicted_femur=in_femur[0] / max(1, in_femur[1]), variants=rows)
    print(f"lesion voxels inside the predicted femur: {in_femur[0] / max(1, in_femur[1]):.3f}")
    for r in rows:
        print(f"{r['variant']}: Dice {r['lesion_dice']:.3f} (sens {r['lesion_sensitivity']:.3f}, "
              f"prec {r['lesion_precision']:.3f}, {r['tp']}/{r['pred']}/{r['true']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
