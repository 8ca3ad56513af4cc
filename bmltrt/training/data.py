"""Training data from a `bmltrt synth` dataset, on each network's working grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bmltrt.io import load_scan
from bmltrt.runtime.preprocess import inplane_shape, normalize_intensity, slices_to_square, zoom_to
from bmltrt.synth.dataset import case_paths

MIN_FEMUR_FRACTION = 0.002  # a slice "contains femur" above this share of its pixels


def segmenter_volumes(root: Path, split: str, inplane_mm: float, limit: int | None = None):
    """[(case, image (S,H',W') normalised, femur (S,H',W') float, voxel mm)] on the segmenter grid."""
    out = []
    for case, img_p, fem_p, _ in case_paths(root, split)[:limit]:
        scan = load_scan(img_p)
        fem = load_scan(fem_p, is_mask=True).data
        shape = inplane_shape(scan.data.shape, scan.spacing, inplane_mm)
        img = zoom_to(normalize_intensity(scan.data), shape)
        voxel = (scan.spacing[0], inplane_mm, inplane_mm)
        out.append((case, img.astype(np.float32), (zoom_to(fem, shape) > 0.5).astype(np.float32), voxel))
    return out


def inpainter_slices(root: Path, split: str, res: int, healthy_only: bool = True, limit: int | None = None):
    """Images (N, res, res) normalised and femur masks (N, res, res) of slices with femur.

    With `healthy_only`, slices whose lesion mask is non-empty are left out: the generator
    must learn healthy marrow only.
    """
    imgs, masks, names = [], [], []
    for case, img_p, fem_p, les_p in case_paths(root, split)[:limit]:
        scan = load_scan(img_p)
        fem = load_scan(fem_p, is_mask=True).data > 0.5
        les = load_scan(les_p, is_mask=True).data > 0.5 if les_p.exists() else np.zeros_like(fem)
        norm = normalize_intensity(scan.data)
        keep = fem.mean(axis=(1, 2)) > MIN_FEMUR_FRACTION
        if healthy_only:
            keep &= ~les.any(axis=(1, 2))
        idx = np.flatnonzero(keep)
        if idx.size == 0:
            continue
        imgs.append(slices_to_square(norm[idx], res))
        masks.append(slices_to_square(fem[idx].astype(np.float32), res) > 0.5)
        names += [f"{case}:{i}" for i in idx]
    if not imgs:
        return np.zeros((0, res, res), np.float32), np.zeros((0, res, res), bool), []
    return np.concatenate(imgs), np.concatenate(masks), names
