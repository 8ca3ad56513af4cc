"""Is the femur mask a plausible distal femur? Rules, stated, checked after segmentation.

A segmenter always answers; on a scan that is not a sagittal knee MRI (or one it fails
on) the answer is a blob somewhere. These rules catch that, so the report says so and a
clearly non-knee input is refused instead of reported with "lesions".

Measured on real anatomy: the 48 OAI_AKOA femurs resliced to 3 mm slices are 125-257 cm3
and span 72-96 mm from left to right; the train_labels knees hold 143-217 cm3 of femur. In
a knee field of view the femur reaches the upper part of the image (the shaft) and is one
piece. The limits below leave a wide margin (small and large knees, small fields of view).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from bmltrt.arrays import array_module, ndimage_of

# Limits with a wide margin around the measured ranges above.
MIN_VOLUME_CM3, MAX_VOLUME_CM3 = 40.0, 700.0
REFUSE_BELOW_CM3 = 5.0  # less than this is no femur at all
MIN_SPAN_MM = 35.0
MAX_TOP_FRACTION = 0.5  # the femur's top row lies in the upper half of the image
MIN_MAIN_FRACTION = 0.85  # share of the thresholded mask in the largest piece
MIN_CONFIDENCE = 0.8  # mean femur probability inside the mask
# The mask's outline must follow edges in the image: mean gradient on the outline over the
# median gradient of the body. Measured: 2.1-2.3 on painted OAI_AKOA femurs, 3.5 on a
# phantom, 1.06 for a femur-sized box in pure noise.
MIN_EDGE_RATIO = 1.4


@dataclass
class FemurCheck:
    volume_cm3: float
    span_mm: float
    top_fraction: float
    main_fraction: float
    confidence: float
    edge_ratio: float | None = None
    reasons: list[str] = field(default_factory=list)
    refuse: bool = False

    @property
    def plausible(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict:
        d = asdict(self)
        d["plausible"] = self.plausible
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in d.items()}


def edge_ratio(norm, mask) -> float:
    """Mean in-plane gradient on the mask's outline (3 pixels wide) over the median gradient
    of the body (normalised intensity > 0.1); 0 for an image with no body."""
    xp = array_module(norm)
    nd = ndimage_of(xp)
    body = norm > 0.1
    if float(body.mean()) < 0.01:
        return 0.0
    sm = nd.gaussian_filter(norm.astype(xp.float32), (0, 1.0, 1.0))
    grad = xp.hypot(nd.sobel(sm, axis=1), nd.sobel(sm, axis=2))
    plus = xp.zeros((3, 3, 3), bool)
    plus[1] = nd.generate_binary_structure(2, 1)
    outline = mask & ~nd.binary_erosion(mask, structure=plus, iterations=3)
    if not bool(outline.any()):
        return 0.0
    return float(grad[outline].mean() / (xp.median(grad[body]) + 1e-6))


def check_femur(prob, mask, spacing, norm=None) -> FemurCheck:
    """Rules over the cleaned mask (`mask`), the segmenter's probabilities (`prob`) and, if
    given, the normalised scan (`norm`), all (slices, rows, cols) in the working orientation."""
    xp = array_module(mask)
    nd = ndimage_of(xp)
    vox_mm3 = float(spacing[0] * spacing[1] * spacing[2])
    volume = float(mask.sum()) * vox_mm3 / 1000.0
    raw = prob > 0.5
    raw_sum = float(raw.sum())
    if volume * 1000.0 < vox_mm3 or raw_sum == 0:
        return FemurCheck(volume, 0.0, 1.0, 0.0, 0.0, reasons=["no femur found: is this a sagittal knee MRI?"],
                          refuse=True)
    slices = xp.flatnonzero(mask.any(axis=(1, 2)))
    span = float(int(slices[-1]) - int(slices[0]) + 1) * spacing[0]
    rows = xp.flatnonzero(mask.any(axis=(0, 2)))
    top = float(int(rows[0])) / mask.shape[1]
    labels, n = nd.label(raw, structure=xp.ones((3, 3, 3), bool))
    sizes = xp.bincount(labels.ravel())
    main = float(sizes[1:].max()) / raw_sum if int(n) else 0.0
    conf = float(prob[mask].mean())
    edges = edge_ratio(norm, mask) if norm is not None else None
    reasons = []
    if volume < REFUSE_BELOW_CM3:
        reasons.append(f"the femur found is only {volume:.1f} cm3: is this a sagittal knee MRI?")
    elif not MIN_VOLUME_CM3 <= volume <= MAX_VOLUME_CM3:
        reasons.append(f"femur volume {volume:.0f} cm3 is outside {MIN_VOLUME_CM3:.0f}-{MAX_VOLUME_CM3:.0f} cm3")
    if span < MIN_SPAN_MM:
        reasons.append(f"the femur spans only {span:.0f} mm from left to right (a knee: > {MIN_SPAN_MM:.0f} mm)")
    if top > MAX_TOP_FRACTION:
        reasons.append("the femur does not reach the upper half of the image (no femoral shaft)")
    if main < MIN_MAIN_FRACTION:
        reasons.append(f"the femur mask is in pieces (largest {100 * main:.0f}%)")
    if conf < MIN_CONFIDENCE:
        reasons.append(f"the segmenter is unsure (mean femur probability {conf:.2f})")
    if edges is not None and edges < MIN_EDGE_RATIO:
        reasons.append(f"the femur outline does not follow edges in the image (edge ratio {edges:.2f}; "
                       "a blank or noise volume?)")
    # Two independent signs at once: a mask that follows no edges, from a segmenter that is
    # unsure. Real knees are far from both (qDESS echoes and MESE T2: edge ratio 3.2-5.6,
    # confidence 0.85-0.90; painted OAI_AKOA 2.1-2.3); a smoothed random field gave 1.23 and
    # 0.73 and was reported with 25 "lesions".
    no_knee = edges is not None and edges < MIN_EDGE_RATIO and conf < MIN_CONFIDENCE
    if no_knee:
        reasons.insert(0, f"no knee found: the femur mask follows no edges in the image (edge ratio {edges:.2f}) "
                          f"and the segmenter is unsure (mean femur probability {conf:.2f})")
    return FemurCheck(volume, span, top, main, conf, edges, reasons, refuse=volume < REFUSE_BELOW_CM3 or no_knee)
