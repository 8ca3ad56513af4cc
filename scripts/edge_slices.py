"""How many of the lesion voxels found in one split lie in the femur's edge slices? Pooled
lesion Dice when slices with under F of the largest femur slice's area are not searched,
for several F, with the pipeline's femur clean-up (or another notch fill) (the pipeline's EDGE_SLICE_FRACTION is chosen with this on a val split).

    python scripts/edge_slices.py DATA --params benchmarks/results/oai_painted_test/postprocess.json \
        --split val --fractions 0,0.1,0.2,0.3,0.4,0.5 -o benchmarks/results/edge_slices

The masks are computed once with every slice searched (per-slice Otsu: dropping a slice
changes no other slice) and cut per F. Shipped models (or --models), ONNX Runtime CPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    from bmltrt.bench.machine import cpu_name, usable_cores
    from bmltrt.io import load_scan
    from bmltrt.io.atomic import atomic_write
    from bmltrt.pipeline import DetectConfig, Detector
    from bmltrt.postprocess.lesion import PostConfig
    from bmltrt.runtime.backends import make_backend
    from bmltrt.runtime.preprocess import normalize_intensity

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--params", type=Path, required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--fractions", default="0,0.1,0.2,0.3,0.4,0.5")
    ap.add_argument("--notch-fill-mm", type=float, default=None, help="default: the pipeline's")
    ap.add_argument("--notch-fill-gate", type=float, default=None, help="default: the pipeline's")
    ap.add_argument("--models", type=Path, default=None)
    ap.add_argument("-o", "--out", type=Path, required=True)
    a = ap.parse_args(argv)
    ids = json.loads((a.data / "dataset.json").read_text())["splits"][a.split]
    cfg = PostConfig.from_dict(json.loads(a.params.read_text())["by_resolution"][str(a.resolution)])
    if cfg.otsu_scope != "slice":
        raise SystemExit("these parameters take one Otsu over the volume: cutting slices afterwards is not the pipeline")
    fill = {k: v for k, v in (("notch_fill_mm", a.notch_fill_mm), ("notch_fill_gate", a.notch_fill_gate)) if v is not None}
    det = Detector(make_backend("onnxruntime", "cpu", models_dir=a.models)[0],
                   DetectConfig(resolution=a.resolution, post=cfg, edge_slice_fraction=0.0, **fill))
    fracs = [float(f) for f in a.fractions.split(",")]
    acc = {f: [0, 0] for f in fracs}
    n_true = 0
    for cid in ids:
        d = a.data / a.split
        scan = load_scan(d / "images" / f"{cid}.nii.gz")
        truth = load_scan(d / "lesion" / f"{cid}.nii.gz", is_mask=True).data > 0.5
        norm = normalize_intensity(scan.data.astype(np.float32))
        femur = det.segment_femur(norm, scan.spacing)
        composite, keep = det.inpaint(norm, femur, scan.spacing)
        mask = det.postprocess(norm, composite, femur, keep, scan.spacing)
        area = femur.reshape(len(femur), -1).sum(axis=1)
        n_true += int(truth.sum())
        for f in fracs:
            cut = mask & (area >= f * area.max())[:, None, None]
            acc[f][0] += int((cut & truth).sum())
            acc[f][1] += int(cut.sum())
        print(cid, {f: v[:] for f, v in acc.items()}, flush=True)
    rows = [{"edge_slice_fraction": f, "tp": tp, "pred": pred, "true": n_true,
             "pooled_lesion_dice": 2 * tp / max(1, pred + n_true)} for f, (tp, pred) in acc.items()]
    doc = {"data": str(a.data), "split": a.split, "cases": len(ids), "resolution": a.resolution,
           "post_processing": cfg.to_dict(),
           "notch_fill": [det.config.notch_fill_mm, det.config.notch_fill_gate], "params_from": str(a.params),
           "models": str(a.models or "shipped (export/)"), "backend": "onnxruntime cpu fp32",
           "machine": f"{cpu_name()}, {usable_cores()} cores", "date": dt.date.today().isoformat(),
           "command": "python scripts/edge_slices.py " + " ".join(sys.argv[1:]), "rows": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    tag = "" if not fill else f"_notch{det.config.notch_fill_mm:g}_gate{det.config.notch_fill_gate:g}"
    atomic_write(a.out / f"edge_slices_{a.split}{tag}.json", lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1)))
    for r in rows:
        print(f"F={r['edge_slice_fraction']}: tp {r['tp']} pred {r['pred']} true {r['true']} "
              f"pooled lesion Dice {r['pooled_lesion_dice']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
