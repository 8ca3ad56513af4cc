"""A sagittal IWFS-like knee phantom with exact femur and lesion ground truth.

Geometry is built from approximate signed distance functions (mm, negative inside)
on the working grid [slice (L->R), row (S->I), col (A->P)]. Intensities follow an
intermediate-weighted fat-suppressed contrast: fluid bright, cartilage intermediate,
muscle grey, fat and marrow dark, cortex and tendons black, bone marrow lesions bright
and ill-defined. Then bias field, partial-volume blur and Rician noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bmltrt.synth import appearance as app
from bmltrt.synth import tissue_labels as T

# Nominal tissue intensities (fluid = 1).
TISSUE = {
    "air": 0.0, "fat": 0.10, "muscle": 0.30, "marrow": 0.16, "cortex": 0.03,
    "cartilage": 0.50, "fluid": 0.95, "vessel": 0.80, "tendon": 0.05,
}


@dataclass
class PhantomConfig:
    shape: tuple[int, int, int] = (36, 448, 448)  # working [slice, row, col]
    spacing: tuple[float, float, float] = (3.0, 0.357, 0.357)  # mm
    n_lesions: tuple[int, int] = (0, 0)  # inclusive range
    noise_sigma: tuple[float, float] = (0.015, 0.03)
    bias_strength: tuple[float, float] = (0.1, 0.3)


@dataclass
class Phantom:
    image: np.ndarray  # int16, working orientation
    femur: np.ndarray  # uint8 {0,1}
    lesion: np.ndarray  # uint8 {0,1}, inside femur
    spacing: tuple[float, float, float]
    info: dict = field(default_factory=dict)
    labels: np.ndarray | None = None  # uint8 tissue labels (tissue_labels.py), working orientation


FAR_MM = 40.0  # signed distance stored outside a shape's bounding box


def _box(axis_coords, lo, hi):
    """Index slice of the 1-D coordinate array `axis_coords` that lies within [lo, hi]."""
    idx = np.flatnonzero((axis_coords >= lo) & (axis_coords <= hi))
    return slice(int(idx[0]), int(idx[-1]) + 1) if idx.size else slice(0, 0)


def _ellipsoid_sd(z, y, x, c, r, margin=12.0):
    """Approximate signed distance (mm) to an axis-aligned ellipsoid (Quilez' k0*(k0-1)/k1).

    Evaluated only in the bounding box grown by `margin`; FAR_MM elsewhere. `x` may vary
    with y (a tilted frame): then its box is taken over all rows.
    """
    shape = np.broadcast_shapes(z.shape, y.shape, x.shape)
    out = np.full(shape, FAR_MM, np.float32)
    bz = _box(z.ravel(), c[0] - r[0] - margin, c[0] + r[0] + margin)
    by = _box(y.ravel(), c[1] - r[1] - margin, c[1] + r[1] + margin)
    xr = x.min(axis=1).ravel() if x.shape[1] > 1 else x.ravel()
    xr2 = x.max(axis=1).ravel() if x.shape[1] > 1 else x.ravel()
    idx = np.flatnonzero((xr2 >= c[2] - r[2] - margin) & (xr <= c[2] + r[2] + margin))
    bx = slice(int(idx[0]), int(idx[-1]) + 1) if idx.size else slice(0, 0)
    zz = z[bz] if z.shape[0] > 1 else z
    yy = y[:, by] if y.shape[1] > 1 else y
    xx = x[:, by if x.shape[1] > 1 else slice(None), bx]
    dz, dy, dx = (zz - c[0]) / r[0], (yy - c[1]) / r[1], (xx - c[2]) / r[2]
    k0 = np.sqrt(dz * dz + dy * dy + dx * dx)
    k1 = np.sqrt(dz * dz / r[0] ** 2 + dy * dy / r[1] ** 2 + dx * dx / r[2] ** 2)
    out[bz, by, bx] = np.minimum(k0 * (k0 - 1.0) / (k1 + 1e-6), FAR_MM)
    return out


def _ellipse_sd(a, b, c, r):
    """Signed distance to an infinite elliptic cylinder, in the two given coordinates."""
    da, db = (a - c[0]) / r[0], (b - c[1]) / r[1]
    k0 = np.sqrt(da * da + db * db)
    k1 = np.sqrt(da * da / r[0] ** 2 + db * db / r[1] ** 2)
    return k0 * (k0 - 1.0) / (k1 + 1e-6)


def _smin(a, b, k):
    """Smooth union of two signed distances (polynomial smooth minimum over ~k mm)."""
    out = np.minimum(a, b)
    d = np.abs(a - b)
    near = d < k
    h = (k - d[near]) / k
    out[near] -= h * h * k / 4.0
    return out


def _grids(cfg: PhantomConfig, offset=(0.0, 0.0, 0.0)):
    s, h, w = cfg.shape
    sz, sy, sx = cfg.spacing
    z = ((np.arange(s, dtype=np.float32) - (s - 1) / 2) * sz - offset[0])[:, None, None]
    y = ((np.arange(h, dtype=np.float32) - (h - 1) / 2) * sy - offset[1])[None, :, None]
    x = ((np.arange(w, dtype=np.float32) - (w - 1) / 2) * sx - offset[2])[None, None, :]
    return z, y, x


def _lesion_field(rng, z, y, x, femur_sd, cfg, center, size_mm):
    """Irregular, ill-defined blob in [0,1] around `center`, spread over several slices."""
    field = np.zeros(np.broadcast_shapes(z.shape, y.shape, x.shape), np.float32)
    n_lobes = int(rng.integers(2, 5))
    for _ in range(n_lobes):
        off = rng.normal(0, 0.45 * size_mm, 3) * np.array([0.8, 1.0, 1.0])
        r_in = size_mm * rng.uniform(0.45, 0.9, 2)
        r_lr = max(2.0, size_mm * rng.uniform(0.5, 1.1))
        c = center + off
        dz, dy, dx = (z - c[0]) / r_lr, (y - c[1]) / r_in[0], (x - c[2]) / r_in[1]
        field = np.maximum(field, np.exp(-0.5 * (dz * dz + dy * dy + dx * dx) * 1.4))
    return field


def make_phantom(seed: int | np.random.SeedSequence | list, cfg: PhantomConfig | None = None,
                 n_lesions: int | None = None) -> Phantom:
    """One phantom case; the same seed gives byte-identical arrays."""
    cfg = cfg or PhantomConfig()
    rng = np.random.default_rng(seed)
    shape = cfg.shape
    # Per-subject anatomy: size, position and tilt.
    scale = rng.uniform(1.15, 1.4)  # knees fill most of a 160 mm field of view
    offset = (rng.uniform(-6, 6), rng.uniform(-10, 10), rng.uniform(-8, 8))
    z, y, x = _grids(cfg, offset)
    tilt = np.deg2rad(rng.uniform(-8, 8))  # flexion: shaft leans in the sagittal plane
    x_shaft = x - np.tan(tilt) * np.minimum(y, 0)
    S = scale
    joint_y = 22.0 * S + rng.uniform(-6, 6)

    # ---- femur: shaft, metaphyseal flare, two condyles, intercondylar notch
    cond_r = np.array([14.0, 23.0, 27.0]) * S * rng.uniform(0.93, 1.07, 3)
    cond_y = joint_y - cond_r[1]
    med = _ellipsoid_sd(z, y, x, (-20 * S, cond_y, 3 * S), cond_r)
    lat = _ellipsoid_sd(z, y, x, (20 * S, cond_y, 2 * S), cond_r * np.array([1.0, 0.95, 0.93]))
    meta = _ellipsoid_sd(z, y, x_shaft, (0.0, cond_y - 12 * S, -3 * S), np.array([34.0, 34.0, 24.0]) * S)
    shaft = np.maximum(_ellipse_sd(z, x_shaft, (0.0, -6 * S), np.array([15.0, 13.0]) * S),
                       y - (cond_y - 10 * S))
    femur_sd = _smin(_smin(med, lat, 6.0), meta, 8.0)
    femur_sd = _smin(femur_sd, shaft, 10.0)
    notch = _ellipsoid_sd(z, y, x, (0.0, joint_y - 4 * S, 16 * S), np.array([8.0, 18.0, 20.0]) * S)
    femur_sd = np.maximum(femur_sd, -notch)
    femur_sd = femur_sd + 0.9 * app.smooth_noise(rng, shape, (6, 12, 12))  # irregular outline

    # ---- tibia and patella
    gap = 5.5 * S * rng.uniform(0.8, 1.2)  # two cartilage layers + joint space
    tib_top = joint_y + gap
    plateau = _ellipsoid_sd(z, y, x, (0.0, tib_top + 20 * S, 4 * S), np.array([40.0, 20.0, 29.0]) * S)
    tshaft = np.maximum(_ellipse_sd(z, x, (0.0, 8 * S), np.array([17.0, 15.0]) * S), tib_top + 15 * S - y)
    tibia_sd = _smin(plateau, tshaft, 10.0)
    pat_c = (0.0, cond_y - 18 * S, -40 * S)
    patella_sd = _ellipsoid_sd(z, y, x, pat_c, np.array([21.0, 19.0, 9.0]) * S)

    # ---- body and soft tissue
    body_sd = _ellipse_sd(z, x, (0.0, 2 * S), np.array([75.0, 66.0]) * S * rng.uniform(0.95, 1.05))
    body_sd = np.broadcast_to(body_sd, shape)
    fat_layer = rng.uniform(4.0, 9.0)
    hoffa = _ellipsoid_sd(z, y, x, (0.0, joint_y - 3 * S, -31 * S), np.array([26.0, 13.0, 9.0]) * S)
    pat_tendon = np.maximum(_ellipse_sd(z, x, (0.0, -43 * S), np.array([14.0, 2.5]) * S),
                            np.abs(y - (pat_c[1] + 40 * S)) - 24 * S)
    quad_tendon = np.maximum(_ellipse_sd(z, x, (0.0, -40 * S + np.tan(tilt) * 40), np.array([18.0, 3.0]) * S),
                             np.abs(y - (pat_c[1] - 45 * S)) - 26 * S)

    tex = app.trabecular_texture(rng, shape)
    soft = app.smooth_noise(rng, shape, (5, 10, 10))
    # Muscle with fibres along the limb (rows) and dark fatty septa between bundles.
    fibres = app.smooth_noise(rng, shape, (12, 6, 64))
    img = TISSUE["muscle"] + 0.035 * soft + 0.03 * fibres
    img = np.where(fibres > 1.6, TISSUE["fat"] + 0.03, img).astype(np.float32)
    img = np.where(body_sd > -fat_layer, TISSUE["fat"] + 0.02 * soft, img)
    img = np.where(hoffa < 0, TISSUE["fat"] + 0.03 * tex, img)
    img = np.where((pat_tendon < 0) | (quad_tendon < 0), TISSUE["tendon"], img)
    # The tissue label map drawn alongside (the label-driven generator repaints it).
    lab = np.where(fibres > 1.6, T.SEPTUM, T.MUSCLE).astype(np.uint8)
    lab[body_sd > -fat_layer] = T.FAT
    lab[hoffa < 0] = T.HOFFA
    lab[(pat_tendon < 0) | (quad_tendon < 0)] = T.TENDON

    # Joint fluid: a film around the articular surfaces, the suprapatellar pouch, effusion.
    # Pockets, not a coat: the film is only visible where the smooth field is high.
    effusion = rng.uniform(0.3, 2.0)
    near_joint = (y > cond_y - 40 * S) & (y < tib_top + 12 * S)
    bone_sd = np.minimum(femur_sd, tibia_sd)
    fluid = ((bone_sd < 2.4 * S + effusion * (1.0 + soft)) & (soft > -0.2) & near_joint
             & (np.abs(z) < 42 * S))
    pouch = _ellipsoid_sd(z, y, x, (0.0, cond_y - 48 * S, -24 * S), np.array([30.0, 26.0, 3.5 + effusion]) * S)
    fluid |= pouch < 0
    img = np.where(fluid, TISSUE["fluid"] - 0.05 * np.abs(soft), img)
    lab[fluid] = T.FLUID

    # Cartilage over the articular surfaces.
    cart_t = 2.4 * S
    fem_cart = (femur_sd > 0) & (femur_sd < cart_t) & (y > cond_y - 30 * S)
    tib_cart = (tibia_sd > 0) & (tibia_sd < cart_t) & (y < tib_top + 5 * S)
    pat_cart = (patella_sd > 0) & (patella_sd < 3.0 * S) & (x > pat_c[2] + 2 * S)
    img = np.where(fem_cart | tib_cart | pat_cart, TISSUE["cartilage"] + 0.05 * soft, img)
    lab[fem_cart], lab[tib_cart], lab[pat_cart] = T.FEM_CART, T.TIB_CART, T.PAT_CART

    # Vessels (bright in fat-suppressed IW): popliteal artery and vein, genicular branches.
    # They are the bright structures outside the femur that tempt false positives.
    vx = 38 * S + rng.uniform(-4, 4)
    vz = rng.uniform(-8, 8)
    vessels = np.zeros(shape, bool)
    for dz, dx, r in ((0.0, 0.0, 3.2), (6.0, 4.0, 4.0)):
        vessels |= np.broadcast_to(_ellipse_sd(z, x, (vz + dz, vx + dx), np.array([r, r]) * S) < 0, shape)
    for _ in range(int(rng.integers(2, 5))):
        c = (rng.uniform(-40, 40), rng.uniform(-60, 60), rng.uniform(-55, 55))
        vessels |= _ellipsoid_sd(z, y, x, c, np.array([rng.uniform(2, 8), 1.6, rng.uniform(6, 20)])) < 0
    if rng.random() < 0.5:  # a popliteal (Baker's) cyst
        c = (rng.uniform(-30, 0), joint_y - rng.uniform(0, 20), 30 * S + rng.uniform(0, 10))
        vessels |= _ellipsoid_sd(z, y, x, c, np.array([8.0, 12.0, 7.0]) * rng.uniform(0.6, 1.3)) < 0
    vessels &= body_sd < -fat_layer
    img = np.where(vessels, TISSUE["vessel"] + 0.05 * soft, img)
    lab[vessels] = T.VESSEL

    # Bones: marrow with trabecular texture inside a dark cortical rim.
    cortex_t = rng.uniform(1.0, 1.8)
    for sd, inner, rim in ((tibia_sd, T.TIBIA, T.BONE_CORTEX), (patella_sd, T.PATELLA, T.BONE_CORTEX),
                           (femur_sd, T.FEMUR, T.FEMUR_CORTEX)):
        marrow = TISSUE["marrow"] + 0.06 * tex + 0.02 * soft
        img = np.where(sd < 0, np.where(sd > -cortex_t, TISSUE["cortex"], marrow), img)
        lab[sd < 0] = np.where(sd[sd < 0] > -cortex_t, rim, inner)
    img = np.where(body_sd > 0, TISSUE["air"], img)
    lab[body_sd > 0] = T.AIR

    femur = femur_sd < 0
    # ---- bone marrow lesions: bright, ill-defined, subchondral, over several slices
    lesion = np.zeros(shape, bool)
    k = int(rng.integers(cfg.n_lesions[0], cfg.n_lesions[1] + 1)) if n_lesions is None else n_lesions
    sub = np.argwhere((femur_sd < -cortex_t - 1.0) & (femur_sd > -cortex_t - 7.0)
                      & (y > cond_y - 5 * S) & (np.abs(z) > 6 * S) & (np.abs(z) < 32 * S))
    sizes = []
    spacing = np.asarray(cfg.spacing)
    marrow_core = femur_sd < -cortex_t
    for _ in range(k if len(sub) else 0):
        idx = sub[rng.integers(len(sub))]
        center = (idx - (np.asarray(shape) - 1) / 2) * spacing - np.asarray(offset)
        size = float(np.exp(rng.uniform(np.log(2.0), np.log(11.0))))
        # Work in a bounding box: lesions are small next to the volume.
        half = np.ceil((2.6 * size + 8) / spacing).astype(int)
        lo = np.maximum(idx - half, 0)
        hi = np.minimum(idx + half + 1, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        zb, yb, xb = z[box[0]], y[:, box[1]], x[:, :, box[2]]
        blob = _lesion_field(rng, zb, yb, xb, femur_sd[box], cfg, center, size)
        blob *= np.clip(1.0 + 0.35 * tex[box] + 0.3 * soft[box], 0.2, None)  # patchy, irregular
        amp = rng.uniform(0.3, 0.55)
        inside = marrow_core[box]
        img[box] = np.where(inside, img[box] + amp * np.clip(blob, 0, 1.2), img[box])
        m = (blob > 0.5) & inside
        lesion[box] |= m
        lab[box][m] = T.FEM_LESION
        sizes.append(float(m.sum() * spacing.prod()))

    # ---- acquisition: partial-volume blur, bias field, Rician noise
    img = app.blur_partial_volume(img, (0.35, 0.7, 0.7))
    img *= app.bias_field(rng, shape, rng.uniform(*cfg.bias_strength))
    img = app.rician(rng, img, rng.uniform(*cfg.noise_sigma))
    # lesions drawn may overlap: counted as the evaluation counts them (3D components)
    from bmltrt.evaluation.metrics import components

    labels, n = components(lesion)
    volumes = [float(v) * float(spacing.prod()) for v in np.bincount(labels.ravel())[1:]]
    info = {"n_lesions": int(n), "lesion_volumes_mm3": volumes, "lesions_drawn": len(sizes), "scale": float(scale)}
    return Phantom(image=app.to_int16(img), femur=femur.astype(np.uint8),
                   lesion=lesion.astype(np.uint8), spacing=cfg.spacing, info=info, labels=lab)
