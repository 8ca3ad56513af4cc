"""Paint real knee label maps (OAI-ZIB-like: 1 femur ... 7 femoral lesion) into IWFS-like
scans and reslice them to the OAI intermediate-weighted grid (3 mm sagittal slices of
0.357 mm pixels): real anatomy and real lesion shapes with exact ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from bmltrt.io import load_scan
from bmltrt.synth import appearance as app
from bmltrt.synth.phantom import TISSUE, Phantom

FEMUR, FEM_CART, TIBIA, TIB_CART, PATELLA, PAT_CART, FEM_LESION, TIB_LESION, PAT_LESION = range(1, 10)
# Recorded in dataset.json: scores on painted data compare only within one painter version.
# 1: lesions drawn only beyond the cortex; 2 (2026-12-06): up to a thin subchondral plate.
PAINTER_VERSION = 2


@dataclass
class OAIGrid:
    spacing: tuple[float, float, float] = (3.0, 0.357, 0.357)
    inplane: int = 448


def _slab_matrix(n_in: int, d_in: float, d_out: float) -> tuple[np.ndarray, int]:
    """(n_out, n_in) weights averaging thin slices into thick slabs (partial volume)."""
    length = n_in * d_in
    n_out = max(1, int(round(length / d_out)))
    start = (length - n_out * d_out) / 2
    m = np.zeros((n_out, n_in), np.float32)
    edges_in = np.arange(n_in + 1) * d_in
    for j in range(n_out):
        a, b = start + j * d_out, start + (j + 1) * d_out
        overlap = np.clip(np.minimum(edges_in[1:], b) - np.maximum(edges_in[:-1], a), 0, None)
        m[j] = overlap / max(overlap.sum(), 1e-6)
    return m, n_out


def reslice_to_oai(vol: np.ndarray, spacing, grid: OAIGrid) -> np.ndarray:
    """Slab-average along slices, linear resample in-plane, centre-crop/pad to the grid."""
    m, _ = _slab_matrix(vol.shape[0], spacing[0], grid.spacing[0])
    thick = np.tensordot(m, vol.astype(np.float32), axes=(1, 0))
    zoom = (1.0, spacing[1] / grid.spacing[1], spacing[2] / grid.spacing[2])
    res = ndi.zoom(thick, zoom, order=1, prefilter=False, grid_mode=True, mode="nearest")
    out = np.zeros((res.shape[0], grid.inplane, grid.inplane), np.float32)
    src, dst = [], []
    for n in res.shape[1:]:
        if n >= grid.inplane:
            a = (n - grid.inplane) // 2
            src.append(slice(a, a + grid.inplane)); dst.append(slice(0, grid.inplane))
        else:
            a = (grid.inplane - n) // 2
            src.append(slice(0, n)); dst.append(slice(a, a + n))
    out[:, dst[0], dst[1]] = res[:, src[0], src[1]]
    return out


def phantom_from_labels(label_path, seed, grid: OAIGrid | None = None) -> Phantom:
    grid = grid or OAIGrid()
    rng = np.random.default_rng(seed)
    scan = load_scan(label_path)
    lab = np.rint(scan.data).astype(np.int16)
    sp = scan.spacing
    shape = lab.shape
    tex = app.trabecular_texture(rng, shape)
    soft = app.smooth_noise(rng, shape, (8, 10, 10))
    fibres = app.smooth_noise(rng, shape, (16, 6, 48))
    # Soft tissue the labels do not name: muscle with fatty septa, some fat.
    img = TISSUE["muscle"] + 0.04 * soft + 0.03 * fibres
    img = np.where(fibres > 1.6, TISSUE["fat"], img).astype(np.float32)
    bones = np.isin(lab, (FEMUR, TIBIA, PATELLA, FEM_LESION, TIB_LESION, PAT_LESION))
    cart = np.isin(lab, (FEM_CART, TIB_CART, PAT_CART))
    # Joint fluid: patchy film around the cartilage, thicker with effusion.
    dist = ndi.distance_transform_edt(~cart, sampling=sp)
    film = (dist > 0) & (dist < rng.uniform(0.8, 3.0) * (1 + 0.7 * soft)) & ~bones & (soft > -0.3)
    img = np.where(film, TISSUE["fluid"], img)
    img = np.where(cart, TISSUE["cartilage"] + 0.05 * soft, img)
    # Cortex: a dark rim inside each bone.
    cortex_t = rng.uniform(1.0, 1.8)
    inner = ndi.distance_transform_edt(bones, sampling=sp)
    marrow = TISSUE["marrow"] + 0.06 * tex + 0.02 * soft
    img = np.where(bones, np.where(inner < cortex_t, TISSUE["cortex"], marrow), img)
    # Lesions: bright, with an ill-defined rim spreading ~1.5 mm beyond the label. The
    # oedema fills the marrow up to a thin subchondral plate (one or two voxels of the
    # label map): the 1-1.8 mm cortex drawn elsewhere, as thick as a shaft's, would hide
    # the outer millimetre of every subchondral lesion label, and did (painter 1: a fifth
    # of the OAI_AKOA lesion voxels were painted no brighter than healthy marrow).
    les = np.isin(lab, (FEM_LESION, TIB_LESION, PAT_LESION))
    if les.any():
        soft_les = ndi.gaussian_filter(les.astype(np.float32), sigma=[1.5 / s for s in sp])
        amp = rng.uniform(0.3, 0.55)
        plate_t = rng.uniform(0.4, 0.8)
        oedema = bones & (inner >= plate_t)
        img = np.where(oedema & (inner < cortex_t) & (soft_les > 0.3), marrow, img)
        img = np.where(oedema, img + amp * np.clip(1.6 * soft_les, 0, 1) * (1 + 0.3 * tex), img)
    femur = np.isin(lab, (FEMUR, FEM_LESION)).astype(np.float32)
    lesion = (lab == FEM_LESION).astype(np.float32)
    img_r = reslice_to_oai(img, sp, grid)
    fem_r = reslice_to_oai(femur, sp, grid) > 0.5
    les_r = (reslice_to_oai(lesion, sp, grid) > 0.5) & fem_r
    out_shape = img_r.shape
    img_r = app.blur_partial_volume(img_r, (0.0, 0.6, 0.6))
    img_r *= app.bias_field(rng, out_shape, rng.uniform(0.1, 0.3))
    img_r = app.rician(rng, img_r, rng.uniform(0.015, 0.03))
    vox = float(np.prod(grid.spacing))
    info = {"source": str(label_path), "n_lesion_voxels_source": int(lesion.sum()),
            "lesion_volume_mm3": float(les_r.sum() * vox)}
    return Phantom(image=app.to_int16(img_r), femur=fem_r.astype(np.uint8),
                   lesion=les_r.astype(np.uint8), spacing=grid.spacing, info=info)
