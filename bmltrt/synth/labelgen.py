"""Label-driven training images (SynthSeg, Billot et al. 2023), for both networks.

Every sample is a new scan of one anatomy (``anatomy.py``), made on the fly:

- **geometry**: random affine (flexion +-20 deg, rotation about the limb +-15 deg,
  varus/valgus +-10 deg, scaling +-15 %, shear), a smooth elastic deformation, left knees
  by mirroring, a random sagittal grid (slices 2-4.5 mm, field of view 120-190 mm, the
  knee off-centre, sometimes a zero-padded border as scanners store it; the leg goes on
  beyond the anatomy's top and bottom rows);
- **appearance**: a random contrast, per tissue, from a prior over fat-suppressed
  IW/PD (the paper's, most often), fat-suppressed T2 (DESS echo 2), water-excited
  gradient echo (DESS echo 1), non-fat-suppressed PD/T1/T2 and fully random contrasts
  (muscle as dark as marrow now and then in the fat-suppressed ones);
  texture per tissue (trabeculae, muscle fibres), partial volume across the slice
  thickness, in-plane blur, bias field, Rician noise; then the runtime's own
  intensity normalisation;
- **lesions** (segmenter only): bright, irregular oedema-like blobs in the femoral
  marrow, still femur in the ground truth; the inpainter sees healthy slices only.

What is returned is what the networks see at run time: the segmenter's working grid
(1.6 mm pixels, the scan's own slices) or one inpainter slice at its resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from bmltrt.runtime.preprocess import normalize_intensity
from bmltrt.synth import tissue_labels as T
from bmltrt.synth.anatomy import GRID_MM, Anatomy
from bmltrt.synth.appearance import smooth_noise

# -- appearance ------------------------------------------------------------------------------

# Tissue classes: labels that share an intensity (with a small per-label jitter).
CLASS_OF = {
    T.AIR: "air", T.FEMUR: "marrow", T.TIBIA: "marrow", T.PATELLA: "marrow", T.FIBULA: "marrow",
    T.FEM_LESION: "edema", T.TIB_LESION: "edema", T.PAT_LESION: "edema",
    T.FEMUR_CORTEX: "cortex", T.BONE_CORTEX: "cortex", T.FEMUR_PHYSIS: "physis", T.BONE_PHYSIS: "physis",
    T.FEM_CART: "cartilage", T.TIB_CART: "cartilage", T.PAT_CART: "cartilage",
    T.MENISCUS: "dark", T.TENDON: "dark", T.FAT: "fat", T.SEPTUM: "fat", T.HOFFA: "fat",
    T.MUSCLE: "muscle", T.MUSCLE2: "muscle", T.FLUID: "fluid", T.VESSEL: "vessel",
}

# Mean intensity ranges per class (fluid ~ 1) of each contrast family, and how often each is
# drawn. Marrow and fat are both fat: they move together in every real contrast.
CONTRASTS = {
    "iw_fs": (0.35, {"marrow": (0.08, 0.25), "cortex": (0.01, 0.06), "cartilage": (0.35, 0.6),
                     "dark": (0.02, 0.08), "fat": (0.04, 0.2), "muscle": (0.2, 0.42), "fluid": (0.85, 1.0),
                     "vessel": (0.4, 0.95)}),
    "t2_fs": (0.15, {"marrow": (0.04, 0.15), "cortex": (0.01, 0.05), "cartilage": (0.2, 0.5),
                     "dark": (0.01, 0.06), "fat": (0.03, 0.15), "muscle": (0.15, 0.45), "fluid": (0.9, 1.0),
                     "vessel": (0.5, 1.0)}),
    "gre_we": (0.15, {"marrow": (0.03, 0.15), "cortex": (0.01, 0.05), "cartilage": (0.45, 0.85),
                      "dark": (0.02, 0.1), "fat": (0.02, 0.12), "muscle": (0.45, 0.85), "fluid": (0.65, 1.0),
                      "vessel": (0.5, 1.0)}),
    "non_fs": (0.2, {"marrow": (0.6, 1.0), "cortex": (0.01, 0.06), "cartilage": (0.3, 0.65),
                     "dark": (0.01, 0.08), "fat": (0.6, 1.0), "muscle": (0.15, 0.45), "fluid": (0.25, 1.0),
                     "vessel": (0.15, 0.9)}),
    "random": (0.15, {}),
}
# Fat-suppressed and water-excited scans often show muscle as dark as the suppressed marrow
# (short-T2 muscle at a long echo time: DESS echo 2, T2-fs). On the real qDESS echo 2 the
# femoral shaft then stands out from the thigh by its thin cortex only, and a segmenter
# trained on muscle always 1-3x brighter than marrow lost the shaft there. Measured on
# generated T2-fs scans with muscle at 1.1x marrow: the shipped 2026-11-25 segmenter's
# femur Dice fell from 0.970 to 0.875 (0.80 in the shaft's third).
DARK_MUSCLE_P, DARK_MUSCLE_RATIO = 0.3, (0.8, 1.6)
# Marrow is fat: a fat-suppressed or water-excited scan suppresses both alike. Drawn apart
# (the ranges above), fat often came out darker or brighter than marrow; on the real qDESS
# echo 1 (water-excited) the shipped segmenter's mask runs over a dark region above the
# condyle, probably fat, in edge slices 28-30. With fat_like_marrow_p, that share of
# fat-suppressed scans gets fat at marrow x FAT_LIKE_MARROW_RATIO (a fine-tune with it did
# not help: benchmarks/results/segmenter_fat_like_marrow/).
FAT_LIKE_MARROW_RATIO = (0.8, 1.25)
FAT_SUPPRESSED = ("iw_fs", "t2_fs", "gre_we")
CLASSES = ("air", "marrow", "cortex", "physis", "cartilage", "dark", "fat", "muscle", "fluid", "vessel", "edema")


def draw_contrast(rng: np.random.Generator, family: str | None = None,
                  dark_muscle_p: float = DARK_MUSCLE_P, fat_like_marrow_p: float = 0.0) -> tuple[str, dict[str, float]]:
    names = list(CONTRASTS)
    if family is None:
        p = np.array([CONTRASTS[n][0] for n in names])
        family = names[int(rng.choice(len(names), p=p / p.sum()))]
    ranges = CONTRASTS[family][1]
    if family == "random":
        means = {c: float(rng.uniform(0, 1)) for c in CLASSES}
        means["air"] = float(rng.uniform(0, 0.1)) if rng.random() < 0.8 else means["air"]
    else:
        means = {c: float(rng.uniform(*ranges[c])) for c in ranges}
        means["air"] = float(rng.uniform(0, 0.02))
        if family == "non_fs":  # fat and marrow are both fat
            means["fat"] = float(np.clip(means["marrow"] * rng.uniform(0.85, 1.2), 0.4, 1.1))
        if family in FAT_SUPPRESSED and rng.random() < dark_muscle_p:
            means["muscle"] = means["marrow"] * float(rng.uniform(*DARK_MUSCLE_RATIO))
        # (no draw when off: the scans of older runs replay exactly)
        if family in FAT_SUPPRESSED and fat_like_marrow_p > 0 and rng.random() < fat_like_marrow_p:
            means["fat"] = means["marrow"] * float(rng.uniform(*FAT_LIKE_MARROW_RATIO))
        means["physis"] = means["cortex"] + rng.uniform(0, 0.6) * (means["marrow"] - means["cortex"])
    # Oedema replaces fat with water: toward fluid in every contrast.
    means["edema"] = means["marrow"] + rng.uniform(0.25, 0.9) * (means["fluid"] - means["marrow"])
    return family, means


def paint(labels: np.ndarray, rng: np.random.Generator, means: dict[str, float], muscle_streak_axis: int = 1):
    """Intensities for a label volume (any shape with >= 2 dims): per-label mean with jitter,
    tissue textures (fine grain, smooth shading, fibres along the limb)."""
    mean_t = np.zeros(256, np.float32)
    fine_t = np.zeros(256, np.float32)
    smooth_t = np.zeros(256, np.float32)
    streak_t = np.zeros(256, np.float32)
    for lab, cls in CLASS_OF.items():
        m = means[cls] * (1 + rng.normal(0, 0.05))
        if lab == T.MUSCLE2:
            m = means["muscle"] * rng.uniform(0.8, 1.2)
        elif lab == T.SEPTUM and rng.random() < 0.5:
            m = means["fat"] * rng.uniform(0.7, 1.1)
        mean_t[lab] = max(m, 0.0)
        fine_t[lab] = rng.uniform(0.02, 0.08)
        smooth_t[lab] = rng.uniform(0.02, 0.1)
    for lab in (T.FEMUR, T.TIBIA, T.PATELLA, T.FIBULA, T.FEM_LESION):  # trabeculae, marrow islands
        fine_t[lab] = rng.uniform(0.03, 0.18)
        smooth_t[lab] = rng.uniform(0.03, 0.15)
    for lab in (T.MUSCLE, T.MUSCLE2):
        streak_t[lab] = rng.uniform(0.03, 0.15)
    shape = labels.shape
    fine = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), rng.uniform(0.5, 1.2))
    fine /= fine.std() + 1e-6
    smooth = smooth_noise(rng, shape, tuple(max(2, n // 24) for n in shape))
    streak_coarse = [max(2, n // 4) for n in shape]
    streak_coarse[muscle_streak_axis] = max(2, shape[muscle_streak_axis] // 40)
    streak = smooth_noise(rng, shape, tuple(streak_coarse))
    img = mean_t[labels] * (1 + fine_t[labels] * fine + smooth_t[labels] * smooth + streak_t[labels] * streak)
    return np.maximum(img, 0).astype(np.float32)


def acquire(img: np.ndarray, rng: np.random.Generator, inplane_axes=(1, 2)) -> np.ndarray:
    """In-plane blur, bias field, Rician noise on thick slices (slices on axis 0)."""
    b = rng.uniform(0, 0.8)
    if b > 0.2:
        img = _smooth_inplane(img, b, inplane_axes, truncate=2.5)
    shape = img.shape
    strength = rng.uniform(0, 0.5)
    field = smooth_noise(rng, shape, tuple(2 if n < 4 else 3 for n in shape))
    img = img * np.exp(strength * field / (np.abs(field).max() + 1e-6))
    sigma = rng.uniform(0.005, 0.06) * max(float(np.percentile(img, 99)), 1e-3)
    re = img + rng.standard_normal(shape, dtype=np.float32) * sigma
    im = rng.standard_normal(shape, dtype=np.float32) * sigma
    return np.sqrt(re * re + im * im).astype(np.float32)


def runtime_smoothing(img: np.ndarray, rng: np.random.Generator, px_mm: float, antialias: float,
                      src_px_mm=(0.3, 0.7), inplane_axes=(1, 2)) -> tuple[np.ndarray, float]:
    """The smoothing that the runtime's `to_segmenter_grid` gives a scan of `src_px_mm` pixels
    (drawn at random) before its `px_mm` grid, done on that grid: a Gaussian of
    antialias * (f - 1) / 2 source pixels = antialias * (f - 1) / (2 f) grid pixels, f =
    px_mm / source pixel. Applied after the noise, as the runtime smooths the noisy scan.
    Returns the image and the sigma (grid pixels), so a second echo can get the same."""
    f = px_mm / rng.uniform(*src_px_mm)
    s = antialias * max(0.0, f - 1) / (2 * f)
    return _smooth_inplane(img, s, inplane_axes), s


def _smooth_inplane(img: np.ndarray, sigma: float, inplane_axes=(1, 2), truncate: float = 4.0) -> np.ndarray:
    if sigma <= 0:
        return img
    sig = [sigma if a in inplane_axes else 0.0 for a in range(img.ndim)]
    return ndi.gaussian_filter(img, sig, mode="nearest", truncate=truncate)


# -- geometry --------------------------------------------------------------------------------

def rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """Rotation about the LR (flexion), SI (internal/external) and AP (varus/valgus) axes."""
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    r_lr = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])  # rotates the (SI, AP) plane
    r_si = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])  # rotates the (LR, AP) plane
    r_ap = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])  # rotates the (LR, SI) plane
    return r_lr @ r_si @ r_ap


@dataclass
class Pose:
    """Output mm (LR, SI, AP about the field-of-view centre) -> anatomy mm."""

    matrix: np.ndarray  # (3, 3)
    centre_mm: np.ndarray  # anatomy mm at the output origin
    mirror: bool
    elastic_mm: float


def random_pose(anatomy: Anatomy, rng: np.random.Generator, strength: float = 1.0) -> Pose:
    d = np.deg2rad
    rot = rotation(d(rng.uniform(-20, 20)) * strength, d(rng.uniform(-15, 15)) * strength,
                   d(rng.uniform(-10, 10)) * strength)
    scale = rng.uniform(0.85, 1.15) ** strength * rng.uniform(0.95, 1.05, 3) ** strength
    shear = np.eye(3) + rng.uniform(-0.05, 0.05, (3, 3)) * (1 - np.eye(3)) * strength
    # Output mm -> anatomy mm: a scan of a bigger knee shows the anatomy scaled up, so the
    # output-to-anatomy map divides by the scale.
    m = rot @ shear @ np.diag(1.0 / scale)
    offset = np.array([rng.uniform(-15, 15), rng.uniform(-25, 10), rng.uniform(-15, 15)]) * strength
    centre = np.asarray(anatomy.knee_centre, float) * GRID_MM + offset
    return Pose(m, centre, bool(rng.random() < 0.5), rng.uniform(0, 3.0) * strength)


def sample_labels(anatomy: Anatomy, pose: Pose, rng: np.random.Generator, lr_mm: np.ndarray,
                  rows: int, cols: int, px_mm: float, rows_offset_mm: float = 0.0) -> np.ndarray:
    """Labels at output positions: `lr_mm` (n,) sagittal positions, rows x cols in-plane grid
    of `px_mm` pixels centred on the field of view. Returns uint8 (n, rows, cols)."""
    n = len(lr_mm)
    lr = np.asarray(lr_mm, np.float32)[:, None, None] * (-1 if pose.mirror else 1)
    si = ((np.arange(rows, dtype=np.float32) - (rows - 1) / 2) * px_mm + rows_offset_mm)[None, :, None]
    ap = ((np.arange(cols, dtype=np.float32) - (cols - 1) / 2) * px_mm)[None, None, :]
    m = pose.matrix.astype(np.float32)
    shape = (n, rows, cols)
    coords = []
    if pose.elastic_mm > 0:
        coarse = (max(2, n // 8), 5, 5)
        disp = [pose.elastic_mm * smooth_noise(rng, shape, coarse) for _ in range(3)]
    for a in range(3):
        c = m[a, 0] * lr + m[a, 1] * si + m[a, 2] * ap + np.float32(pose.centre_mm[a])
        c = np.broadcast_to(c, shape)
        if pose.elastic_mm > 0:
            c = c + disp[a]
        coords.append((c / GRID_MM).astype(np.float32))
    # A knee scan's field of view never shows where the thigh or the leg ends: beyond the
    # anatomy's top and bottom rows the leg continues as those rows show it. Left as empty
    # space, a tall field of view now and then showed the femoral shaft ending in mid-image
    # (4 of 60 generated segmenter scans), which no real knee scan does.
    coords[1] = np.clip(coords[1], 0, anatomy.labels.shape[1] - 1)
    return ndi.map_coordinates(anatomy.labels, coords, order=0, mode="constant", cval=0, prefilter=False)


def add_lesions(labels: np.ndarray, spacing_mm, rng: np.random.Generator, max_lesions: int = 3,
                surface_p: float = 0.0, breach_p: float = 0.0) -> np.ndarray:
    """Oedema-like blobs (label FEM_LESION) in the femoral marrow, mostly subchondral.

    `surface_p`: share of lesions that are small (1.5-6 mm) and seeded within 2 mm of the
    bone surface under the cartilage, as most of the real OAI BMLs are: those are the ones
    a segmenter carves out of the femur when it takes their brightness for cartilage.
    `breach_p`: share of those surface lesions that replace the cortex under them too. A
    real BML reaches the subchondral plate, a line far thinner than the segmenter's 1.6 mm
    pixel, so on its grid the oedema touches the cartilage; drawn only in the marrow, every
    generated lesion kept a dark pixel of cortex above it, and a segmenter trained on those
    carved lesions that reach the surface out of the femur (painted OAI_AKOA, painter 2)."""
    marrow = np.isin(labels, (T.FEMUR, T.FEMUR_PHYSIS))
    if marrow.sum() < 100:
        return labels
    femur = T.FEMUR_TABLE[labels].astype(bool)
    cart = labels == T.FEM_CART
    if cart.any() and rng.random() < 0.75:  # most BMLs lie under the articular cartilage
        near_cart = ndi.distance_transform_edt(~cart, sampling=spacing_mm) < 8
        cand = np.argwhere(marrow & near_cart)
    else:
        near_cart = None
        cand = np.argwhere(marrow & (ndi.distance_transform_edt(femur, sampling=spacing_mm) < 12))
    if len(cand) == 0:
        return labels
    surface = np.empty((0, 3), int)
    if surface_p > 0 and near_cart is not None:
        surface = np.argwhere(marrow & near_cart & (ndi.distance_transform_edt(femur, sampling=spacing_mm) < 2))
    out = labels.copy()
    sp = np.asarray(spacing_mm, float)
    for _ in range(int(rng.integers(1, max_lesions + 1))):
        fill = (T.FEMUR, T.FEMUR_PHYSIS)
        if len(surface) and rng.random() < surface_p:
            c = surface[int(rng.integers(len(surface)))]
            size = float(np.exp(rng.uniform(np.log(1.5), np.log(6.0))))
            if breach_p > 0 and rng.random() < breach_p:  # no draw at 0: older recipes replay exactly
                fill = (T.FEMUR, T.FEMUR_PHYSIS, T.FEMUR_CORTEX)
        else:
            c = cand[int(rng.integers(len(cand)))]
            size = float(np.exp(rng.uniform(np.log(2.0), np.log(14.0))))
        half = np.ceil((2.2 * size + 3) / sp).astype(int)
        lo, hi = np.maximum(c - half, 0), np.minimum(c + half + 1, labels.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        grids = np.meshgrid(*[(np.arange(a, b) - ci) * s for a, b, ci, s in zip(lo, hi, c, sp)], indexing="ij")
        field = np.zeros(grids[0].shape, np.float32)
        for _ in range(int(rng.integers(1, 4))):
            off = rng.normal(0, 0.4 * size, 3)
            r = size * rng.uniform(0.4, 1.0, 3)
            q = sum(((g - o) / ri) ** 2 for g, o, ri in zip(grids, off, r))
            field = np.maximum(field, np.exp(-q))
        rough = smooth_noise(rng, field.shape, tuple(max(2, n // 3) for n in field.shape))
        blob = (field * (1 + 0.4 * rough)) > 0.5
        sub = out[box]
        sub[blob & np.isin(sub, fill)] = T.FEM_LESION
    return out


# -- the two kinds of sample -------------------------------------------------------------------

@dataclass
class SegmenterSample:
    image: np.ndarray  # float32 (S, H, W), normalised like the runtime does
    femur: np.ndarray  # float32 {0,1}
    spacing: tuple[float, float, float]
    family: str
    lesion: np.ndarray | None = None  # bool, the lesions (part of `femur`); None: no lesions drawn
    image2: np.ndarray | None = None  # the same knee in a second contrast (`paired`), else None


def _slice_positions(n_slices: int, thickness: float, n_sub: int, centre: float = 0.0) -> np.ndarray:
    k = np.arange(n_slices * n_sub, dtype=np.float32)
    return (k + 0.5) / n_sub * thickness - n_slices * thickness / 2 + centre


def _thickness(rng) -> float:
    return float(rng.uniform(2.8, 3.6)) if rng.random() < 0.45 else float(rng.uniform(2.0, 4.5))


def _zero_border(rng: np.random.Generator, shape: tuple[int, int], px_mm: float) -> np.ndarray:
    """In-plane mask of what the scan shows: scanners store a field of view padded with
    zeros now and then (image and ground truth are both cut by it)."""
    keep = np.ones(shape, bool)
    if rng.random() < 0.2:
        b = (rng.uniform(0, 15, 4) / px_mm).astype(int)
        h, w = shape
        keep[: b[0]] = keep[h - b[1]:] = False
        keep[:, : b[2]] = keep[:, w - b[3]:] = False
    return keep


def segmenter_sample(anatomy: Anatomy, rng: np.random.Generator, px_mm: float = 1.6, n_sub: int = 3,
                     lesion_p: float = 0.5, family: str | None = None, max_lesions: int = 3,
                     surface_p: float = 0.0, breach_p: float = 0.0,
                     dark_muscle_p: float = DARK_MUSCLE_P, paired: bool = False,
                     smoothing_p: float = 0.0, antialias: float = 0.0,
                     fat_like_marrow_p: float = 0.0) -> SegmenterSample:
    """A whole scan on the segmenter's working grid (the scan's slices, px_mm pixels).

    With `paired`, `image2` is the same knee (same labels, same field of view) painted in a
    second contrast, half the time of the same family (as the echoes of one DESS scan are),
    with its own textures and acquisition: what a consistency loss compares. With
    `smoothing_p`, that share of scans is smoothed as the runtime smooths a fine scan before
    this grid (`runtime_smoothing` with `antialias`, both echoes alike)."""
    t = _thickness(rng)
    n = max(8, int(round(rng.uniform(80, 150) / t)))
    rows = int(round(rng.uniform(120, 190) / px_mm))
    cols = int(round(rng.uniform(120, 190) / px_mm))
    pose = random_pose(anatomy, rng)
    lr = _slice_positions(n, t, n_sub)
    sub_mm = (t / n_sub, px_mm, px_mm)
    labels = sample_labels(anatomy, pose, rng, lr, rows, cols, px_mm)
    if rng.random() < lesion_p:
        labels = add_lesions(labels, sub_mm, rng, max_lesions, surface_p, breach_p)
    fam, means = draw_contrast(rng, family, dark_muscle_p, fat_like_marrow_p)

    def painted(means):
        return paint(labels, rng, means).reshape(n, n_sub, rows, cols).mean(axis=1)

    img = painted(means)  # the random draws in the order of unpaired samples made before
    femur = T.FEMUR_TABLE[labels].reshape(n, n_sub, rows, cols).mean(axis=1) > 0.5
    lesion = (labels == T.FEM_LESION).reshape(n, n_sub, rows, cols).mean(axis=1) > 0.5
    keep = _zero_border(rng, (rows, cols), px_mm)
    img = acquire(img, rng)
    sigma = 0.0
    if smoothing_p > 0 and rng.random() < smoothing_p:  # no draw when off: old runs replay
        img, sigma = runtime_smoothing(img, rng, px_mm, antialias)
    img = normalize_intensity(img * keep)
    img2 = None
    if paired:
        means2 = draw_contrast(rng, fam if rng.random() < 0.5 else None, dark_muscle_p, fat_like_marrow_p)[1]
        img2 = normalize_intensity(_smooth_inplane(acquire(painted(means2), rng), sigma) * keep)
    femur &= keep
    lesion &= femur
    return SegmenterSample(img, femur.astype(np.float32), (t, px_mm, px_mm), fam,
                           lesion if lesion.any() else None, img2)


@dataclass
class InpainterSample:
    image: np.ndarray  # float32 (R, R), normalised
    femur: np.ndarray  # bool (R, R)
    family: str


def inpainter_sample(anatomy: Anatomy, rng: np.random.Generator, res: int, n_sub: int = 3,
                     family: str | None = None, min_femur_mm2: float = 20.0, tries: int = 8) -> InpainterSample | None:
    """One healthy sagittal slice through the femur, square, at the inpainter's resolution."""
    fem_vox = np.argwhere(np.isin(anatomy.labels[::2, ::2, ::2], T.FEMUR_PARTS)) * 2
    for _ in range(tries):
        t = _thickness(rng)
        fov = rng.uniform(130, 190)
        px = fov / res
        pose = random_pose(anatomy, rng)
        # Put the slice through a random femur voxel (area-weighted, as real slices are).
        v = fem_vox[int(rng.integers(len(fem_vox)))] * GRID_MM
        rel = np.linalg.solve(pose.matrix, v - pose.centre_mm)
        lr0 = rel[0] * (-1 if pose.mirror else 1)
        # A rectangular field of view is stored padded to a square, as the runtime pads it.
        rows, cols = res, res
        if rng.random() < 0.3:
            short = int(res * rng.uniform(0.7, 1.0))
            rows, cols = (short, res) if rng.random() < 0.5 else (res, short)
        labels = sample_labels(anatomy, pose, rng, _slice_positions(1, t, n_sub, lr0), rows, cols, px)
        femur = T.FEMUR_TABLE[labels].mean(axis=0) > 0.5
        if femur.sum() * px * px < min_femur_mm2:
            continue
        fam, means = draw_contrast(rng, family)
        img = paint(labels, rng, means).mean(axis=0)[None]
        keep = _zero_border(rng, (rows, cols), px)
        img = acquire(img, rng)[0] * keep
        femur &= keep
        if femur.sum() * px * px < min_femur_mm2:
            continue
        lo, hi = np.percentile(img, [0.5, 99.5])
        hi = lo + (hi - lo) * rng.uniform(0.85, 1.15)  # a volume's percentiles, not this slice's
        img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1.5).astype(np.float32)
        out_img = np.zeros((res, res), np.float32)
        out_fem = np.zeros((res, res), bool)
        oy, ox = (res - rows) // 2, (res - cols) // 2
        out_img[oy:oy + rows, ox:ox + cols] = img
        out_fem[oy:oy + rows, ox:ox + cols] = femur
        return InpainterSample(out_img, out_fem, fam)
    return None
