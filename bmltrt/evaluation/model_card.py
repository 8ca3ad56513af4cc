"""The model card's figures: femur Dice of the segmenter, and the inpainter's masked L1
against simple fills, on a dataset split (`bmltrt evaluate model-card DATA`).

Segmenter: Dice of the cleaned-up femur mask on the scan's own grid, per case, and the
ceiling its coarse working grid sets (the true mask taken to that grid and back).
Inpainter: on healthy slices (no lesion) with femur, at the working resolution, mask =
the femur dilated as in `detect`; masked L1 (normalised intensities, 0..1.5) of
  - the LaMa generator's composite,
  - "ring mean": the mask filled with the mean of a 3 mm ring around it,
  - "blurred fill": normalised convolution (Gaussian, sigma 5 mm) of the known pixels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from bmltrt.errors import BmlError
from bmltrt.evaluation.maps import load_truth_mask
from bmltrt.evaluation.metrics import confusion, scores
from bmltrt.io import load_scan
from bmltrt.pipeline import MIN_FEMUR_SLICE_MM2, inpainter_pixel_mm
from bmltrt.runtime.preprocess import inplane_shape, normalize_intensity, slices_to_square, zoom_to
from bmltrt.synth.dataset import case_paths


def ring_mean_fill(x, m, ring_px):
    out = x.copy()
    for i in range(len(x)):
        ring = ndi.binary_dilation(m[i], iterations=ring_px) & ~m[i]
        out[i][m[i]] = x[i][ring].mean() if ring.any() else x[i][~m[i]].mean()
    return out


def blurred_fill(x, m, sigma_px):
    known = (~m).astype(np.float32)
    num = ndi.gaussian_filter(x * known, sigma=(0, sigma_px, sigma_px))
    den = ndi.gaussian_filter(known, sigma=(0, sigma_px, sigma_px))
    fill = num / np.maximum(den, 1e-6)
    return np.where(m, fill, x)


def masked_l1(a, b, m):
    return float(np.abs(a - b)[m].mean())


def model_card(det, data, split: str = "test", limit: int | None = None, progress=None) -> dict:
    res = det.resolution
    femur_dice, ceiling, l1 = [], [], {"lama": [], "ring_mean": [], "blurred_fill": []}
    n_slices = 0
    cases = case_paths(data, split)[:limit]
    for k, (case, img_p, fem_p, les_p) in enumerate(cases):
        if progress:
            progress(k, len(cases), case)
        scan = load_scan(img_p)
        fem_true = load_truth_mask(fem_p, img_p).data > 0
        les = load_truth_mask(les_p, img_p).data > 0
        norm = normalize_intensity(scan.data)
        femur = det.segment_femur(norm, scan.spacing)
        femur_dice.append(scores(confusion(femur, fem_true))["dice"])
        # What the coarse working grid costs at best: the true mask taken to the
        # segmenter's grid and back, as its probabilities are.
        small = zoom_to(fem_true.astype(np.float32),
                        inplane_shape(fem_true.shape, scan.spacing, det.seg_cfg["inplane_spacing_mm"]))
        ceiling.append(scores(confusion(zoom_to(small, fem_true.shape) > 0.5, fem_true))["dice"])
        sp = scan.spacing
        area = fem_true.reshape(len(fem_true), -1).sum(1) * sp[1] * sp[2]
        healthy = np.flatnonzero((area > MIN_FEMUR_SLICE_MM2) & ~les.any(axis=(1, 2)))
        if healthy.size == 0:
            continue
        # The generator's composite, exactly as detect makes it (true femur as the mask).
        comp, done = det.inpaint(norm, fem_true, sp)
        fp = det.repainting_footprint(norm.shape, sp)
        mask_full = fem_true[healthy] if fp is None else ndi.binary_dilation(fem_true[healthy], structure=fp)
        px = (sp[1], sp[2])  # the inpainter's square pixels, as detect pads
        x = slices_to_square(norm[healthy], res, pixel_mm=px)
        m = slices_to_square(mask_full.astype(np.float32), res, pixel_mm=px) > 0.5
        lama = slices_to_square(comp[healthy], res, pixel_mm=px)
        px_mm = inpainter_pixel_mm(norm.shape, sp, res)
        l1["lama"].append(masked_l1(lama, x, m) * len(healthy))
        l1["ring_mean"].append(masked_l1(ring_mean_fill(x, m, max(1, int(round(3 / px_mm)))), x, m) * len(healthy))
        l1["blurred_fill"].append(masked_l1(blurred_fill(x, m, 5 / px_mm), x, m) * len(healthy))
        n_slices += len(healthy)
    if not femur_dice:
        raise BmlError(f"the {split} split of the dataset is empty", data)
    return {"data": str(data), "split": split, "resolution": res, "cases": len(femur_dice),
            "femur_dice_mean": float(np.mean(femur_dice)), "femur_dice_min": float(np.min(femur_dice)),
            "femur_dice_ceiling_of_working_grid": float(np.mean(ceiling)),
            "segmenter_inplane_mm": det.seg_cfg["inplane_spacing_mm"],
            "healthy_slices": n_slices,
            "masked_l1": {k: float(np.sum(v) / max(n_slices, 1)) for k, v in l1.items()},
            "backend": det.backend.name, "device": det.backend.device, "precision": det.backend.precision,
            "models": {"segmenter": det.seg_entry["sha256"], det.inp_name: det.inp_entry["sha256"]}}
