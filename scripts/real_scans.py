"""The femur on the real scans of ../shared/data/real (no masks): qDESS echo 1 / echo 2 femur
Dice (the same knee twice), and per scan the femur area of each sagittal slice, for one
models folder on ONNX Runtime CPU.

    python scripts/real_scans.py --models export -o benchmarks/results/real_scans
    python scripts/real_scans.py --set seg_antialias=1.0 -o benchmarks/results/segmenter_antialias

Writes real_scans_<models folder name>.json. Look at `bmltrt detect`'s overlays too: a mask
can agree across echoes and still be wrong.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np

from with_detect_config import detect_config_overrides  # scripts/ is on sys.path when run

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
SCANS = {"echo1": "pykneer_qdess_echo1_oailike_448x448x40.nii.gz",
         "echo2": "pykneer_qdess_echo2_oailike_448x448x40.nii.gz",
         "mese": "pymskt_mese_t2_echo1_TE6.3.nii.gz"}


def main(argv=None) -> int:
    from bmltrt.bench.machine import cpu_name, usable_cores
    from bmltrt.evaluation.maps import femur_cleanup_of
    from bmltrt.io import load_scan
    from bmltrt.io.atomic import atomic_write
    from bmltrt.pipeline import DetectConfig, Detector
    from bmltrt.postprocess.femur_check import check_femur
    from bmltrt.runtime.backends import make_backend
    from bmltrt.runtime.preprocess import normalize_intensity

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=None)
    ap.add_argument("--real", type=Path, default=REAL)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a DetectConfig field of the femur stage, e.g. seg_antialias=1.0 (repeatable)")
    ap.add_argument("-o", "--out", type=Path, required=True)
    a = ap.parse_args(argv)
    try:
        over = detect_config_overrides(a.set)
    except ValueError as e:
        ap.error(f"--set {e}")
    det = Detector(make_backend("onnxruntime", "cpu", models_dir=a.models)[0], DetectConfig(**over))
    masks, doc = {}, {"models": str(a.models or "shipped (export/)"), "settings": over,
                      "segmenter_grid_mm": det.seg_cfg["inplane_spacing_mm"],
                      "femur_cleanup": femur_cleanup_of(det),
                      "backend": "onnxruntime cpu fp32", "machine": f"{cpu_name()}, {usable_cores()} cores",
                      "date": dt.date.today().isoformat(),
                      "command": "python scripts/real_scans.py " + " ".join(sys.argv[1:]), "scans": {}}
    for key, name in SCANS.items():
        scan = load_scan(a.real / name)
        norm = normalize_intensity(scan.data)
        prob = det.femur_probability(norm, scan.spacing)
        femur = det.femur_mask(prob, scan.spacing)
        check = check_femur(prob, femur, scan.spacing, norm)
        masks[key] = femur
        area = femur.reshape(len(femur), -1).sum(1) * scan.spacing[1] * scan.spacing[2]
        doc["scans"][key] = {"file": name, "femur_cm3": float(femur.sum() * np.prod(scan.spacing) / 1000),
                             "plausible": bool(check.plausible), "reasons": list(check.reasons),
                             "slices_with_femur": [int(i) for i in np.flatnonzero(area > 0)],
                             "femur_mm2_per_slice": [round(float(v), 1) for v in area]}
        print(key, f"{doc['scans'][key]['femur_cm3']:.1f} cm3, slices {doc['scans'][key]['slices_with_femur']}",
              flush=True)
    m1, m2 = masks["echo1"], masks["echo2"]
    doc["echo_dice"] = float(2 * (m1 & m2).sum() / max(1, m1.sum() + m2.sum()))
    per = [float(2 * (a_ & b_).sum() / max(1, a_.sum() + b_.sum())) if (a_.any() or b_.any()) else None
           for a_, b_ in zip(m1, m2)]
    doc["echo_dice_per_slice"] = [None if v is None else round(v, 3) for v in per]
    a.out.mkdir(parents=True, exist_ok=True)
    tag = "".join(f"_{k}{v}" for k, v in over.items())
    path = a.out / f"real_scans_{(a.models or Path('export')).resolve().name}{tag}.json"
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1)))
    print(f"echo 1 / echo 2 femur Dice {doc['echo_dice']:.4f}; per slice {doc['echo_dice_per_slice']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
