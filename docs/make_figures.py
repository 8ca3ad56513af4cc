"""Render the README's pictures from a phantom (never from real data).

    python docs/make_figures.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bmltrt.io import load_scan
from bmltrt.pipeline import Detector
from bmltrt.report import overlay_png
from bmltrt.runtime.backends import make_backend
from bmltrt.synth.dataset import write_case
from bmltrt.synth.phantom import PhantomConfig, make_phantom

DOCS = Path(__file__).parent


def _gray(a, lo, hi):
    return (np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def main():
    ph = make_phantom([5, 0], PhantomConfig(n_lesions=(2, 2)))
    img = ph.image.astype(np.float32)
    lo, hi = np.percentile(img, [0.5, 99.5])
    les_slices = np.flatnonzero(ph.lesion.any(axis=(1, 2)))
    picks = [8, 26, int(les_slices[len(les_slices) // 2])]
    tiles = []
    for s in picks:
        t = Image.fromarray(_gray(img[s], lo, hi)).convert("RGB")
        ImageDraw.Draw(t).text((6, 4), f"sagittal slice {s}", fill=(0, 255, 255))
        tiles.append(t)
    sheet = Image.new("RGB", (448 * 3, 448))
    for k, t in enumerate(tiles):
        sheet.paste(t, (448 * k, 0))
    sheet.resize((448 * 3 * 2 // 3, 448 * 2 // 3), Image.BILINEAR).save(DOCS / "phantom.png")

    tmp = Path(tempfile.mkdtemp())
    write_case(tmp, "d", "phantom", ph)
    scan = load_scan(tmp / "d" / "images" / "phantom.nii.gz")
    det = Detector(make_backend("onnxruntime", "cpu")[0]).detect(scan)
    overlay_png(det.normalized, det.femur, det.lesion, DOCS / "phantom_overlay.png", scan.spacing,
                title=f"phantom: {det.report['lesion_count']} lesion(s) found, {det.report['lesion_volume_mm3']:.0f} mm3")


if __name__ == "__main__":
    main()
