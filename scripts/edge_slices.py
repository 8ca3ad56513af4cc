"""How many of the lesion voxels found in one split lie in the femur's edge slices? Pooled
lesion Dice when slices with under F of the largest femur slice's area are not searched,
for several F, with the pipeline's femur clean-up (or another notch fill) (the pipeline's EDGE_SLICE_FRACTION is chosen with this on a val split).

    python scripts/edge_slices.py DATA --params benchmarks/results/oai_painted_test/postprocess.json \
        --split val --fractions 0,0.1,0.2,0.3,0.4,0.5 -o benchmarks/results/edge_slices

The masks are computed once with every slice searched (per-slice Otsu: dropping a slice
changes no other slice) and cut per F. Shipped models (or --models), ONNX Runtime CPU.
"""

from __future__ import annotations

import _painted


def main(argv=None) -> int:
    from bmltrt.pipeline import femur_slice_plan

    ap = _painted.parser(__doc__, "val")
    ap.add_argument("--fractions", default="0,0.1,0.2,0.3,0.4,0.5")
    ap.add_argument("--notch-fill-mm", type=float, default=None, help="default: the pipeline's")
    ap.add_argument("--notch-fill-gate", type=float, default=None, help="default: the pipeline's")
    a = ap.parse_args(argv)
    fill = {k: v for k, v in (("notch_fill_mm", a.notch_fill_mm), ("notch_fill_gate", a.notch_fill_gate)) if v is not None}
    det = _painted.detector(a, edge_slice_fraction=0.0, **fill)
    if det.config.post.otsu_scope != "slice":
        raise SystemExit("these parameters take one Otsu over the volume: cutting slices afterwards is not the pipeline")
    fracs = [float(f) for f in a.fractions.split(",")]
    acc = {f: [0, 0] for f in fracs}
    n_true = 0
    for cid, scan, norm, _, truth in _painted.cases(a):
        femur = det.segment_femur(norm, scan.spacing)
        composite, keep = det.inpaint(norm, femur, scan.spacing)
        mask = det.postprocess(norm, composite, femur, keep, scan.spacing)
        n_true += int(truth.sum())
        for f in fracs:
            cut = mask & femur_slice_plan(femur, scan.spacing, f)[:, None, None]
            acc[f][0] += int((cut & truth).sum())
            acc[f][1] += int(cut.sum())
        print(cid, {f: v[:] for f, v in acc.items()}, flush=True)
    rows = [{"edge_slice_fraction": f, "tp": tp, "pred": pred, "true": n_true,
             "pooled_lesion_dice": 2 * tp / max(1, pred + n_true)} for f, (tp, pred) in acc.items()]
    tag = "" if not fill else f"_notch{det.config.notch_fill_mm:g}_gate{det.config.notch_fill_gate:g}"
    _painted.write(a, det, "edge_slices.py", f"edge_slices_{a.split}{tag}.json",
                   notch_fill=[det.config.notch_fill_mm, det.config.notch_fill_gate], rows=rows)
    for r in rows:
        print(f"F={r['edge_slice_fraction']}: tp {r['tp']} pred {r['pred']} true {r['true']} "
              f"pooled lesion Dice {r['pooled_lesion_dice']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
