"""Input-level rules: is this plausibly a knee MR image at all? (before any network runs)

Each rule is cheap, stated here and in the README, and never fires on the real knees in
``../shared/data/real`` nor on ``bmltrt synth`` phantoms (tests/test_knee_input.py):

- our own output masks (header ``descrip`` "bmltrt mask") are refused;
- a mask or label map (at most MAX_LABEL_VALUES distinct values) is refused;
- blank: the 1st and 99th percentiles differ by at most 0.1% of their size (98% of the
  voxels share about one value: no contrast; real knees span ~100%) is refused;
- noise: neighbouring voxels of an MR image are strongly alike (anatomy is smooth on the
  scale of a voxel: their lag-1 correlation in-plane is > 0.95 on every real
  knee and phantom here); white noise has ~0. Below MIN_NEIGHBOUR_CORRELATION it is refused;
- geometry: a knee series covers at least MIN_PLANE_MM x MIN_PLANE_MM in the sagittal
  plane and MIN_COVERAGE_MM left to right, and at most MAX_EXTENT_MM along any axis;
  slices thicker than MAX_SLICE_MM are refused, thicker than the models' training range
  (WARN_SLICE_MM) are warned about.

The femur-plausibility check (is the *segmented femur* a femur?) runs after segmentation:
see ``bmltrt.postprocess.femur_check``.
"""

from __future__ import annotations

import numpy as np

from bmltrt.errors import BmlError
from bmltrt.io.nifti import Scan
from bmltrt.io.outputs import MASK_DESCRIP

MAX_LABEL_VALUES = 16
BLANK_REL_RANGE = 1e-3
MIN_NEIGHBOUR_CORRELATION = 0.3
MIN_PLANE_MM = 50.0  # a distal femur alone is ~60 mm front to back
MIN_COVERAGE_MM = 20.0  # left-right: a handful of sagittal slices
MAX_EXTENT_MM = 600.0  # a whole-leg series, not a knee
MAX_SLICE_MM = 8.0
WARN_SLICE_MM = 4.5  # the models were trained on 2-4.5 mm slices
WARN_PIXEL_MM = 1.2  # trained on 0.3-0.7 mm pixels; twice the top of that range
SAMPLE_VOXELS = 1_000_000


def _sample_slices(data: np.ndarray) -> np.ndarray:
    """Every k-th slice, so that the rules look at ~SAMPLE_VOXELS voxels (fast on big scans)."""
    step = max(1, int(np.ceil(data.size / SAMPLE_VOXELS)))
    return data[:: min(step, data.shape[0])] if data.shape[0] > 1 else data


def neighbour_correlation(data: np.ndarray) -> float:
    """Mean lag-1 correlation along the two in-plane axes of the working array."""
    cs = []
    for ax in (1, 2):
        if data.shape[ax] < 2:
            continue
        a = np.moveaxis(data, ax, 0)
        x, y = a[:-1].reshape(-1).astype(np.float64), a[1:].reshape(-1).astype(np.float64)
        sx, sy = x.std(), y.std()
        if sx == 0 or sy == 0:
            continue
        cs.append(float(((x - x.mean()) * (y - y.mean())).mean() / (sx * sy)))
    return float(np.mean(cs)) if cs else 1.0


def check_knee_input(scan: Scan) -> list[str]:
    """Apply the rules above. Raises BmlError to refuse; returns warnings for the report."""
    path = scan.path
    hdr = scan.image.header
    try:
        descrip = bytes(hdr["descrip"])
    except Exception:
        descrip = b""
    if descrip.startswith(MASK_DESCRIP):
        raise BmlError("this is a mask that bmltrt wrote, not a scan", path, "give the MR image itself")
    data = scan.data
    sample = _sample_slices(data)
    p1, p99 = (float(v) for v in np.percentile(sample, [1, 99]))
    if p99 - p1 <= BLANK_REL_RANGE * max(abs(p1), abs(p99), 1e-30):
        raise BmlError(f"the image is blank: 98% of voxels have the value {p1:.6g}", path,
                       "check that this is the right series")
    values = np.unique(sample)
    if values.size <= MAX_LABEL_VALUES:
        raise BmlError(f"only {values.size} distinct intensities: a mask or label map, not an MR image", path,
                       "give the MR image itself")
    corr = neighbour_correlation(sample)
    if corr < MIN_NEIGHBOUR_CORRELATION:
        raise BmlError(f"the image looks like noise (neighbouring voxels correlate {corr:.2f}; "
                       f"MR images > {MIN_NEIGHBOUR_CORRELATION})", path, "check that this is the right series")
    warnings = []
    extent = [n * s for n, s in zip(data.shape, scan.spacing)]  # working axes: LR, SI, AP
    slice_mm = scan.spacing[0]
    if slice_mm > MAX_SLICE_MM:
        raise BmlError(f"sagittal slices of {slice_mm:.1f} mm are too thick for lesion detection", path,
                       f"give a series with slices of at most {MAX_SLICE_MM:g} mm (3 mm is typical)")
    if max(extent) > MAX_EXTENT_MM:
        raise BmlError(f"the volume spans {max(extent):.0f} mm: more than a knee series (at most "
                       f"{MAX_EXTENT_MM:.0f} mm)", path, "crop it to the knee, or check the voxel size in the header")
    if min(extent[1], extent[2]) < MIN_PLANE_MM or extent[0] < MIN_COVERAGE_MM:
        raise BmlError(f"the volume covers only {extent[1]:.0f} x {extent[2]:.0f} mm in the sagittal plane and "
                       f"{extent[0]:.0f} mm left-right: too small to hold a knee (at least {MIN_PLANE_MM:.0f} x "
                       f"{MIN_PLANE_MM:.0f} and {MIN_COVERAGE_MM:.0f} mm)", path,
                       "give the whole knee series, or check the voxel size in the header")
    if slice_mm > WARN_SLICE_MM:
        warnings.append(f"sagittal slices of {slice_mm:.1f} mm are thicker than the models were trained on "
                        f"(up to {WARN_SLICE_MM} mm): small lesions may be missed")
    pixel_mm = max(scan.spacing[1], scan.spacing[2])
    if pixel_mm > WARN_PIXEL_MM:
        warnings.append(f"in-plane pixels of {pixel_mm:.2f} mm are coarser than the models were trained on "
                        f"(0.3-0.7 mm; warned above {WARN_PIXEL_MM} mm): the femur border and small lesions "
                        "are unreliable")
    return warnings
