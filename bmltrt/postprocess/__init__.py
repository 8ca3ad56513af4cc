"""Anomaly map -> lesion mask: HE, difference, Otsu, opening, closing (numpy or cupy)."""

from bmltrt.postprocess.lesion import PostConfig, equalize_hist, lesion_mask, otsu_thresholds  # noqa: F401
