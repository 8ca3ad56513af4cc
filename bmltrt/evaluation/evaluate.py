"""Run the detector over a dataset split and score it against the exact ground truth."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np

from bmltrt.errors import BmlError
from bmltrt.io import load_scan
from bmltrt.metrics import CaseResult, confusion, evaluate_case, scores, summarize
from bmltrt.synth.dataset import case_paths


def _clean(o):
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (np.floating, np.integer)):
        return _clean(o.item())
    return o


def evaluate_split(det, data: Path, split: str, out_dir: Path, limit: int | None = None, progress=None) -> dict:
    cases = case_paths(data, split)[:limit]
    results: list[CaseResult] = []
    femur_dice, times, refused = [], [], []
    for k, (case, img_p, fem_p, les_p) in enumerate(cases):
        if progress:
            progress(k, len(cases), case)
        scan = load_scan(img_p)
        truth = load_scan(les_p, is_mask=True).data > 0
        femur = load_scan(fem_p, is_mask=True).data > 0
        t0 = time.perf_counter()
        try:
            d = det.detect(scan)
            pred_les, pred_fem = d.lesion, d.femur
        except BmlError:  # refused (no plausible femur): it found nothing
            pred_les = pred_fem = np.zeros(truth.shape, np.uint8)
            refused.append(case)
        times.append(time.perf_counter() - t0)
        results.append(evaluate_case(case, pred_les, truth, femur, scan.voxel_volume_mm3))
        femur_dice.append(scores(confusion(pred_fem, femur))["dice"])
    if progress:
        progress(len(cases), len(cases), "done")
    summary = summarize(results)
    summary.update({
        "data": str(data), "split": split,
        "femur_dice_mean": float(np.mean(femur_dice)) if femur_dice else None,
        "femur_dice_min": float(np.min(femur_dice)) if femur_dice else None,
        "refused": refused,
        "seconds_per_scan_median": float(np.median(times)) if times else None,
        "backend": det.backend.name, "device": det.backend.device, "precision": det.backend.precision,
        "resolution": det.resolution, "config": det.config.to_dict(),
        "models": {"segmenter": det.seg_entry["sha256"], det.inp_name: det.inp_entry["sha256"]},
    })
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [dict(r.row(), femur_dice=fd) for r, fd in zip(results, femur_dice)]
    (out_dir / "evaluation.json").write_text(json.dumps(_clean({"summary": summary, "cases": rows}), indent=1))
    if rows:
        with open(out_dir / "cases.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return summary


def print_summary(s: dict, console) -> None:
    from rich.table import Table

    t = Table(title=f"{s['split']} split of {s['data']}: {s['n_cases']} cases, {s['backend']} "
                    f"{s['device']} {s['precision']}, resolution {s['resolution']}")
    for c in ("region", "mean", "Dice", "IoU", "Sens", "Spec", "Acc"):
        t.add_column(c)
    for region in ("slice", "femur"):
        for kind in ("pooled", "per_case_mean"):
            v = s[region][kind]
            t.add_row(region, kind, *[f"{v[k]:.3f}" for k in ("dice", "iou", "sensitivity", "specificity", "accuracy")])
    console.print(t)
    lw = s["lesion_wise"]
    console.print(f"lesion-wise: {lw['n_true']} true, {lw['n_pred']} predicted; sensitivity {lw['sensitivity']:.3f} "
                  f"precision {lw['precision']:.3f} F1 {lw['f1']:.3f}; femur Dice {s['femur_dice_mean']:.4f}; "
                  f"{s['seconds_per_scan_median']:.1f} s/scan")
