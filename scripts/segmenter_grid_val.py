"""The segmenter alone on its 1.6 mm grid, as training validates it: mean femur Dice and the
share of true lesion voxels it calls femur (a lesion outside the femur mask is never
repainted, so never found), one pass, no mirror, no clean-up, for a models folder and each
smoothing before the grid (DetectConfig.seg_antialias; 0 is plain resampling).

    python scripts/segmenter_grid_val.py runs/oai_painted2 --models export --antialias 0,2.5 \
        -o benchmarks/results/segmenter_smoothed_training

Writes segmenter_grid_<models folder name>.json (ONNX Runtime CPU float32).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path



def main(argv=None) -> int:
    from bmltrt.bench.machine import cpu_name, usable_cores
    from bmltrt.io.atomic import atomic_write
    from bmltrt.runtime.backends import make_backend
    from bmltrt.training.data import segmenter_grid_scores, segmenter_volumes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="a `bmltrt synth` dataset")
    ap.add_argument("--split", default="val")
    ap.add_argument("--models", type=Path, default=None, help="models folder (default: the shipped one)")
    ap.add_argument("--antialias", default="0,2.5")
    ap.add_argument("-o", "--out", type=Path, required=True)
    a = ap.parse_args(argv)
    backend = make_backend("onnxruntime", "cpu", models_dir=a.models)[0]
    cfg = backend.store.entry("segmenter")["config"]
    rows = []
    for aa in (float(v) for v in a.antialias.split(",")):
        vols = segmenter_volumes(a.data, a.split, cfg["inplane_spacing_mm"], lesions=True, antialias=aa)
        dice, inside = segmenter_grid_scores(vols, lambda b: backend.run("segmenter", b), cfg["patch"],
                                             cfg["overlap"])
        rows.append({"seg_antialias": aa, "femur_dice_mean": dice, "lesion_voxels_called_femur": inside or 0.0,
                     "lesion_voxels": int(sum(int(v[4].sum()) for v in vols))})
        print(json.dumps(rows[-1]))
    name = (a.models or Path("export")).resolve().name
    doc = {"data": str(a.data), "split": a.split, "models": str(a.models or "shipped (export/)"),
           "backend": "onnxruntime cpu fp32", "machine": f"{cpu_name()}, {usable_cores()} cores",
           "date": dt.date.today().isoformat(), "command": "python " + " ".join(sys.argv), "rows": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    out = a.out / f"segmenter_grid_{name}.json"
    atomic_write(out, lambda p: Path(p).write_text(json.dumps(doc, indent=1)))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
