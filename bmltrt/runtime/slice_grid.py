"""Thin-slice scans to the models' slice thickness, and masks back.

The segmenter and the inpainter were trained on sagittal slices of about 3 mm (OAI
IW-TSE; the phantoms; label-painted data at 2-4.5 mm). A 3D isotropic or thin-slice scan
(DESS, SPACE, CUBE: 0.3-1 mm) fed as it is would show them slices thinner and noisier
than anything they have seen. So a scan whose slices (left-right spacing) are thinner
than THIN_SLICE_MM is averaged into slabs of about MODEL_SLICE_MM (partial volume, as
a thick-slice acquisition would see it), detected there, and each mask is brought back
to the input's slices by the same overlaps: an input slice is in the mask when the
slabs it overlaps are, weighted by overlap, at least half in it.
In-plane the models resample themselves; nothing changes there.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

THIN_SLICE_MM = 2.0
MODEL_SLICE_MM = 3.0


def needs_reslicing(spacing) -> bool:
    return float(spacing[0]) < THIN_SLICE_MM


def slab_overlaps(n_in: int, d_in: float, d_out: float = MODEL_SLICE_MM) -> np.ndarray:
    """(n_out, n_in) overlap in mm of each output slab with each input slice.

    The slabs tile the input's extent exactly (their thickness is adjusted to the nearest
    whole number of slabs, so it lies within a few percent of `d_out` on real scans).
    """
    length = n_in * d_in
    n_out = max(1, int(round(length / d_out)))
    edges_in = np.arange(n_in + 1) * d_in
    edges_out = np.linspace(0.0, length, n_out + 1)
    lo = np.maximum(edges_out[:-1, None], edges_in[None, :-1])
    hi = np.minimum(edges_out[1:, None], edges_in[None, 1:])
    return np.clip(hi - lo, 0.0, None)


def to_model_slices(scan):
    """(scan on slabs of ~MODEL_SLICE_MM, overlaps) for a thin-slice scan."""
    ov = slab_overlaps(scan.data.shape[0], scan.spacing[0])
    down = ov / ov.sum(axis=1, keepdims=True)
    data = np.tensordot(down.astype(np.float32), scan.data, axes=(1, 0)).astype(np.float32)
    slab_mm = scan.data.shape[0] * scan.spacing[0] / ov.shape[0]
    thick = replace(scan, data=np.ascontiguousarray(data), spacing=(float(slab_mm), *scan.spacing[1:]),
                    warnings=list(scan.warnings))
    return thick, ov


def mask_to_input_slices(mask: np.ndarray, overlaps: np.ndarray) -> np.ndarray:
    """A slab mask (n_out, H, W) back onto the input's thin slices (n_in, H, W), uint8."""
    up = overlaps.T / overlaps.T.sum(axis=1, keepdims=True)
    frac = np.tensordot(up.astype(np.float32), mask.astype(np.float32), axes=(1, 0))
    return (frac >= 0.5).astype(np.uint8)
