"""Measurement (not shipped): the segmenter's femur probability averaged over sub-pixel shifts
of its 1.6 mm grid, on the real qDESS echoes. SHIFTS (environment): "0,0;2,2" (shifts in the
scan's own pixels, rows,columns) or "half" (none, half a grid pixel in rows, in columns, both).

    SHIFTS=half python benchmarks/results/segmenter_shift_tta/shift_tta.py real --models export -o OUT
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
import numpy as np

from bmltrt import pipeline
from bmltrt.runtime.preprocess import to_segmenter_grid, zoom_to

SPEC = os.environ.get("SHIFTS", "half")


def shifts_for(spacing, grid_mm):
    if SPEC != "half":
        return [tuple(int(v) for v in s.split(",")) for s in SPEC.split(";")]
    h = [max(1, round(0.5 * grid_mm / s)) for s in spacing[1:]]
    return [(0, 0), (h[0], 0), (0, h[1]), (h[0], h[1])]


def femur_probability(self, norm, spacing, on_patch=None):
    c, cfg = self.config, self.seg_cfg
    grid_mm = cfg["inplane_spacing_mm"]
    shifts = shifts_for(spacing, grid_mm)
    rescue = c.seg_antialias > 0 and c.lesion_rescue_percentile > 0
    sums = [np.zeros(norm.shape, np.float32) for _ in range(2 if rescue else 1)]
    count = np.zeros(norm.shape[1:], np.float32)
    thr_src = None
    for dy, dx in shifts:
        part = norm[:, dy:, dx:]
        grids = [to_segmenter_grid(part, spacing, grid_mm, c.seg_antialias)]
        if rescue:
            grids.append(to_segmenter_grid(part, spacing, grid_mm))
        def window(vol):
            return pipeline.sliding_window(vol, tuple(cfg["patch"]), lambda b: self.backend.run("segmenter", b),
                                           batch_size=self.seg_batch, overlap=cfg["overlap"])[1]
        for g, small in enumerate(grids):
            prob = window(small)
            if c.mirror_tta:
                prob = 0.5 * (prob + np.flip(window(np.ascontiguousarray(np.flip(small, 0))), 0))
            if (dy, dx) == (0, 0) and g == 0:
                thr_src = (grids, prob)
            sums[g][:, dy:, dx:] += zoom_to(prob, part.shape, order=1)
        count[dy:, dx:] += 1
    probs = [s / count for s in sums]
    smooth = self.refine_probability(norm, probs[0], spacing)
    if not rescue:
        return smooth
    grids, p0 = thr_src
    bright = pipeline.masked_percentile(grids[1], p0 > c.femur_threshold, c.lesion_rescue_percentile)
    sharp = self.refine_probability(norm, probs[1], spacing)
    return np.maximum(smooth, sharp * (norm > bright))


pipeline.Detector.femur_probability = femur_probability

if __name__ == "__main__":
    which = sys.argv[1]
    if which == "real":
        import real_scans
        sys.exit(real_scans.main(sys.argv[2:]))
    else:
        from bmltrt.cli import main as cli
        sys.argv = ["bmltrt"] + sys.argv[2:]
        sys.exit(cli())
