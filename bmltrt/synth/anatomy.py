"""Knee anatomies for label-driven training: real label maps, completed into whole legs.

A label map from ``train_labels/`` names bones and cartilage, but a scan shows a leg:
without the rest, a network learns "bone = anything inside the label map". Each anatomy
here is a tissue label volume (``tissue_labels.py``) in the working orientation
[slice L->R, row S->I, col A->P] on an isotropic grid, with what the map lacks drawn
around its bones from rules of knee anatomy: cortex, growth-plate scars, a leg outline
with subcutaneous fat, muscle groups and septa, the patellar and quadriceps tendons,
joint fat pads, menisci, cruciate ligaments, joint fluid (films, suprapatellar recess,
cysts) and the popliteal vessels. Random choices (thicknesses, effusion, body size) make
each variant of one map different. Femur-only maps are swapped into host knees so that
their femur shapes appear with real neighbours.

Building a variant takes seconds; the training loaders sample thousands of images
from a few dozen variants (``labelgen.py``), so variants are cached as .npz files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from scipy import ndimage as ndi

from bmltrt.io.checksum import file_sha256
from bmltrt.io.nifti import read_header_checked, read_label_map
from bmltrt.synth import tissue_labels as T
from bmltrt.synth.appearance import smooth_noise

GRID_MM = 0.6  # isotropic grid of every anatomy
EXTEND_SI_MM = 30.0  # femoral and tibial shafts continued beyond the map's field of view
PAD_MM = 35.0  # room around the bones for the leg outline
VERSION = 1  # bump when the rules change: cached variants are rebuilt


@dataclass
class Anatomy:
    labels: np.ndarray  # uint8 (S, H, W), tissue_labels numbering
    source: str
    knee_centre: np.ndarray  # voxel coordinates of the joint centre (where a scan is centred)
    info: dict = field(default_factory=dict)

    @property
    def spacing(self) -> float:
        return GRID_MM


# -- reading and resampling label maps --------------------------------------------------------

def canonical_labels(path) -> tuple[np.ndarray, np.ndarray]:
    """Label map in the working orientation (R, I, P axcodes) and its spacing (mm)."""
    img = read_header_checked(path)
    lab = np.rint(read_label_map(path, img)).astype(np.int16)
    tr = ornt_transform(io_orientation(img.affine), axcodes2ornt(("R", "I", "P")))
    lab = apply_orientation(lab, tr)
    zooms = np.asarray(img.header.get_zooms()[:3], float)
    spacing = np.empty(3)
    spacing[tr[:, 0].astype(int)] = zooms
    return np.ascontiguousarray(lab), spacing


def resample_labels(lab: np.ndarray, spacing, grid_mm: float = GRID_MM) -> np.ndarray:
    """Resample a label map to an isotropic grid: linear interpolation of each label's
    indicator, then the most likely label (smooth surfaces even from 4 mm slices)."""
    shape = tuple(max(1, int(round(n * s / grid_mm))) for n, s in zip(lab.shape, spacing))
    factors = [t / n for t, n in zip(shape, lab.shape)]
    best = np.zeros(shape, np.float32)
    out = np.zeros(shape, np.uint8)
    for k in np.unique(lab):
        if k == 0:
            continue
        p = ndi.zoom((lab == k).astype(np.float32), factors, order=1, grid_mode=True, mode="nearest")
        p = _fit(p, shape)
        win = (p > best) & (p > 0.5)
        out[win] = k
        best = np.maximum(best, p)
    return out


def _fit(a: np.ndarray, shape) -> np.ndarray:
    if a.shape == tuple(shape):
        return a
    pads = [(0, max(0, t - s)) for t, s in zip(shape, a.shape)]
    return np.pad(a, pads, mode="edge")[tuple(slice(0, t) for t in shape)]


def extend_field_of_view(lab: np.ndarray) -> np.ndarray:
    """Continue the shafts beyond the map's top and bottom rows (edge replication: a scan's
    field of view rarely cuts the femur where the label map did), pad the other axes."""
    si = int(round(EXTEND_SI_MM / GRID_MM))
    pad = int(round(PAD_MM / GRID_MM))
    lab = np.pad(lab, ((0, 0), (si, si), (0, 0)), mode="edge")
    return np.pad(lab, ((pad, pad), (0, 0), (pad, pad)))


def crop_to_content(lab: np.ndarray, margin_mm: float = PAD_MM) -> np.ndarray:
    idx = np.argwhere(lab > 0)
    m = int(round(margin_mm / GRID_MM))
    lo = np.maximum(idx.min(0) - m, 0)
    hi = np.minimum(idx.max(0) + m + 1, lab.shape)
    return lab[tuple(slice(a, b) for a, b in zip(lo, hi))]


# -- completing a bones-and-cartilage map into a leg -----------------------------------------

def _edt_outside(mask: np.ndarray, box_margin_mm: float = 25.0) -> np.ndarray:
    """Distance (mm) to `mask` from outside, computed in its bounding box grown by a margin
    (farther voxels get the margin: every rule below asks only about nearby tissue)."""
    out = np.full(mask.shape, box_margin_mm, np.float32)
    if not mask.any():
        return out
    idx = np.argwhere(mask)
    m = int(box_margin_mm / GRID_MM) + 1
    lo = np.maximum(idx.min(0) - m, 0)
    hi = np.minimum(idx.max(0) + m + 1, mask.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    d = ndi.distance_transform_edt(~mask[box], sampling=GRID_MM).astype(np.float32)
    out[box] = np.minimum(d, box_margin_mm)
    return out


def _edt_inside(mask: np.ndarray) -> np.ndarray:
    out = np.zeros(mask.shape, np.float32)
    if not mask.any():
        return out
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - 1, 0)
    hi = np.minimum(idx.max(0) + 2, mask.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    out[box] = ndi.distance_transform_edt(mask[box], sampling=GRID_MM)
    return out


def _row_profile(mask: np.ndarray, axis: int, lo: bool, sigma_mm: float = 8.0) -> np.ndarray:
    """Per row (axis 1), the first (lo) or last index of `mask` along `axis` (0 or 2),
    smoothed along the rows and continued past rows that have none."""
    if axis == 0:
        proj = mask.any(axis=2).T  # (H, S)
    else:
        proj = mask.any(axis=0)  # (H, W)
    n = proj.shape[1]
    has = proj.any(axis=1)
    idx = np.where(has, np.argmax(proj, axis=1) if lo else n - 1 - np.argmax(proj[:, ::-1], axis=1), 0)
    rows = np.arange(proj.shape[0])
    if not has.any():
        return np.full(proj.shape[0], n / 2, np.float32)
    prof = np.interp(rows, rows[has], idx[has]).astype(np.float32)
    return ndi.gaussian_filter1d(prof, sigma_mm / GRID_MM, mode="nearest")


def _segment_distance(p0, p1, grids):
    """Distance (mm) of every voxel from the segment p0-p1 (voxel coordinates)."""
    d = np.asarray(p1, float) - np.asarray(p0, float)
    L2 = max(float(d @ d), 1e-6)
    rel = [g - c for g, c in zip(grids, p0)]
    t = np.clip(sum(r * di for r, di in zip(rel, d)) / L2, 0, 1)
    return np.sqrt(sum((r - t * di) ** 2 for r, di in zip(rel, d))) * GRID_MM


def complete_anatomy(lab: np.ndarray, rng: np.random.Generator, body: bool = True) -> np.ndarray:
    """Draw the tissues a bones-and-cartilage map lacks around its bones (see module doc)."""
    lab = lab.astype(np.uint8)
    S, H, W = lab.shape
    g = GRID_MM
    s_ix = np.arange(S, dtype=np.float32)[:, None, None]
    h_ix = np.arange(H, dtype=np.float32)[None, :, None]
    w_ix = np.arange(W, dtype=np.float32)[None, None, :]
    fem = np.isin(lab, (T.FEMUR, T.FEM_LESION))
    tib = np.isin(lab, (T.TIBIA, T.TIB_LESION))
    pat = np.isin(lab, (T.PATELLA, T.PAT_LESION))
    bones = fem | tib | pat | (lab == T.FIBULA)
    cart = np.isin(lab, T.CARTILAGE)
    solid = bones | cart | (lab == T.MENISCUS)
    coarse = lambda c: tuple(max(2, int(n * g / c)) for n in (S, H, W))  # noqa: E731

    # Leg outline: per row, the bones' extent plus margins (thin in front of the patella and
    # tibia, thick quadriceps above the patella, calf and hamstrings behind).
    ant = _row_profile(bones, 2, lo=True)
    post = _row_profile(bones, 2, lo=False)
    left = _row_profile(bones, 0, lo=True)
    right = _row_profile(bones, 0, lo=False)
    rows = np.arange(H, dtype=np.float32)
    ant_margin = np.full(H, rng.uniform(4, 12) / g, np.float32)
    if pat.any():
        pat_top = np.argwhere(pat)[:, 1].min()
        quad = rng.uniform(10, 30) / g
        ant_margin += quad * np.clip((pat_top - rows) * g / 40.0, 0, 1)
    post_margin = rng.uniform(25, 60) / g * (1 + 0.2 * np.sin(rows * g / rng.uniform(40, 90) + rng.uniform(0, 6)))
    side = rng.uniform(10, 28) / g
    a0, a1 = ant - ant_margin, post + post_margin
    l0, l1 = left - side, right + side
    c_ap, r_ap = (a0 + a1) / 2, (a1 - a0) / 2
    c_lr, r_lr = (l0 + l1) / 2, (l1 - l0) / 2
    p = rng.uniform(2.0, 3.0)
    rho = (np.abs(s_ix - c_lr[None, :, None]) / r_lr[None, :, None]) ** p \
        + (np.abs(w_ix - c_ap[None, :, None]) / r_ap[None, :, None]) ** p
    leg = rho <= 1.0 if body else np.ones(lab.shape, bool)
    leg |= ndi.binary_dilation(bones, iterations=3)

    out = np.zeros(lab.shape, np.uint8)
    # Muscle groups, septa between them (sheets along the limb), subcutaneous fat.
    groups = smooth_noise(rng, lab.shape, coarse(45.0))
    out[leg] = np.where(groups[leg] > rng.uniform(-0.3, 0.5), T.MUSCLE2, T.MUSCLE)
    sheets = smooth_noise(rng, lab.shape, (max(2, int(S * g / 14)), max(2, int(H * g / 60)), max(2, int(W * g / 14))))
    out[leg & (np.abs(sheets) < rng.uniform(0.03, 0.08))] = T.SEPTUM
    if body:
        depth = _edt_inside(leg[:, :, :])
        fat_t = rng.uniform(2, 10) * np.clip(1 + 0.3 * smooth_noise(rng, lab.shape, coarse(40.0)), 0.4, 1.8)
        out[leg & (depth < fat_t)] = T.FAT

    # Around the joint: fat pads, capsule and ligaments, menisci, tendons, fluid.
    d_fem, d_tib = _edt_outside(fem), _edt_outside(tib)
    joint = leg & ~solid & (d_fem < rng.uniform(6, 12)) & (d_tib < rng.uniform(6, 12))
    if joint.any():
        centre = np.argwhere(joint).mean(0)
        out[joint] = np.broadcast_to(np.where(w_ix < centre[2], T.HOFFA, T.FAT), lab.shape)[joint]
        lig = joint & (np.abs(s_ix - centre[0]) * g < rng.uniform(5, 10)) & (w_ix > centre[2] - 5 / g) \
            & (smooth_noise(rng, lab.shape, coarse(8.0)) > -0.3)
        out[lig] = T.TENDON
        if not (lab == T.MENISCUS).any():
            men = joint & (d_fem + d_tib < rng.uniform(5, 8)) & (np.abs(s_ix - centre[0]) * g > 8)
            out[men] = T.MENISCUS
    if pat.any():
        pv = np.argwhere(pat)
        lr_c = pv[:, 0].mean()
        bottom = pv[pv[:, 1] >= pv[:, 1].max() - 2]
        top = pv[pv[:, 1] <= pv[:, 1].min() + 2]
        p0 = np.array([lr_c, bottom[:, 1].mean(), bottom[:, 2].mean()])
        tendon_w = rng.uniform(10, 15)
        if tib.any():
            tv = np.argwhere(tib)
            row1 = min(H - 1, tv[:, 1].min() + int(rng.uniform(25, 38) / g))
            at = tv[np.abs(tv[:, 1] - row1) <= 2]
            if len(at):
                p1 = np.array([lr_c, row1, at[:, 2].min() - 1.5 / g])
                d = _segment_distance(p0[1:], p1[1:], (h_ix, w_ix))
                pt = (d < rng.uniform(1.8, 3.2)) & (np.abs(s_ix - lr_c) * g < tendon_w) & leg & ~solid
                # Hoffa's fat pad: behind the tendon, in front of the bones, patella to plateau.
                out[pt] = T.TENDON
        p2 = np.array([lr_c, top[:, 1].mean(), top[:, 2].mean()])
        if fem.any():
            fv = np.argwhere(fem[:, : max(1, int(p2[1])), :])
            lean = 0.0
            if len(fv) > 100:  # follow the femoral shaft's lean in the sagittal plane
                r_hi, r_lo = fv[:, 1].min(), fv[:, 1].max()
                up = fv[fv[:, 1] < r_hi + 10][:, 2].mean() - fv[fv[:, 1] > r_lo - 10][:, 2].mean()
                lean = up / max(r_lo - r_hi, 1)
            length = rng.uniform(40, 70) / g
            p3 = p2 + np.array([0, -length, length * lean])
            d = _segment_distance(p2[1:], p3[1:], (h_ix, w_ix))
            qt = (d < rng.uniform(2.5, 4.5)) & (np.abs(s_ix - lr_c) * g < rng.uniform(12, 20)) & leg & ~solid
            out[qt] = T.TENDON
            # Suprapatellar recess: fluid between the quadriceps tendon and the femur.
            pouch_t = rng.uniform(0.5, 7.0)
            first = np.where(fem.any(axis=2), np.argmax(fem, axis=2), W)  # (S, H) anterior femur col
            rows_ok = (h_ix > p2[1] - rng.uniform(20, 50) / g) & (h_ix < p2[1] + 5 / g)
            pouch = (w_ix < first[:, :, None]) & (w_ix >= first[:, :, None] - pouch_t / g) & rows_ok \
                & (np.abs(s_ix - lr_c) * g < rng.uniform(15, 30)) & leg & ~solid & (out != T.TENDON)
            out[pouch] = T.FLUID
    # Joint fluid: a patchy film along the cartilage, thicker with effusion.
    d_cart = _edt_outside(cart, 10.0)
    patch = smooth_noise(rng, lab.shape, coarse(10.0))
    film_t = rng.uniform(0.3, 2.5) * (1 + 0.7 * patch)
    film = (d_cart < film_t) & (patch > rng.uniform(-0.6, 0.4)) & leg & ~solid & (out != T.TENDON)
    out[film] = T.FLUID
    if fem.any() and rng.random() < 0.3:  # a popliteal (Baker's) cyst behind the condyles
        fv = np.argwhere(fem)
        c = np.array([fv[:, 0].mean() + rng.uniform(-15, 15) / g, fv[:, 1].max() - rng.uniform(5, 30) / g,
                      fv[:, 2].max() + rng.uniform(5, 15) / g])
        r = rng.uniform(5, 14, 3) / g
        cyst = ((s_ix - c[0]) / r[0]) ** 2 + ((h_ix - c[1]) / r[1]) ** 2 + ((w_ix - c[2]) / r[2]) ** 2 < 1
        out[cyst & leg & ~solid] = T.FLUID
    # Popliteal artery and vein behind the femur and tibia, small vessels in fat and muscle.
    back = _row_profile(fem | tib, 2, lo=False)
    mid = (_row_profile(fem | tib, 0, lo=True) + _row_profile(fem | tib, 0, lo=False)) / 2
    vessels = np.zeros(lab.shape, bool)
    off_lr = rng.uniform(-8, 8) / g
    off_ap = rng.uniform(6, 18) / g
    for dlr, dap, r in ((0.0, 0.0, rng.uniform(2.2, 3.5)), (rng.uniform(3, 7), rng.uniform(2, 6), rng.uniform(3, 5))):
        cl = (mid + off_lr + dlr / g)[None, :, None]
        ca = (back + off_ap + dap / g)[None, :, None]
        vessels |= ((s_ix - cl) ** 2 + (w_ix - ca) ** 2) * g * g < r * r
    for _ in range(int(rng.integers(3, 9))):
        c = rng.uniform(0, 1, 3) * np.array([S, H, W])
        r = np.array([rng.uniform(0.8, 2.0), rng.uniform(8, 40), rng.uniform(0.8, 2.0)]) / g
        vessels |= ((s_ix - c[0]) / r[0]) ** 2 + ((h_ix - c[1]) / r[1]) ** 2 + ((w_ix - c[2]) / r[2]) ** 2 < 1
    out[vessels & leg & ~solid & (out != T.TENDON)] = T.VESSEL

    # The map's own tissues on top, then cortex and growth-plate scars inside the bones.
    out[solid] = lab[solid]
    ct = rng.uniform(0.9, 1.9)
    for part, rim in ((fem, T.FEMUR_CORTEX), (tib, T.BONE_CORTEX), (pat, T.BONE_CORTEX), (lab == T.FIBULA, T.BONE_CORTEX)):
        if part.any():
            out[part & (_edt_inside(part) <= ct)] = rim
    for part, scar, lab_id in ((fem, T.FEMUR_PHYSIS, T.FEMUR), (tib, T.BONE_PHYSIS, T.TIBIA)):
        if part.any() and rng.random() < 0.5:
            pv = np.argwhere(part)
            end = pv[:, 1].max() if lab_id == T.FEMUR else pv[:, 1].min()
            height = rng.uniform(14, 28) / g * (-1 if lab_id == T.FEMUR else 1)
            tilt = rng.uniform(-0.15, 0.15, 2)
            wave = 2.0 / g * smooth_noise(rng, lab.shape, coarse(25.0))
            surf = end + height + tilt[0] * (s_ix - S / 2) + tilt[1] * (w_ix - W / 2) + wave
            band = np.abs(h_ix - surf) * g < rng.uniform(0.4, 0.9)
            out[band & (out == lab_id)] = scar
    out[~leg] = T.AIR
    return out


def knee_centre(lab: np.ndarray) -> np.ndarray:
    """Where a scanner centres the field of view: between the femur's distal end and the
    tibial plateau, at the middle of the femur's width."""
    fem = np.argwhere(np.isin(lab, T.FEMUR_PARTS))
    if len(fem) == 0:
        return (np.asarray(lab.shape) - 1) / 2.0
    low = fem[fem[:, 1] >= fem[:, 1].max() - int(30 / GRID_MM)]
    return np.array([low[:, 0].mean(), fem[:, 1].max() - 5 / GRID_MM, low[:, 2].mean()])


