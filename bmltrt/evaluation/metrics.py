"""Segmentation and detection metrics, per case and pooled.

Conventions (stated once, tested):
- Voxel scores come from the confusion counts (tp, fp, fn, tn) over a region: the whole
  volume (every voxel of the scan) or the femur (voxels inside the true femur mask).
- Dice and IoU: both masks empty -> 1.0 (perfect agreement); truth empty and prediction
  not -> 0.0.
- Sensitivity is undefined (NaN) when the truth has no positive voxel; specificity is
  undefined when the region has no negative voxel. NaN is left out of per-case means.
- Pooled scores add the counts of all cases first, then score once.
- Lesion-wise: connected components in 3D (26-connectivity). A true lesion is detected
  when at least one predicted voxel overlaps it; a predicted component is a true
  positive when it overlaps at least one true lesion. Sensitivity = detected / true
  lesions (NaN without true lesions); precision = true-positive components / predicted
  components (NaN without predictions); F1 = harmonic mean, 0 when one side is 0 or
  undefined and the other is not, NaN when both are undefined.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi

_FULL = np.ones((3, 3, 3), bool)
REGIONS = ("volume", "femur")  # whole volume, and inside the true femur


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, o: "Counts") -> "Counts":
        return Counts(self.tp + o.tp, self.fp + o.fp, self.fn + o.fn, self.tn + o.tn)


def confusion(pred, truth, region=None) -> Counts:
    pred = np.asarray(pred).astype(bool)
    truth = np.asarray(truth).astype(bool)
    if pred.shape != truth.shape:
        raise ValueError(f"shape mismatch {pred.shape} vs {truth.shape}")
    if region is not None:
        region = np.asarray(region).astype(bool)
        pred, truth = pred[region], truth[region]
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred & ~truth))
    fn = int(np.count_nonzero(~pred & truth))
    tn = int(pred.size - tp - fp - fn)
    return Counts(tp, fp, fn, tn)


def _ratio(a: float, b: float) -> float:
    return float(a) / float(b) if b > 0 else float("nan")


def scores(c: Counts) -> dict[str, float]:
    empty = c.tp + c.fp + c.fn == 0
    return {
        "dice": 1.0 if empty else 2 * c.tp / (2 * c.tp + c.fp + c.fn),
        "iou": 1.0 if empty else c.tp / (c.tp + c.fp + c.fn),
        "sensitivity": _ratio(c.tp, c.tp + c.fn),
        "specificity": _ratio(c.tn, c.tn + c.fp),
        "accuracy": _ratio(c.tp + c.tn, c.tp + c.tn + c.fp + c.fn),
    }


def f1_score(sens: float, prec: float) -> float:
    """Harmonic mean; 0 when one side is 0 or undefined and the other is not; NaN when both are undefined."""
    if np.isnan(sens) and np.isnan(prec):
        return float("nan")
    if np.isnan(sens) or np.isnan(prec) or sens + prec == 0:
        return 0.0
    return 2 * sens * prec / (sens + prec)


def components(mask) -> tuple[np.ndarray, int]:
    return ndi.label(np.asarray(mask).astype(bool), structure=_FULL)


def lesion_detection(pred, truth) -> dict[str, float]:
    tl, nt = components(truth)
    pl, npred = components(pred)
    pred_b = np.asarray(pred).astype(bool)
    truth_b = np.asarray(truth).astype(bool)
    detected = len(np.unique(tl[pred_b & (tl > 0)])) if nt else 0
    true_pos = len(np.unique(pl[truth_b & (pl > 0)])) if npred else 0
    sens = _ratio(detected, nt)
    prec = _ratio(true_pos, npred)
    return {"n_true": nt, "n_pred": npred, "detected": detected, "true_positive_pred": true_pos,
            "lesion_sensitivity": sens, "lesion_precision": prec, "lesion_f1": f1_score(sens, prec)}


@dataclass
class CaseResult:
    case: str
    volume_counts: Counts
    femur_counts: Counts
    detection: dict
    lesion_volume_mm3: float

    def row(self) -> dict:
        r = {"case": self.case, "lesion_volume_mm3": self.lesion_volume_mm3}
        r.update({f"volume_{k}": v for k, v in scores(self.volume_counts).items()})
        r.update({f"femur_{k}": v for k, v in scores(self.femur_counts).items()})
        r.update(self.detection)
        return r


def evaluate_case(case: str, pred, truth, femur_truth, voxel_mm3: float) -> CaseResult:
    return CaseResult(case, confusion(pred, truth), confusion(pred, truth, femur_truth),
                      lesion_detection(pred, truth), float(np.count_nonzero(truth) * voxel_mm3))


def summarize(results: list[CaseResult]) -> dict:
    """Pooled and per-case-mean scores over both regions, lesion-wise detection, size groups."""
    out: dict = {"n_cases": len(results)}
    for region in REGIONS:
        pooled = Counts()
        for r in results:
            pooled = pooled + getattr(r, f"{region}_counts")
        per_case = [scores(getattr(r, f"{region}_counts")) for r in results]
        out[region] = {
            "pooled": scores(pooled),
            "per_case_mean": {k: _nanmean([p[k] for p in per_case]) for k in per_case[0]} if per_case else {},
            "counts": asdict(pooled),
        }
    det = [r.detection for r in results]
    nt = sum(d["n_true"] for d in det)
    npred = sum(d["n_pred"] for d in det)
    sens, prec = _ratio(sum(d["detected"] for d in det), nt), _ratio(sum(d["true_positive_pred"] for d in det), npred)
    out["lesion_wise"] = {"n_true": nt, "n_pred": npred, "sensitivity": sens, "precision": prec,
                          "f1": f1_score(sens, prec)}
    out["size_groups"] = size_groups(results)
    return out


def size_groups(results: list[CaseResult], n_groups: int = 5) -> list[dict]:
    """The paper's Figure 3: Dice and IoU per group of cases ranked by true lesion volume.

    Cases with lesions are split into `n_groups` groups of (nearly) equal size by volume;
    each group's Dice and IoU are the means of its cases' whole-volume scores. The groups
    depend on the truth only, so every method is grouped alike.
    """
    with_lesion = sorted((r for r in results if r.lesion_volume_mm3 > 0), key=lambda r: r.lesion_volume_mm3)
    if not with_lesion:
        return []
    groups = np.array_split(np.arange(len(with_lesion)), min(n_groups, len(with_lesion)))
    out = []
    for g in groups:
        rs = [with_lesion[i] for i in g]
        sc = [scores(r.volume_counts) for r in rs]
        out.append({"n_cases": len(rs),
                    "volume_mm3_min": rs[0].lesion_volume_mm3, "volume_mm3_max": rs[-1].lesion_volume_mm3,
                    "dice_mean": _nanmean([s["dice"] for s in sc]), "iou_mean": _nanmean([s["iou"] for s in sc])})
    return out


def _nanmean(v) -> float:
    a = np.asarray(v, float)
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else float("nan")
