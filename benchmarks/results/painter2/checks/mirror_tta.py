"""One-off check (2026-12-06): does averaging the segmenter over the sagittal mirror (left/right,
an augmentation of its training) help? Painted-OAI val at 256 (femur Dice, pooled lesion Dice)
and the real qDESS echo-1/echo-2 femur Dice. Run from the repository root:

    python benchmarks/results/painter2/checks/mirror_tta.py DATA --params export/postprocess.json -o OUT
"""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, "scripts")
import _painted  # noqa: E402
from bmltrt.io import load_scan  # noqa: E402
from bmltrt.runtime.preprocess import inplane_shape, normalize_intensity, zoom_to  # noqa: E402
from bmltrt.runtime.sliding_window import sliding_window  # noqa: E402

REAL = Path("../shared/data/real")
ECHOES = ("pykneer_qdess_echo1_oailike_448x448x40.nii.gz", "pykneer_qdess_echo2_oailike_448x448x40.nii.gz")


def masks(det, norm, spacing):
    """Femur masks without and with the mirrored pass averaged in."""
    cfg = det.seg_cfg
    small = zoom_to(norm, inplane_shape(norm.shape, spacing, cfg["inplane_spacing_mm"]))

    def prob(x):
        return sliding_window(x, tuple(cfg["patch"]), lambda b: det.backend.run("segmenter", b),
                              batch_size=det.seg_batch, overlap=cfg["overlap"])[1]

    p0 = prob(small)
    p1 = prob(np.ascontiguousarray(small[::-1]))[::-1]
    out = {}
    for k, p in (("plain", p0), ("mirror", (p0 + p1) / 2)):
        full = det.refine_probability(norm, zoom_to(np.ascontiguousarray(p), norm.shape, order=1), spacing)
        out[k] = det.femur_mask(full, spacing)
    return out


def main():
    a = _painted.parser(__doc__, "val").parse_args()
    det = _painted.detector(a)
    acc = {k: [0, 0, 0] for k in ("plain", "mirror")}
    dice = {k: [] for k in acc}
    for cid, scan, norm, tf, truth in _painted.cases(a):
        for k, femur in masks(det, norm, scan.spacing).items():
            dice[k].append(float(2 * (femur & tf).sum() / (femur.sum() + tf.sum())))
            comp, keep = det.inpaint(norm, femur, scan.spacing)
            _painted.add_counts(acc[k], det.postprocess(norm, comp, femur, keep, scan.spacing), truth)
        print(cid, flush=True)
    echo = {}
    if all((REAL / f).exists() for f in ECHOES):
        m = []
        for f in ECHOES:
            scan = load_scan(REAL / f)
            m.append(masks(det, normalize_intensity(scan.data), scan.spacing))
        echo = {k: float(2 * (m[0][k] & m[1][k]).sum() / (m[0][k].sum() + m[1][k].sum())) for k in acc}
    res = {k: {"femur_dice_mean": float(np.mean(dice[k])), **_painted.pooled(*acc[k]), "echo_dice": echo.get(k)}
           for k in acc}
    _painted.write(a, det, "../benchmarks/results/painter2/checks/mirror_tta.py", "mirror_tta_val.json", results=res)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
