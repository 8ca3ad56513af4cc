"""Benchmark: time to generate one 448x448x36 phantom case (median of several runs).

    python benchmarks/bench_synth.py [--runs 7] [--out benchmarks/results/synth_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info  # noqa: E402

from bmltrt.synth.phantom import PhantomConfig, make_phantom  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/synth_cpu.json")
    a = ap.parse_args()
    make_phantom([0, 0], PhantomConfig(n_lesions=(2, 2)))  # warm-up (imports, caches)
    times = []
    for i in range(a.runs):
        t = time.perf_counter()
        make_phantom([1, i], PhantomConfig(n_lesions=(2, 2)))
        times.append(time.perf_counter() - t)
    res = {"benchmark": "one 448x448x36 phantom case with 2 lesions (in memory, no file writing)",
           "median_s": float(np.median(times)), "min_s": float(min(times)), "max_s": float(max(times)),
           "runs": a.runs, "machine": machine_info()}
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
