"""Echo agreement of the real qDESS knee against the femur threshold: the shipped rule
(probability > 0.5, largest piece), lower or higher thresholds, and hysteresis (the 0.5 mask
grown through the probability above a lower threshold). The probability is computed once
per echo (shipped models, mirror averaging, edge refinement; ONNX Runtime CPU).

    python scripts/femur_threshold.py -o benchmarks/results/segmenter_consistency

Writes femur_threshold.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from real_scans import REAL, SCANS

VARIANTS = [(0.5, None), (0.6, None), (0.4, None), (0.3, None), (0.5, 0.3), (0.5, 0.2)]


def main(argv=None) -> int:
    from bmltrt.bench.machine import cpu_name, usable_cores
    from bmltrt.io import load_scan
    from bmltrt.io.atomic import atomic_write
    from bmltrt.pipeline import DetectConfig, Detector
    from bmltrt.runtime.backends import make_backend
    from bmltrt.runtime.preprocess import normalize_intensity

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", type=Path, required=True)
    a = ap.parse_args(argv)
    backend = make_backend("onnxruntime", "cpu")[0]
    det = Detector(backend, DetectConfig())
    probs, spacing = {}, None
    for key in ("echo1", "echo2"):
        scan = load_scan(REAL / SCANS[key])
        spacing = scan.spacing
        probs[key] = det.femur_probability(normalize_intensity(scan.data), scan.spacing)
    rows = []
    for thr, grow in VARIANTS:
        at = Detector(backend, DetectConfig(femur_threshold=grow or thr))
        masks = {}
        for key, p in probs.items():
            if grow is None:
                masks[key] = at.femur_mask(p, spacing)
            else:  # keep the low-threshold pieces that hold the shipped mask
                seed = det.femur_mask(p, spacing)
                low = at.femur_mask(p, spacing)
                lab, _ = ndi.label(low, np.ones((3, 3, 3), bool))
                held = np.unique(lab[seed & low])
                masks[key] = np.isin(lab, held[held > 0]) | seed
        m1, m2 = masks["echo1"], masks["echo2"]
        cm3 = {k: round(float(m.sum() * np.prod(spacing) / 1000), 1) for k, m in masks.items()}
        rows.append({"threshold": thr, "grow_to": grow, "echo_dice": round(float(2 * (m1 & m2).sum() /
                     max(1, m1.sum() + m2.sum())), 4), "femur_cm3": cm3})
        print(rows[-1], flush=True)
    doc = {"rows": rows, "backend": "onnxruntime cpu fp32", "models": "shipped (export/)",
           "machine": f"{cpu_name()}, {usable_cores()} cores", "date": dt.date.today().isoformat(),
           "command": "python scripts/femur_threshold.py " + " ".join(sys.argv[1:])}
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "femur_threshold.json"
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1)))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