# -- femur-only maps swapped into host knees ---------------------------------------------------

def swap_femur(host: np.ndarray, femur: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """The host knee with its femur (and femoral cartilage) replaced by another femur shape,
    scaled to the host's condyles, seated on its tibia; cartilage redrawn on the new surface."""
    hf = host == T.FEMUR
    fv = np.argwhere(femur > 0)
    hv = np.argwhere(hf)
    if len(fv) == 0 or len(hv) == 0:
        return None
    span = int(25 / GRID_MM)

    def distal(v):
        return v[v[:, 1] >= v[:, 1].max() - span]

    hd, fd = distal(hv), distal(fv)
    scale = np.clip(np.ptp(hd[:, 2]) / max(np.ptp(fd[:, 2]), 1), 0.85, 1.15) * rng.uniform(0.97, 1.03)
    f = ndi.zoom((femur > 0).astype(np.float32), scale, order=1) > 0.5
    fv = np.argwhere(f)
    fd = distal(fv)
    shift = np.array([hd[:, 0].mean() - fd[:, 0].mean(), hv[:, 1].max() - fv[:, 1].max(), hd[:, 2].mean() - fd[:, 2].mean()])
    out = host.copy()
    old_cart = out == T.FEM_CART
    out[hf | old_cart] = 0
    others = np.isin(out, (T.TIBIA, T.TIB_CART, T.PATELLA, T.PAT_CART, T.MENISCUS, T.FIBULA))
    for lift in range(0, int(30 / GRID_MM)):
        pos = np.round(fv + shift - np.array([0, lift, 0])).astype(int)
        ok = np.all((pos >= 0) & (pos < out.shape), axis=1)
        pos = pos[ok]
        hits = others[pos[:, 0], pos[:, 1], pos[:, 2]].sum()
        if hits <= 0.001 * len(pos):
            break
    new = np.zeros(out.shape, bool)
    new[pos[:, 0], pos[:, 1], pos[:, 2]] = True
    new = ndi.binary_closing(new, iterations=1)
    # A femur-only map ends where its mesh did: continue its shaft to the top of the volume.
    top = int(np.argmax(new.any(axis=(0, 2))))
    ref = min(top + int(3 / GRID_MM), out.shape[1] - 1)
    new[:, :ref] |= new[:, ref:ref + 1]
    new &= ~others
    out[new] = T.FEMUR
    # Femoral cartilage: a shell over the new surface where the host's cartilage was.
    near_old = ndi.binary_dilation(old_cart, iterations=int(6 / GRID_MM))
    shell = (_edt_outside(new, 5.0) < rng.uniform(1.8, 2.8)) & ~new & near_old & (out == 0)
    out[shell] = T.FEM_CART
    return out


# -- the bank: sources, variants, cache ---------------------------------------------------------

def _sha(path: Path) -> str:
    return file_sha256(path)[:16]


def is_femur_only(lab: np.ndarray) -> bool:
    present = set(np.unique(lab).tolist()) - {0}
    return present == {T.FEMUR}


def load_source(path: Path) -> np.ndarray:
    lab, spacing = canonical_labels(path)
    return resample_labels(lab, spacing)


def phantom_anatomy(seed) -> np.ndarray:
    """The phantom generator's own tissue labels, at 1 mm slices, on the anatomy grid."""
    from bmltrt.synth.phantom import PhantomConfig, make_phantom

    cfg = PhantomConfig(shape=(110, 267, 267), spacing=(1.0, 0.6, 0.6), n_lesions=(0, 0))
    ph = make_phantom(seed, cfg)
    return resample_labels(ph.labels, cfg.spacing)


def _variant(kind: str, args: tuple, seed: int) -> Anatomy:
    rng = np.random.default_rng(seed)
    if kind == "phantom":
        lab = phantom_anatomy([seed, 77])
        return Anatomy(lab, f"phantom:{seed}", knee_centre(lab), {"kind": kind})
    if kind == "knee":
        lab = load_source(Path(args[0]))
    else:  # swap: femur from args[1] into host args[0]
        host = load_source(Path(args[0]))
        fem = load_source(Path(args[1]))
        host = extend_field_of_view(host)
        fem = np.pad(fem, [(max(0, n - m), max(0, n - m)) for n, m in zip(host.shape, fem.shape)])
        lab = swap_femur(host, _fit_center(fem, host.shape), rng)
        lab = crop_to_content(lab)
        out = complete_anatomy(lab, rng, body=rng.random() > 0.15)
        return Anatomy(out, f"{Path(args[1]).name}@{Path(args[0]).name}", knee_centre(out), {"kind": kind})
    lab = crop_to_content(extend_field_of_view(lab))
    out = complete_anatomy(lab, rng, body=rng.random() > 0.15)
    return Anatomy(out, Path(args[0]).name, knee_centre(out), {"kind": kind})


def _fit_center(a: np.ndarray, shape) -> np.ndarray:
    """Centre-crop or pad `a` to `shape`."""
    out = np.zeros(shape, a.dtype)
    src, dst = [], []
    for n, t in zip(a.shape, shape):
        if n >= t:
            o = (n - t) // 2
            src.append(slice(o, o + t)); dst.append(slice(0, t))
        else:
            o = (t - n) // 2
            src.append(slice(0, n)); dst.append(slice(o, o + n))
    out[tuple(dst)] = a[tuple(src)]
    return out


def plan_bank(label_dir: Path | None, knee_variants: int = 6, swaps_per_femur: int = 2,
              phantoms: int = 12, seed: int = 0) -> list[tuple[str, tuple, int]]:
    """What to build: (kind, source paths, seed) for every variant."""
    jobs: list[tuple[str, tuple, int]] = []
    if label_dir is not None:
        files = sorted(Path(label_dir).glob("*.nii*"))
        knees, femurs = [], []
        for f in files:
            lab = read_label_map(f)
            (femurs if is_femur_only(lab) else knees).append(f)
        hosts = [k for k in knees if _has_all(k)]
        for k in knees:
            for v in range(knee_variants):
                jobs.append(("knee", (str(k),), seed * 1000 + len(jobs)))
        for i, fm in enumerate(femurs):
            for v in range(swaps_per_femur):
                host = hosts[(i + v) % len(hosts)] if hosts else None
                if host is not None:
                    jobs.append(("swap", (str(host), str(fm)), seed * 1000 + len(jobs)))
    for p in range(phantoms):
        jobs.append(("phantom", (), seed * 1000 + 500 + p))
    return jobs


def _has_all(path: Path) -> bool:
    u = set(np.unique(read_label_map(path)).tolist())
    return {T.FEMUR, T.FEM_CART, T.TIBIA, T.TIB_CART, T.PATELLA}.issubset(u)


def build_bank(label_dir: Path | None, cache_dir: Path, knee_variants: int = 6, swaps_per_femur: int = 2,
               phantoms: int = 12, seed: int = 0, workers: int = 1, progress=lambda: None) -> list[Path]:
    """Build (or reuse from `cache_dir`) every variant; returns their .npz paths."""
    from concurrent.futures import ProcessPoolExecutor

    from bmltrt.io.atomic import atomic_write

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    jobs = plan_bank(label_dir, knee_variants, swaps_per_femur, phantoms, seed)
    todo, paths = [], []
    for kind, args, s in jobs:
        key = hashlib.sha256(json.dumps([VERSION, kind, [_sha(Path(a)) for a in args], s]).encode()).hexdigest()[:16]
        path = cache_dir / f"{kind}_{key}.npz"
        paths.append(path)
        if path.exists():
            progress()
        else:
            todo.append((kind, args, s, str(path)))

    def save(res):
        path, an = res
        atomic_write(path, lambda tmp: np.savez_compressed(open(tmp, "wb"), labels=an.labels,
                                                           centre=an.knee_centre, source=an.source,
                                                           info=json.dumps(an.info)), suffix=".npz")
        progress()

    if workers <= 1:
        for t in todo:
            save(_build_one(t))
    else:
        with ProcessPoolExecutor(workers) as ex:
            for res in ex.map(_build_one, todo):
                save(res)
    return paths


def _build_one(job):
    kind, args, s, path = job
    return path, _variant(kind, args, s)


def load_anatomy(path: Path) -> Anatomy:
    with np.load(path) as z:
        return Anatomy(z["labels"], str(z["source"]), z["centre"], json.loads(str(z["info"])))
