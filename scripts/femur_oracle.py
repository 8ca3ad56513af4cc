"""How much of the lesion loss is the segmenter's? Pooled lesion Dice of one split with the
predicted femur and with the TRUE femur in its place (same inpainter, same post-processing).

    python scripts/femur_oracle.py DATA --params benchmarks/results/oai_painted_test/postprocess.json \
        --split test --resolution 256 -o benchmarks/results/femur_oracle

DATA is a `bmltrt synth` dataset (phantoms or `--from-labels`); --params a postprocess.json
written by `bmltrt evaluate --tune` (its settings for --resolution, chosen on the val split).
The shipped models (or --models) on ONNX Runtime CPU. Writes femur_oracle.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np


def pooled(tp: int, pred: int, true: int) -> dict:
    return {"dice": 2 * tp / max(1, pred + true), "sensitivity": tp / max(1, true),
            "precision": tp / max(1, pred), "tp": tp, "pred": pred, "true": true}


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
    ap.add_argument("--split", default="test")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--models", type=Path, default=None)
    ap.add_argument("-o", "--out", type=Path, required=True)
    a = ap.parse_args(argv)
    ids = json.loads((a.data / "dataset.json").read_text())["splits"][a.split]
    params = json.loads(a.params.read_text())["by_resolution"][str(a.resolution)]
    cfg = PostConfig.from_dict(params)
    det = Detector(make_backend("onnxruntime", "cpu", models_dir=a.models)[0],
                   DetectConfig(resolution=a.resolution, post=cfg))
    acc = {"predicted femur": [0, 0, 0], "true femur": [0, 0, 0]}
    for cid in ids:
        d = a.data / a.split
        scan = load_scan(d / "images" / f"{cid}.nii.gz")
        true_femur = load_scan(d / "femur" / f"{cid}.nii.gz", is_mask=True).data > 0.5
        truth = load_scan(d / "lesion" / f"{cid}.nii.gz", is_mask=True).data > 0.5
        norm = normalize_intensity(scan.data.astype(np.float32))
        for name, femur in (("predicted femur", det.segment_femur(norm, scan.spacing)), ("true femur", true_femur)):
            composite, keep = det.inpaint(norm, femur, scan.spacing)
            mask = det.postprocess(norm, composite, femur, keep, scan.spacing)
            acc[name][0] += int((mask & truth).sum())
            acc[name][1] += int(mask.sum())
            acc[name][2] += int(truth.sum())
        print(cid, {k: v[:] for k, v in acc.items()}, flush=True)
    doc = {"data": str(a.data), "split": a.split, "cases": len(ids), "resolution": a.resolution,
           "post_processing": cfg.to_dict(), "params_from": str(a.params),
           "models": str(a.models or "shipped (export/)"), "backend": "onnxruntime cpu fp32",
           "machine": f"{cpu_name()}, {usable_cores()} cores",
           "date": dt.date.today().isoformat(), "command": "python scripts/femur_oracle.py " + " ".join(sys.argv[1:]),
           "pooled_lesion": {k: pooled(*v) for k, v in acc.items()}}
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write(a.out / "femur_oracle.json", lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1)))
    for k, v in doc["pooled_lesion"].items():
        print(f"{k}: pooled Dice {v['dice']:.3f}, sensitivity {v['sensitivity']:.3f}, precision {v['precision']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
