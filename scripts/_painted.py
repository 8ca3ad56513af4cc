"""What the measurement scripts share: their common options, a Detector on ONNX Runtime CPU
with a val-tuned post-processing, the cases of one split of a `bmltrt synth` dataset, and
the JSON they write (machine, backend, date and command named)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np


def parser(doc: str, split: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--params", type=Path, required=True)
    ap.add_argument("--split", default=split)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--models", type=Path, default=None)
    ap.add_argument("-o", "--out", type=Path, required=True)
    return ap


def detector(a, **config):
    """The shipped models (or --models) with --params' settings for --resolution."""
    from bmltrt.pipeline import DetectConfig, Detector
    from bmltrt.postprocess.lesion import PostConfig
    from bmltrt.runtime.backends import make_backend

    post = PostConfig.from_dict(json.loads(a.params.read_text())["by_resolution"][str(a.resolution)])
    return Detector(make_backend("onnxruntime", "cpu", models_dir=a.models)[0],
                    DetectConfig(resolution=a.resolution, post=post, **config))


def case_ids(a) -> list[str]:
    return json.loads((a.data / "dataset.json").read_text())["splits"][a.split]


def cases(a):
    """(case id, scan, normalised volume, true femur, true lesion) of each case of --split."""
    from bmltrt.io import load_scan
    from bmltrt.runtime.preprocess import normalize_intensity

    d = a.data / a.split
    for cid in case_ids(a):
        scan = load_scan(d / "images" / f"{cid}.nii.gz")
        true_femur = load_scan(d / "femur" / f"{cid}.nii.gz", is_mask=True).data > 0.5
        truth = load_scan(d / "lesion" / f"{cid}.nii.gz", is_mask=True).data > 0.5
        yield cid, scan, normalize_intensity(scan.data.astype(np.float32)), true_femur, truth


def add_counts(counts: list, mask, truth) -> None:
    """Add one case's [true-positive, predicted, true] lesion voxels to `counts` in place."""
    counts[0] += int((mask & truth).sum())
    counts[1] += int(mask.sum())
    counts[2] += int(truth.sum())


def pooled(tp: int, pred: int, true: int) -> dict:
    """Pooled lesion scores from voxel counts summed over the cases."""
    return {"dice": 2 * tp / max(1, pred + true), "sensitivity": tp / max(1, true),
            "precision": tp / max(1, pred), "tp": tp, "pred": pred, "true": true}


def lesion_row(tp: int, pred: int, true: int) -> dict:
    """pooled() with its scores named lesion_dice, lesion_sensitivity, lesion_precision."""
    return {k if k in ("tp", "pred", "true") else "lesion_" + k: v for k, v in pooled(tp, pred, true).items()}


def write(a, det, script: str, name: str, **fields) -> Path:
    """--out/name: the run's settings and `fields`, written atomically."""
    from bmltrt.bench.machine import cpu_name, usable_cores
    from bmltrt.io.atomic import atomic_write

    doc = {"data": str(a.data), "split": a.split, "cases": len(case_ids(a)), "resolution": a.resolution,
           "post_processing": det.config.post.to_dict(), "params_from": str(a.params),
           "models": str(a.models or "shipped (export/)"), "backend": "onnxruntime cpu fp32",
           "machine": f"{cpu_name()}, {usable_cores()} cores", "date": dt.date.today().isoformat(),
           "command": f"python scripts/{script} " + " ".join(sys.argv[1:]), **fields}
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / name
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1)))
    return path
