"""Measured, not shipped: other ways to turn the scan x and its repainting x~ into the anomaly
map, against the paper's max(HE(x) - HE(x~), 0) with HE over the whole slice; and where the
missed lesion voxels of the paper's map lie (outside the predicted femur; bright in the scan
but repainted bright too; bright but under the floor; not bright in the scan at all).

    python scripts/lesion_map_variants.py /work/runs/oai_painted2 \
        --params benchmarks/results/oai_painted_test/postprocess.json --split val \
        --work /work/runs/lesion_maps -o benchmarks/results/lesion_map_variants

Variants (each thresholded by max(Otsu per slice, floor), opening 1.2 mm, no closing,
10 mm^2, as the val-tuned shipped setting; every floor of FLOORS tried, the best kept):
- slice: the paper's (shipped);
- femur: HE over the predicted femur only (marrow percentiles instead of slice percentiles);
- robust_z: (x - x~) in robust standard deviations (MAD) of the slice's femur residual, / 10;
- smooth_diff: the paper's map smoothed in-plane (Gaussian 0.5 mm, normalised inside the femur);
- smooth_input: x and x~ smoothed in-plane (0.5 mm) before HE;
- union_intensity: the paper's mask OR the femur's brightest voxels (HE over the femur > q).

The repainting (the shipped segmenter's femur and inpainter at --resolution) is computed once
per case and kept in --work, so a second run only scores. Writes
lesion_map_variants_<data folder name>_<split>.json.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage as ndi

import _painted
from bmltrt.evaluation.metrics import f1_score, lesion_detection
from bmltrt.postprocess.lesion import PostConfig, equalize_hist, mask_from_anomaly, otsu_thresholds

FLOORS = {"slice": (0.3, 0.35, 0.4, 0.45, 0.5), "femur": (0.3, 0.4, 0.5, 0.6, 0.7),
          "robust_z": (0.2, 0.3, 0.4, 0.5), "smooth_diff": (0.25, 0.3, 0.35, 0.4, 0.5),
          "smooth_input": (0.3, 0.35, 0.4, 0.5), "union_intensity": (0.4, 0.45, 0.5)}
UNION_Q = (0.98, 0.985, 0.99, 0.995)
SMOOTH_MM = 0.5


def he_diff(x, xt, region=None):
    return np.maximum(equalize_hist(x, mask=region) - equalize_hist(xt, mask=region), 0.0)


def smooth(a, px: float):
    s = SMOOTH_MM / px
    return ndi.gaussian_filter(a, (0, s, s))


def variant_map(kind: str, x, xt, fem, px: float) -> np.ndarray:
    if kind in ("slice", "union_intensity"):
        d = he_diff(x, xt)
    elif kind == "femur":
        d = he_diff(x, xt, fem)
    elif kind == "robust_z":
        d = np.zeros_like(x)
        for i in range(len(x)):
            if fem[i].sum() < 10:
                continue
            r = (x[i] - xt[i])[fem[i]]
            med = np.median(r)
            mad = 1.4826 * np.median(np.abs(r - med))
            d[i] = np.maximum((x[i] - xt[i] - med) / max(mad, 1e-6), 0) / 10.0
    elif kind == "smooth_diff":
        d = smooth(he_diff(x, xt) * fem, px) / np.maximum(smooth(fem.astype(np.float32), px), 1e-3)
    elif kind == "smooth_input":
        d = he_diff(smooth(x, px), smooth(xt, px))
    else:
        raise ValueError(kind)
    return (d * fem).astype(np.float32)


def collect(a, det):
    """Per case: x, x~, predicted femur, truth on the repainted slices (cached in --work)."""
    a.work.mkdir(parents=True, exist_ok=True)
    for cid, scan, norm, true_femur, truth in _painted.cases(a):
        p = a.work / f"{cid}_{a.resolution}.npz"
        if not p.exists():
            femur = np.asarray(det.segment_femur(norm, scan.spacing), bool)
            comp, keep = det.inpaint(norm, femur, scan.spacing)
            idx = np.flatnonzero(np.asarray(keep))
            tmp = p.with_suffix(".part.npz")
            np.savez_compressed(tmp, x=norm[idx], xt=np.asarray(comp)[idx], femur=femur[idx], truth=truth[idx],
                                truth_elsewhere=int(truth.sum() - truth[idx].sum()), px=float(scan.spacing[1]))
            tmp.replace(p)
            print(cid, "repainted", flush=True)
        with np.load(p) as z:
            yield cid, {k: z[k] for k in z.files}


def score(cases, kind: str, floor: float, q: float | None = None) -> dict:
    acc, det = [0, 0, 0], [0, 0, 0, 0]
    for z in cases:
        fem, tr, px = z["femur"].astype(bool), z["truth"].astype(bool), float(z["px"])
        d = z["maps"][kind]
        cfg = PostConfig(floor=floor, otsu_scope="slice", opening_mm=1.2, closing_mm=0.0, min_area_mm2=10.0)
        m = np.asarray(mask_from_anomaly(d, otsu_thresholds(d, fem), fem, (px, px), cfg), bool)
        if q is not None:
            hi = z["maps"]["intensity"]
            m |= np.asarray(mask_from_anomaly(hi, otsu_thresholds(hi, fem), fem, (px, px),
                                              PostConfig(floor=q, otsu_scope="none", opening_mm=1.2,
                                                         closing_mm=0.0, min_area_mm2=10.0)), bool)
        _painted.add_counts(acc, m, tr)
        acc[2] += int(z["truth_elsewhere"])
        ld = lesion_detection(m, tr)
        for i, k in enumerate(("n_true", "detected", "n_pred", "true_positive_pred")):
            det[i] += ld[k]
    sens, prec = det[1] / max(1, det[0]), det[3] / max(1, det[2])
    return {"variant": kind, "floor": floor, "union_q": q, **_painted.lesion_row(*acc),
            "lesions_found": f"{det[1]}/{det[0]}", "lesion_f1": f1_score(sens, prec)}


def misses(cases, floor: float) -> dict:
    """Where the paper's map (at `floor`) misses lesion voxels; bright = HE(x) above the 99th
    percentile of the case's healthy predicted femur."""
    out = dict.fromkeys(("found", "outside predicted femur", "bright, repainted bright",
                         "bright, difference under the floor", "not bright in the scan"), 0)
    for z in cases:
        fem, tr, px = z["femur"].astype(bool), z["truth"].astype(bool), float(z["px"])
        if not tr.any():
            continue
        d = z["maps"]["slice"]
        cfg = PostConfig(floor=floor, otsu_scope="slice", opening_mm=1.2, closing_mm=0.0, min_area_mm2=10.0)
        m = np.asarray(mask_from_anomaly(d, otsu_thresholds(d, fem), fem, (px, px), cfg), bool)
        hx, hxt = equalize_hist(z["x"]), equalize_hist(z["xt"])
        healthy = fem & ~ndi.binary_dilation(tr, iterations=3)
        t = np.percentile(hx[healthy], 99)
        miss, inside = tr & ~m, tr & ~m & fem
        out["found"] += int((tr & m).sum())
        out["outside predicted femur"] += int((miss & ~fem).sum())
        out["bright, repainted bright"] += int((inside & (hx > t) & (hxt > t)).sum())
        out["bright, difference under the floor"] += int((inside & (hx > t) & (hxt <= t)).sum())
        out["not bright in the scan"] += int((inside & (hx <= t)).sum())
    return out


