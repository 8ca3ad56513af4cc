"""Benchmark: end-to-end detect on one 448x448x36 phantom scan, per stage (median of runs).

    python benchmarks/bench_detect.py [--runs 5] [--resolution 256] [--out benchmarks/results/detect_cpu.json]

Models are loaded once (as `bmltrt detect` does for a batch); the first run is a warm-up.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info  # noqa: E402

from bmltrt.io import load_scan  # noqa: E402
from bmltrt.pipeline import DetectConfig, Detector  # noqa: E402
from bmltrt.report import write_outputs  # noqa: E402
from bmltrt.runtime.backends import make_backend  # noqa: E402
from bmltrt.synth.dataset import write_case  # noqa: E402
from bmltrt.synth.phantom import PhantomConfig, make_phantom  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results/detect_cpu.json")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    write_case(tmp, "b", "knee", make_phantom([3, 0], PhantomConfig(n_lesions=(2, 2))))
    path = tmp / "b" / "images" / "knee.nii.gz"
    backend, _ = make_backend("onnxruntime", a.device)
    det = Detector(backend, DetectConfig(resolution=a.resolution))
    rows = []
    for i in range(a.runs + 1):
        t0 = time.perf_counter()
        scan = load_scan(path)
        t1 = time.perf_counter()
        d = det.detect(scan)
        t2 = time.perf_counter()
        write_outputs(d, tmp / f"out{i}")
        t3 = time.perf_counter()
        rows.append({"load_s": t1 - t0, **d.timings, "write_s": t3 - t2, "end_to_end_s": t3 - t0})
    rows = rows[1:]
    med = {k: round(float(np.median([r[k] for r in rows])), 3) for k in rows[0]}
    res = {"benchmark": "bmltrt detect on one 448x448x36 phantom (load, femur, inpaint, post-process, write)",
           "backend": backend.name, "device": backend.device, "precision": backend.precision,
           "resolution": det.resolution, "slices_inpainted": d.report["slices_inpainted"],
           "median_s": med, "runs": a.runs, "machine": machine_info()}
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