def main(argv=None) -> int:
    ap = _painted.parser(__doc__, "val")
    ap.add_argument("--work", type=_painted.Path, required=True, help="folder for the repainted slices")
    a = ap.parse_args(argv)
    det = _painted.detector(a)
    cases = []
    for cid, z in collect(a, det):
        fem, px = z["femur"].astype(bool), float(z["px"])
        z["maps"] = {k: variant_map(k, z["x"], z["xt"], fem, px) for k in FLOORS if k != "union_intensity"}
        z["maps"]["union_intensity"] = z["maps"]["slice"]
        z["maps"]["intensity"] = (equalize_hist(z["x"], mask=fem) * fem).astype(np.float32)
        cases.append(z)
    rows = []
    for kind, floors in FLOORS.items():
        qs = UNION_Q if kind == "union_intensity" else (None,)
        for floor, q in itertools.product(floors, qs):
            rows.append(score(cases, kind, floor, q))
            r = rows[-1]
            print(f"{kind:16s} floor {floor:.2f} q {q}: Dice {r['lesion_dice']:.3f} F1 {r['lesion_f1']:.3f} "
                  f"found {r['lesions_found']}", flush=True)
    best = {k: max((r for r in rows if r["variant"] == k), key=lambda r: r["lesion_dice"]) for k in FLOORS}
    shipped_floor = det.config.post.floor
    path = _painted.write(a, det, "lesion_map_variants.py", f"lesion_map_variants_{a.data.name}_{a.split}.json",
                          best_per_variant=best, rows=rows, misses_at_shipped_floor=misses(cases, shipped_floor))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
